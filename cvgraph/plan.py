"""``cvgraph plan``: what a sync (or a backfill of some prefixes) would do and cost, before
anything runs, from the records the steps themselves decide by.

A sync ingests the zips the sensor would start, then brings every prefix up to date; a backfill
of ``--prefixes`` brings those prefixes up to date from what is ingested now. Packs not ingested
yet have no prefixes: their images are spread over the prefixes as hashing spreads them (an
expected count per prefix, and the chance it is touched at all), from their central directories.
Reads: one listing each of ``incoming/`` and the pending markers, a few ranged reads per new zip,
one record per pending pack, one ``_versions`` object per asset: the work's size, not the lake's.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import dagster as dg

from assets.owed import Owed, owed
from workloads.costs import (
    chain_estimate,
    chain_task_s,
    index_estimate,
    ingest_estimate,
    summary_line,
    tables_estimate,
)
from workloads.layout import PENDING_RAW, marker_pack, pending_raw_prefix
from workloads.pack_zip import image_members
from workloads.planning import (
    INPUTS,
    STAGE_ASSETS,
    arriving_rows,
    asset_records,
    image_work_estimate,
    new_rows,
    pending_mean,
    plan_tasks,
    table_inputs,
    tables_work,
)
from workloads.versions import HASH_PREFIXES


def parse_prefixes(spec: str) -> list[str]:
    """``00-3f,a0,b1-b4`` → the prefixes it names, in order; a bad part raises ValueError."""
    out: set[str] = set()
    for part in filter(None, (p.strip().lower() for p in spec.split(","))):
        first, _, last = part.partition("-")
        last = last or first
        if first not in HASH_PREFIXES or last not in HASH_PREFIXES or last < first:
            raise ValueError(f"--prefixes {spec!r}: {part!r} is no prefix or range of 00..ff")
        out.update(HASH_PREFIXES[HASH_PREFIXES.index(first) : HASH_PREFIXES.index(last) + 1])
    if not out:
        raise ValueError(f"--prefixes {spec!r}: names no prefix")
    return sorted(out)


def _incoming(lake, owes: Owed) -> list[dict]:
    """The zips a sync would ingest (those the lake is owed an ingest for), each with its images."""
    out = []
    for z in owes.packs:
        images, image_bytes = image_members(lake, z.key) or (0, 0)  # no zip: its ingest says why
        out.append(
            {
                "pack_id": z.pack_id,
                "key": z.key,
                "images": images,
                "image_bytes": image_bytes,
                "bytes": z.bytes,
            }
        )
    return out


def _pending(lake) -> tuple[dict[str, int], dict[str, dict[str, int]], dict[str, float], list]:
    """(markers per prefix, {prefix: {pack: rows}} of committed pending packs, mean original bytes
    of each pending pack, packs being forgotten), from one listing and one record per pack."""
    keys = [k for k in lake.keys(PENDING_RAW) if marker_pack(k)]
    markers: dict[str, int] = {}
    for k in keys:
        markers[pending_raw_prefix(k)] = markers.get(pending_raw_prefix(k), 0) + 1
    forgotten = sorted({p for k in keys for p, forgetting in [marker_pack(k)] if forgetting})
    arriving, mean = arriving_rows(lake, keys)
    return markers, arriving, mean, forgotten


def plan(
    inst: dg.DagsterInstance, definitions: dg.Definitions, prefixes: list[str] | None = None
) -> dict:
    """The plan of a sync (``prefixes`` None) or of a backfill of ``prefixes``: per stage, the
    prefixes, images, Batch tasks, vCPU-hours, wall time, lake requests and bytes, and their
    cost."""
    res = definitions.resources
    lake, settings, costs = res["lake"].lake(), res["image_settings"], res["cost_settings"]
    params, rates, prices = settings.params(), costs.rates(), costs.prices()
    chosen = prefixes or list(HASH_PREFIXES)
    markers, arriving, pack_mean, forgotten = _pending(lake)
    records = {a: asset_records(lake, a) for a in INPUTS + ("image_tables",)}
    owes = owed(lake, params, records) if prefixes is None else None
    incoming = _incoming(lake, owes) if owes is not None else []
    raw = records["raw_images"]

    # Zips not ingested yet, spread as hashing spreads them: expected images per prefix and
    # the chance a prefix gets any (1 - P(none of the pack's n images lands there)).
    miss = [(1 - 1 / len(HASH_PREFIXES)) ** p["images"] for p in incoming]
    spread = sum(p["images"] for p in incoming) / len(HASH_PREFIXES)
    touched = 1 - math.prod(miss)
    spread_bytes = sum(p["image_bytes"] for p in incoming) / max(
        1, sum(p["images"] for p in incoming)
    )

    rows_in = {p: sum(arriving.get(p, {}).values()) for p in chosen}
    index_rows, work_in, table_rows = {}, {}, {}
    for p in chosen:
        images = (raw.get(p) or {}).get("images", 0) + rows_in[p] + spread
        if p in markers:
            index_rows[p] = (1, markers[p] + len(incoming) - sum(miss), images)
        elif incoming:
            index_rows[p] = (touched, len(incoming) - sum(miss), images)
    pending = plan_tasks(
        {s: records[a] for s, a in STAGE_ASSETS.items()},
        raw,
        chosen,
        params,
        shard_images=settings.shard_images,
        arriving=rows_in,
    ).pending
    for p in chosen:
        mean = pending_mean(
            raw.get(p),
            pending.get(p, 0),
            arriving.get(p, {}),
            pack_mean,
            (spread, spread_bytes),
        )
        if p in pending:
            work_in[p] = (1, pending[p] + spread, mean)
        elif spread:
            work_in[p] = (touched, spread / touched, mean)
    for p in chosen:
        inputs = table_inputs({a: records[a].get(p) for a in INPUTS})
        prior = records["image_tables"].get(p)
        rows = new_rows(prior, raw.get(p)) + rows_in[p] + spread
        if p in markers or p in pending or tables_work(prior, raw.get(p), inputs):
            table_rows[p] = (1, rows)
        elif spread:
            table_rows[p] = (touched, rows)

    # A sync's run selects every prefix asset: the prefixes to index run as chain tasks that
    # make their images and tables too, unless a prefix is sharded (its images, then its tables,
    # are the steps') or the tables have a writer of their own.
    in_chain = res["table_writer"].writes_in_chain()
    chain_images = {
        p: work_in[p] for p in index_rows if p in work_in and work_in[p][1] <= settings.shard_images
    }
    chain_tables = {p: table_rows[p] for p in chain_images if p in table_rows and in_chain}
    image_estimate = partial(
        image_work_estimate,
        shard_images=settings.shard_images,
        size=params.resize.size,
        rates=rates,
    )
    stages = [
        ingest_estimate([(p["images"], p["bytes"], p["image_bytes"]) for p in incoming], rates),
        chain_estimate(
            [
                index_estimate(list(index_rows.values()), rates),
                image_estimate(chain_images, split=1),
                tables_estimate(list(chain_tables.values()), rates),
            ],
            [
                (w, chain_task_s(chain_images[p][1] if p in chain_images else None, rates))
                for p, (w, _, _) in index_rows.items()
            ],
            len(pack_mean),
            rates,
        ),
        image_estimate(
            {p: v for p, v in work_in.items() if p not in chain_images},
            split=res["image_compute"].tasks_per_image_task(["resize", "edges"]),
        ),
        tables_estimate([v for p, v in table_rows.items() if p not in chain_tables], rates),
    ]
    total = stages[0]
    for s in stages[1:]:
        total = total + s
    return {
        "scope": "sync" if prefixes is None else f"backfill of {len(chosen)} prefixes",
        "prefixes": chosen if prefixes is not None else "all",
        "packs_to_ingest": [
            {k: p[k] for k in ("pack_id", "key", "images", "bytes")} for p in incoming
        ],
        "packs_to_index": sorted({k for v in arriving.values() for k in v}),
        "packs_to_forget": forgotten,
        # what the lake is owed (``assets.owed``): exactly what a sync runs
        "owed": owes.to_json() if owes is not None else None,
        "owed_summary": owes.summary() if owes is not None else None,
        "unreadable": [
            {"pack_id": z.pack_id, "key": z.key, "reason": z.reason}
            for z in (owes.zips if owes is not None else ())
            if z.state == "unreadable"
        ],
        "prefixes_with_image_work": len(pending),
        "stages": [s.to_json(prices, rates) for s in stages],
        "total": total.to_json(prices, rates),
        # the stages with work, and the total
        "lines": [summary_line(s, prices, rates) for s in (*stages, total) if s.tasks],
        "rates": dataclasses.asdict(rates),
        "prices": dataclasses.asdict(prices),
    }


def render(p: dict) -> str:
    """The plan as a terminal shows it."""
    rates, prices = p["rates"], p["prices"]
    out = [f"plan of a {p['scope']} (nothing has run):"]
    if p["packs_to_ingest"]:
        out.append(
            "  to ingest: "
            + ", ".join(
                f"{x['pack_id']} ({x['images']} images, {x['bytes'] / 1e6:.1f} MB)"
                for x in p["packs_to_ingest"]
            )
        )
    if p["packs_to_index"]:
        out.append(f"  ingested, to index: {', '.join(p['packs_to_index'])}")
    if p["packs_to_forget"]:
        out.append(f"  to forget: {', '.join(p['packs_to_forget'])}")
    out += [f"  {line}" for line in p["lines"]]
    for u in p.get("unreadable", []):
        out.append(f"  not ingested, recorded: {u['key']}: {u['reason']}")
    if p.get("owed") is not None:
        if not p["owed"]["packs"] and not p["owed"]["prefixes"]:
            out.append("  nothing to do: no pack waits and every prefix is up to date")
        else:
            out.append(f"  owed: {p['owed_summary']}")
    elif not p["total"]["tasks"]:
        out.append("  nothing to do: every prefix is up to date")
    out.append(
        f"  at {rates['images_per_vcpu_s']:g} images per vCPU-second, tasks of {rates['task_vcpus']:g} vCPU "
        f"and {rates['task_memory_gb']:g} GB billed {rates['min_billed_s']:g} s at least, each "
        f"about {rates['child_work_s']:g} s of work, at most {rates['max_children']} at once; "
        f"${prices['vcpu_hour']:g}/vCPU-h, ${prices['gb_hour']:g}/GB-h, "
        f"${prices['s3_put_per_1000']:g} per 1,000 PUT/LIST, ${prices['s3_get_per_1000']:g} per 1,000 GET"
    )
    return "\n".join(out)

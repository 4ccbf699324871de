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

import dagster as dg

from assets.images import EDGES, RESIZED, image_work_estimate, mean_bytes, plan_tasks
from assets.owed import Owed, owed
from assets.tables import INPUTS, new_rows, tables_work
from assets.versioning import asset_records
from workloads.costs import index_estimate, ingest_estimate, summary_line, tables_estimate
from workloads.lake import get_many
from workloads.layout import PENDING_RAW, marker_pack, pack_keys, pending_raw_prefix
from workloads.pack_zip import image_members
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
    found = {m for k in keys if (m := marker_pack(k))}
    forgotten = sorted({p for p, forgetting in found if forgetting})
    ids = {p for p, forgetting in found if not forgetting} - set(forgotten)
    records = get_many(lake, {p: pack_keys(p)["record"] for p in ids})
    arriving: dict[str, dict[str, int]] = {}
    for pack_id, rec in records.items():
        for prefix, rows in rec.get("prefixes", {}).items():
            arriving.setdefault(prefix, {})[pack_id] = rows
    mean = {p: rec["bytes_stored"] / max(1, rec["accepted"]) for p, rec in records.items()}
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
    index_rows, work_in = [], {}
    for p in chosen:
        images = (raw.get(p) or {}).get("images", 0) + rows_in[p] + spread
        if p in markers:
            index_rows.append((1, markers[p] + len(incoming) - sum(miss), images))
        elif incoming:
            index_rows.append((touched, len(incoming) - sum(miss), images))
    work, _, _, pending = plan_tasks(
        {k: records[k.to_user_string()] for k in (RESIZED, EDGES)},
        raw,
        [RESIZED, EDGES],
        chosen,
        params,
        settings.shard_images,
        arriving=rows_in,
    )
    for p in chosen:
        known_mean = mean_bytes(raw.get(p))
        arriving_bytes = sum(pack_mean[k] * n for k, n in arriving.get(p, {}).items())
        total = pending.get(p, 0) + spread
        mean = (
            (known_mean * (pending.get(p, 0) - rows_in[p]) + arriving_bytes + spread_bytes * spread)
            / total
            if total
            else 0
        )
        if p in pending:
            work_in[p] = (1, total, mean)
        elif spread:
            work_in[p] = (touched, spread / touched, mean)
    table_rows = []
    for p in chosen:
        inputs = {a: (records[a].get(p) or {}).get("data_version") for a in INPUTS}
        prior = records["image_tables"].get(p)
        rows = new_rows(prior, raw.get(p)) + rows_in[p] + spread
        if p in markers or p in pending or tables_work(prior, raw.get(p), inputs):
            table_rows.append((1, rows))
        elif spread:
            table_rows.append((touched, rows))

    stages = [
        ingest_estimate([(p["images"], p["bytes"], p["image_bytes"]) for p in incoming], rates),
        index_estimate(index_rows, rates),
        image_work_estimate(
            work_in,
            settings.shard_images,
            params.resize.size,
            rates,
            res["image_compute"].tasks_per_image_task(["resize", "edges"]),
        ),
        tables_estimate(table_rows, rates),
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
        "prefixes_with_image_work": len(work),
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

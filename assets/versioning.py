"""Per-prefix data versions: recorded exactly in the lake, surfaced in Dagster.

In a single-run range Dagster gives every partition of the range the same data version,
so the exact per-prefix version lives in ``_versions/<asset>.json`` (the source of truth: one
record per prefix, one object per asset, so a run reads an asset's 256 records in one request)
and in each partition's own metadata; the Dagster data version of the range is the Merkle root
over the range's prefix versions (for one prefix, its exact version).
"""

from __future__ import annotations

import random
import time

import dagster as dg

from workloads.layout import versions_key
from workloads.planning import asset_records, tagged_records
from workloads.versions import HASH_PREFIXES, canonical_json, merkle_root

SWAP_ATTEMPTS = 50


def prefix_records(lake, asset: str, prefixes: list[str]) -> dict[str, dict]:
    """The recorded ``_versions`` of ``asset`` for ``prefixes`` (absent: never materialised)."""
    records = asset_records(lake, asset)
    return {p: records[p] for p in prefixes if p in records}


def read_prefix_versions(lake, asset: str) -> dict[str, str]:
    """``{prefix: data version}`` for every prefix of ``asset`` recorded in the lake."""
    return {p: rec["data_version"] for p, rec in asset_records(lake, asset).items()}


def lake_merkle_root(lake, asset: str) -> tuple[str, dict[str, str]]:
    """Merkle root over all 256 prefixes of ``asset`` (unmaterialised ones count as missing)."""
    versions = read_prefix_versions(lake, asset)
    full = {p: versions.get(p, "missing") for p in HASH_PREFIXES}
    return merkle_root(full), versions


def write_prefix_records(lake, asset: str, stats: dict[str, dict]) -> None:
    """Set the records of the prefixes of ``stats`` in ``_versions/<asset>.json``, the others
    kept. A compare-and-swap: when another run (another range of the same asset) updated the
    object since it was read, it is read again and the records merged again, never overwritten."""
    if not stats:
        return
    updates = {p: {"prefix": p, **rec} for p, rec in stats.items()}
    for attempt in range(SWAP_ATTEMPTS):
        current, tag = tagged_records(lake, asset)
        if lake.put_if_match(
            versions_key(asset), canonical_json({"prefixes": {**current, **updates}}), tag
        ):
            return
        time.sleep(
            random.uniform(0, 0.01 * (attempt + 1))
        )  # jittered: swappers that collide spread out
    raise RuntimeError(
        f"{versions_key(asset)}: changed by another writer {SWAP_ATTEMPTS} times in a row while this run updated it"
    )


def version_record(result: dict, drop: tuple[str, ...] = (), inputs: dict | None = None) -> dict:
    """A task's result record as its prefix's version record: without the request counts and the
    fields in ``drop``, with the input versions it was built from."""
    rec = {k: v for k, v in result.items() if k != "requests" and k not in drop}
    return rec if inputs is None else {**rec, "inputs": inputs}


def record_prefixes(
    context: dg.AssetExecutionContext,
    lake,
    asset_key: dg.AssetKey,
    stats: dict[str, dict],
    summary_keys: tuple[str, ...],
    changed: set[str] | None = None,
    metadata: dict | None = None,
) -> dg.MaterializeResult:
    """Write the records of the ``changed`` prefixes (default: all), attach each prefix's record
    to its partition, return the range's result (with the lake requests the step made)."""
    changed = set(stats) if changed is None else changed
    write_prefix_records(
        lake, asset_key.to_user_string(), {p: rec for p, rec in stats.items() if p in changed}
    )
    for prefix, rec in sorted(stats.items()):
        meta = {k: rec[k] for k in summary_keys if k in rec}
        meta["prefix_data_version"] = rec["data_version"]
        context.add_asset_metadata(meta, asset_key=asset_key, partition_key=prefix)
    versions = {p: s["data_version"] for p, s in stats.items()}
    version = next(iter(versions.values())) if len(versions) == 1 else merkle_root(versions)
    totals = {
        f"range_{k}": sum(int(s.get(k, 0)) for s in stats.values())
        for k in summary_keys
        if all(isinstance(s.get(k, 0), int) for s in stats.values())
    }
    totals["prefixes_in_run"] = len(stats)
    totals["prefixes_with_work"] = len(changed)
    return dg.MaterializeResult(
        asset_key=asset_key,
        metadata={**totals, **(metadata or {})},
        data_version=dg.DataVersion(version),
    )


def md_table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` (the Dagster UI renders it in the metadata panel)."""
    if not rows:
        return "(none)"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows
    ]
    return "\n".join(lines)


def picture(title: str, png: bytes) -> dg.MetadataValue:
    """A PNG shown in the Dagster UI's metadata panel (Markdown with the image inline)."""
    import base64

    return dg.MetadataValue.md(
        f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"
    )


def request_metadata(orchestrator: dict[str, int], workers: list[dict]) -> dict:
    """The step's lake requests and bytes, split by who made them: this process (records only)
    and the workload tasks (summed from their result records)."""
    summed: dict[str, int] = {}
    for r in workers:
        for k, v in r.get("requests", {}).items():
            summed[k] = summed.get(k, 0) + v
    requests = lambda c: sum(v for k, v in c.items() if not k.startswith("bytes"))
    return {
        "lake_requests": requests(orchestrator) + requests(summed),
        "lake_requests_orchestrator": dg.MetadataValue.json(dict(sorted(orchestrator.items()))),
        "lake_requests_workers": dg.MetadataValue.json(dict(sorted(summed.items()))),
        "lake_bytes_read": orchestrator.get("bytes_read", 0) + summed.get("bytes_read", 0),
        "lake_bytes_written": orchestrator.get("bytes_written", 0) + summed.get("bytes_written", 0),
    }

"""Per-prefix data versions: recorded exactly in the lake, surfaced in Dagster.

In a single-run range Dagster gives every partition of the range the same data version,
so the exact per-prefix version lives in ``_versions/<asset>/<pp>.json`` (the source of
truth) and in each partition's own metadata; the Dagster data version of the range is
the Merkle root over the range's prefix versions (for one prefix, its exact version).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import dagster as dg

from workloads.lake import get_many
from workloads.versions import HASH_PREFIXES, merkle_root


def version_key(asset: str, prefix: str) -> str:
    return f"_versions/{asset}/{prefix}.json"


def read_records(lake, keys: dict[str, str]) -> dict[str, dict]:
    """``{name: JSON record}`` of the records at ``{name: key}`` that exist, read 16 at a time."""
    return get_many(lake, keys)


def prefix_records(lake, asset: str, prefixes: list[str]) -> dict[str, dict]:
    """The recorded ``_versions`` of ``asset`` for ``prefixes`` (absent: never materialised)."""
    return read_records(lake, {p: version_key(asset, p) for p in prefixes})


def read_prefix_versions(lake, asset: str) -> dict[str, str]:
    """``{prefix: data version}`` for every prefix of ``asset`` recorded in the lake."""
    out = {}
    for o in lake.list(f"_versions/{asset}/"):
        rec = json.loads(lake.get(o.key))
        out[rec["prefix"]] = rec["data_version"]
    return out


def lake_merkle_root(lake, asset: str) -> tuple[str, dict[str, str]]:
    """Merkle root over all 256 prefixes of ``asset`` (unmaterialised ones count as missing)."""
    versions = read_prefix_versions(lake, asset)
    full = {p: versions.get(p, "missing") for p in HASH_PREFIXES}
    return merkle_root(full), versions


def write_prefix_records(lake, asset: str, stats: dict[str, dict]) -> None:
    """``_versions/<asset>/<pp>.json`` for each prefix of ``stats``."""
    records = {version_key(asset, p): json.dumps({"prefix": p, **rec}, sort_keys=True).encode() for p, rec in stats.items()}
    with ThreadPoolExecutor(16) as pool:  # each put waits on its own fsync: overlap them
        list(pool.map(lambda item: lake.put(*item), records.items()))


def record_prefixes(context: dg.AssetExecutionContext, lake, asset_key: dg.AssetKey, stats: dict[str, dict], summary_keys: tuple[str, ...],
                    changed: set[str] | None = None, metadata: dict | None = None) -> dg.MaterializeResult:
    """Write the records of the ``changed`` prefixes (default: all), attach each prefix's record
    to its partition, return the range's result (with the lake requests the step made)."""
    changed = set(stats) if changed is None else changed
    write_prefix_records(lake, asset_key.to_user_string(), {p: rec for p, rec in stats.items() if p in changed})
    for prefix, rec in sorted(stats.items()):
        meta = {k: rec[k] for k in summary_keys if k in rec}
        meta["prefix_data_version"] = rec["data_version"]
        context.add_asset_metadata(meta, asset_key=asset_key, partition_key=prefix)
    versions = {p: s["data_version"] for p, s in stats.items()}
    version = next(iter(versions.values())) if len(versions) == 1 else merkle_root(versions)
    totals = {f"range_{k}": sum(int(s.get(k, 0)) for s in stats.values()) for k in summary_keys if all(isinstance(s.get(k, 0), int) for s in stats.values())}
    totals["prefixes_in_run"] = len(stats)
    totals["prefixes_with_work"] = len(changed)
    return dg.MaterializeResult(asset_key=asset_key, metadata={**totals, **(metadata or {})}, data_version=dg.DataVersion(version))


def request_metadata(orchestrator: dict[str, int], workers: list[dict]) -> dict:
    """The step's lake requests and bytes, split by who made them: this process (records only)
    and the workload tasks (summed from their result records)."""
    summed: dict[str, int] = {}
    for r in workers:
        for k, v in r.get("requests", {}).items():
            summed[k] = summed.get(k, 0) + v
    requests = lambda c: sum(v for k, v in c.items() if not k.startswith("bytes"))  # noqa: E731
    return {
        "lake_requests": requests(orchestrator) + requests(summed),
        "lake_requests_orchestrator": dg.MetadataValue.json(dict(sorted(orchestrator.items()))),
        "lake_requests_workers": dg.MetadataValue.json(dict(sorted(summed.items()))),
        "lake_bytes_read": orchestrator.get("bytes_read", 0) + summed.get("bytes_read", 0),
        "lake_bytes_written": orchestrator.get("bytes_written", 0) + summed.get("bytes_written", 0),
    }

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

from workloads.versions import HASH_PREFIXES, merkle_root


def version_key(asset: str, prefix: str) -> str:
    return f"_versions/{asset}/{prefix}.json"


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


def record_prefixes(context: dg.AssetExecutionContext, lake, asset_key: dg.AssetKey, stats: dict[str, dict], summary_keys: tuple[str, ...]) -> dg.MaterializeResult:
    """Write each prefix's record, attach it to that partition, return the range's result."""
    asset = asset_key.to_user_string()
    records = {version_key(asset, p): json.dumps({"prefix": p, **rec}, sort_keys=True).encode() for p, rec in stats.items()}
    with ThreadPoolExecutor(16) as pool:  # each put waits on its own fsync: overlap them
        list(pool.map(lambda item: lake.put(*item), records.items()))
    for prefix, rec in sorted(stats.items()):
        meta = {k: rec[k] for k in summary_keys if k in rec}
        meta["prefix_data_version"] = rec["data_version"]
        context.add_asset_metadata(meta, asset_key=asset_key, partition_key=prefix)
    versions = {p: s["data_version"] for p, s in stats.items()}
    version = next(iter(versions.values())) if len(versions) == 1 else merkle_root(versions)
    totals = {f"range_{k}": sum(int(s.get(k, 0)) for s in stats.values()) for k in summary_keys if all(isinstance(s.get(k, 0), int) for s in stats.values())}
    totals["prefixes_in_run"] = len(stats)
    return dg.MaterializeResult(asset_key=asset_key, metadata=totals, data_version=dg.DataVersion(version))

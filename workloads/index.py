"""Per-prefix index of originals, merged from every committed pack's manifest."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from workloads.images import raw_index_key
from workloads.ingest import BOX_TYPE, pack_keys
from workloads.lake import read_parquet, write_parquet
from workloads.versions import canonical_json, prefix_version

INDEX_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("ext", pa.string()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.string()),
        ("label_source", pa.string()),
        ("packs", pa.list_(pa.string())),
        ("members", pa.list_(pa.string())),
        ("boxes", pa.list_(BOX_TYPE)),
    ]
)


def _label_rank(source: str | None) -> int:
    """An explicit label (labels.csv, COCO) beats a folder name, which beats none."""
    return {None: 0, "folder": 1}.get(source, 2)


def committed_packs(lake) -> list[str]:
    """Packs whose ingest finished (``pack.json`` is the commit marker)."""
    return sorted(k.split("/")[1] for k in lake.keys("packs/") if k.endswith("/pack.json"))


def build_raw_index(lake, prefixes: list[str], packs: list[str] | None = None) -> dict[str, dict]:
    """Rewrite ``index/raw/<pp>.parquet`` for ``prefixes``; returns per-prefix stats.

    An image seen in several packs (or members) is one row listing them all; its label is
    the most explicit one (labels.csv/COCO over folder), first by pack id then member name,
    so the result does not depend on ingest order.
    """
    packs = committed_packs(lake) if packs is None else packs
    wanted = pa.array(sorted(set(prefixes)))
    by_sha: dict[str, dict] = {}
    for pack_id in packs:
        manifest = read_parquet(lake, pack_keys(pack_id)["manifest"])
        manifest = manifest.filter(pc.is_in(manifest["prefix"], wanted))
        for r in manifest.to_pylist():
            row = by_sha.get(r["sha256"])
            if row is None:
                by_sha[r["sha256"]] = {
                    **{k: r[k] for k in ("sha256", "ext", "format", "bytes", "width", "height", "label", "label_source", "boxes")},
                    "prefix": r["prefix"],
                    "packs": [pack_id],
                    "members": [f"{pack_id}/{r['member']}"],
                }
                continue
            if pack_id not in row["packs"]:
                row["packs"].append(pack_id)
            row["members"].append(f"{pack_id}/{r['member']}")
            if _label_rank(r["label_source"]) > _label_rank(row["label_source"]):
                row["label"], row["label_source"] = r["label"], r["label_source"]
            if not row["boxes"] and r["boxes"]:
                row["boxes"] = r["boxes"]
    grouped: dict[str, list[dict]] = {}
    for r in by_sha.values():
        grouped.setdefault(r.pop("prefix"), []).append(r)
    stats = {}
    for prefix in sorted(set(prefixes)):
        rows = sorted(grouped.get(prefix, []), key=lambda r: r["sha256"])
        for r in rows:
            r["members"] = sorted(r["members"])
        key = raw_index_key(prefix)
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        version = prefix_version([canonical_json(r) for r in rows], "raw")
        if rows or lake.exists(key):
            write_parquet(lake, key, table)
        labels: dict[str, int] = {}
        for r in rows:
            labels[r["label"] or "(none)"] = labels.get(r["label"] or "(none)", 0) + 1
        stats[prefix] = {"images": len(rows), "bytes": sum(r["bytes"] for r in rows), "labels": labels, "data_version": version}
    return stats

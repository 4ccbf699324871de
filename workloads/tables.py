"""The queryable tables, one Parquet file per hash prefix (hive layout ``prefix=<pp>``).

``images``: one row per stored original. ``objects``: one row per annotated box.
"""

from __future__ import annotations

import pyarrow as pa

from workloads.images import ImageParams, output_dir, output_key, raw_index_key, read_hashes
from workloads.lake import read_parquet, write_parquet
from workloads.versions import canonical_json, prefix_version, split_for

IMAGES_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("pack_id", pa.string()),
        ("member", pa.string()),
        ("packs", pa.list_(pa.string())),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
        ("split", pa.string()),
        ("original_key", pa.string()),
        ("resized_key", pa.string()),
        ("edges_key", pa.string()),
        ("resized_sha256", pa.string()),
        ("edges_sha256", pa.string()),
        ("boxes", pa.int32()),
    ]
)
OBJECTS_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("box", pa.int32()),
        ("category", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("w", pa.float64()),
        ("h", pa.float64()),
        ("label", pa.string()),
        ("split", pa.string()),
    ]
)
TABLES = {"images": IMAGES_SCHEMA, "objects": OBJECTS_SCHEMA}


def table_key(table: str, prefix: str) -> str:
    return f"tables/{table}/prefix={prefix}/part-0.parquet"


def build_prefix_rows(lake, prefix: str, params: ImageParams) -> tuple[list[dict], list[dict]]:
    key = raw_index_key(prefix)
    raw = read_parquet(lake, key).to_pylist() if lake.exists(key) else []
    have = {
        stage: set(lake.keys(output_dir(stage, params, prefix))) for stage in ("resize", "edges")
    }
    hashes = {stage: read_hashes(lake, stage, params, prefix) for stage in ("resize", "edges")}
    images, objects = [], []
    for r in raw:
        sha = r["sha256"]
        split = split_for(sha)
        resized = output_key("resize", params, prefix, sha)
        edges = output_key("edges", params, prefix, sha)
        images.append(
            {
                "sha256": sha,
                "pack_id": r["packs"][0],
                # index members are "<pack>/<member>"; the table keeps the member within pack_id
                "member": next(m for m in r["members"] if m.startswith(r["packs"][0] + "/"))[len(r["packs"][0]) + 1 :],
                "packs": r["packs"],
                "label": r["label"],
                "width": r["width"],
                "height": r["height"],
                "format": r["format"],
                "bytes": r["bytes"],
                "split": split,
                "original_key": f"raw/{prefix}/{sha}.{r['ext']}",
                "resized_key": resized if resized in have["resize"] else None,
                "edges_key": edges if edges in have["edges"] else None,
                "resized_sha256": hashes["resize"].get(sha) if resized in have["resize"] else None,
                "edges_sha256": hashes["edges"].get(sha) if edges in have["edges"] else None,
                "boxes": len(r["boxes"]),
            }
        )
        for i, b in enumerate(r["boxes"]):
            objects.append({"sha256": sha, "box": i, **b, "label": r["label"], "split": split})
    return images, objects


def write_prefix_tables(lake, prefix: str, params: ImageParams) -> dict:
    """Write both tables for one prefix; returns counts and the prefix's data version."""
    images, objects = build_prefix_rows(lake, prefix, params)
    for name, rows in (("images", images), ("objects", objects)):
        key = table_key(name, prefix)
        if rows:
            write_parquet(lake, key, pa.Table.from_pylist(rows, schema=TABLES[name]))
        elif lake.exists(key):
            lake.delete(key)
    version = prefix_version([canonical_json(r) for r in images + objects], "tables")
    missing = sum(1 for r in images if r["resized_key"] is None or r["edges_key"] is None)
    return {"images": len(images), "objects": len(objects), "missing_variants": missing, "data_version": version}

"""The queryable tables, one Parquet object per hash prefix and table (hive layout ``prefix=<pp>``),
kept up to date by delta from the index step's change markers.

``images``: one row per stored original. ``objects``: one row per annotated box.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from workloads.images import ImageParams, hashes_key, output_key, raw_index_key
from workloads.index import PENDING_TABLES
from workloads.lake import get_json, read_parquet, write_parquet
from workloads.versions import sha256_hex, split_for, table_hash

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


def tables_state_key(prefix: str) -> str:
    """What the prefix's tables were built from: params ids, rows, rows missing a variant."""
    return f"index/tables/{prefix}.json"


def _hashes_of(lake, stage: str, params: ImageParams, prefix: str, shas: pa.Array) -> dict[str, str]:
    """The hash index of ``stage`` for just ``shas`` (filtered in Arrow, not as Python rows)."""
    key = hashes_key(stage, params, prefix)
    if not lake.exists(key):
        return {}
    t = read_parquet(lake, key)
    t = t.filter(pc.is_in(t["sha256"], value_set=shas))
    return dict(zip(t["sha256"].to_pylist(), t["output_sha256"].to_pylist()))


def rows_of(raw: list[dict], prefix: str, params: ImageParams, hashes: dict[str, dict[str, str]]) -> tuple[list[dict], list[dict]]:
    """``images`` and ``objects`` rows of raw index rows; a variant is listed when its hash index
    has it (the record of what is done)."""
    images, objects = [], []
    for r in raw:
        sha = r["sha256"]
        split = split_for(sha)
        resized, edges = hashes["resize"].get(sha), hashes["edges"].get(sha)
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
                "resized_key": output_key("resize", params, prefix, sha) if resized else None,
                "edges_key": output_key("edges", params, prefix, sha) if edges else None,
                "resized_sha256": resized,
                "edges_sha256": edges,
                "boxes": len(r["boxes"]),
            }
        )
        for i, b in enumerate(r["boxes"]):
            objects.append({"sha256": sha, "box": i, **b, "label": r["label"], "split": split})
    return images, objects


def tables_version(images: pa.Table, objects: pa.Table) -> str:
    """The prefix's exact data version: a hash of both tables' rows (Arrow's CSV writer, so it
    costs milliseconds per thousand rows)."""
    return sha256_hex((table_hash(images) + table_hash(objects)).encode())[:24]


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))


def pending_table_changes(lake, prefix: str) -> tuple[list[str], set[str]]:
    """(marker keys, sha256s) of the rows the index step changed since the tables absorbed them."""
    keys = [k for k in lake.keys(f"{PENDING_TABLES}{prefix}/") if k.endswith(".json")]
    return keys, {s for k in keys for s in json.loads(lake.get(k))["sha256"]}


def commit_prefix_tables(lake, prefix: str, params: ImageParams, images: pa.Table, objects: pa.Table, markers: list[str]) -> dict:
    """Put the prefix's tables (one object each: a reader sees all of a prefix's rows or the
    previous ones), then its state, then drop the change markers it absorbed."""
    for name, table in (("images", images), ("objects", objects)):
        key = table_key(name, prefix)
        if table.num_rows:
            write_parquet(lake, key, table)
        elif lake.exists(key):
            lake.delete(key)
    missing = pc.filter(images["sha256"], pc.or_(pc.is_null(images["resized_key"]), pc.is_null(images["edges_key"]))).to_pylist()
    stats = {"images": images.num_rows, "objects": objects.num_rows, "missing_variants": len(missing), "data_version": tables_version(images, objects)}
    state = {**stats, "missing": sorted(missing), "params": {"resize": params.resize_id, "edges": params.edges_id}}
    lake.put(tables_state_key(prefix), json.dumps(state, sort_keys=True).encode())
    for k in markers:
        lake.delete(k)
    return stats


def empty_tables_stats() -> dict:
    """What ``write_prefix_tables`` gives a prefix with no images."""
    return {"images": 0, "objects": 0, "missing_variants": 0, "data_version": tables_version(IMAGES_SCHEMA.empty_table(), OBJECTS_SCHEMA.empty_table())}


def write_prefix_tables(lake, prefix: str, params: ImageParams) -> dict:
    """Bring both tables of one prefix up to date; returns counts and the prefix's data version.

    By delta: only the rows the index step changed (its markers) and rows still missing a variant
    become Python rows; the rest of the prefix's rows stay in Arrow. Nothing changed: one listing
    and one small read. New image parameters (or no state yet): the prefix is rebuilt."""
    state = get_json(lake, tables_state_key(prefix))
    markers, changed = pending_table_changes(lake, prefix)
    full = state is None or state["params"] != {"resize": params.resize_id, "edges": params.edges_id}
    if not full and not changed and not state["missing"]:
        return {k: state[k] for k in ("images", "objects", "missing_variants", "data_version")}
    key = raw_index_key(prefix)
    raw = read_parquet(lake, key) if lake.exists(key) else pa.table({"sha256": pa.array([], pa.string())})
    if full:
        delta = raw["sha256"]
        keep = {name: TABLES[name].empty_table() for name in TABLES}
    else:
        delta = pa.array(sorted(changed | set(state["missing"])), pa.string())
        keep = {}
        for name in TABLES:
            tk = table_key(name, prefix)
            old = read_parquet(lake, tk).select(TABLES[name].names).cast(TABLES[name]) if lake.exists(tk) else TABLES[name].empty_table()
            keep[name] = old.filter(pc.invert(pc.is_in(old["sha256"], value_set=delta)))
    rows = raw.filter(pc.is_in(raw["sha256"], value_set=delta)).to_pylist() if raw.num_rows else []
    hashes = {stage: _hashes_of(lake, stage, params, prefix, delta) for stage in ("resize", "edges")}
    new_images, new_objects = rows_of(rows, prefix, params, hashes)
    images = _sorted(pa.concat_tables([keep["images"], pa.Table.from_pylist(new_images, schema=IMAGES_SCHEMA)]), ["sha256"])
    objects = _sorted(pa.concat_tables([keep["objects"], pa.Table.from_pylist(new_objects, schema=OBJECTS_SCHEMA)]), ["sha256", "box"])
    return commit_prefix_tables(lake, prefix, params, images, objects, markers)


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.tables --lake URL --run-id R [params] --prefixes 00,01``: bring each
    prefix's tables up to date; ``_results/<run>/tables/<pp>.json`` records counts and version."""
    from workloads.images import add_params_args, params_from_args
    from workloads.tasks import prefix_parser, run_prefix_tasks

    ap = prefix_parser("update the images / objects tables of prefixes")
    add_params_args(ap)
    args = ap.parse_args(argv)
    params = params_from_args(args)
    return run_prefix_tasks(args, "tables", lambda lake, prefix: write_prefix_tables(lake, prefix, params))


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Freezing a subset over a 1,000,000-row ``images`` table, through ``Datasets().freeze_dataset``.

The table is generated straight into a scratch lake (``tables/images/prefix=<pp>/part-0.parquet``,
256 files, ``workloads.tables.IMAGES_SCHEMA``, written by the project's ``write_parquet``), with
the per-prefix version records the image assets leave (``_versions/<asset>/<pp>.json``) and the
variant directories, so every lookup the freeze makes walks real paths. Nothing else exists:
no Dagster history, no image files (the ``manifest_intact`` check counts them as missing, which
costs the same lookups as finding them).

After the timed freeze, the same steps the ``frozen_subsets`` asset runs are timed one by one
(outside Dagster) to show where the time goes.

    python -m bench.freeze --home DIR --rows 1000000      # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LABELS = ("airplane", "bird", "car", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PACKS = ("pack_a", "pack_b", "pack_c", "pack_d")
MAIN_SQL = "SELECT * FROM images WHERE label IS NOT NULL"
SELECTIVE_SQL = "SELECT * FROM images WHERE label = 'cat'"


def generate(lake, rows: int, seed: int = 0) -> dict:
    """``rows`` image rows over the 256 prefixes, as the image_tables asset lays them out."""
    from workloads.images import ImageParams, output_dir
    from workloads.kernels import ResizeParams
    from workloads.lake import write_parquet
    from workloads.tables import IMAGES_SCHEMA, table_key
    from workloads.versions import HASH_PREFIXES, prefix_version

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    raw = rng.bytes(32 * rows)
    hexes = np.frombuffer(raw.hex().encode(), dtype="S64")
    order = np.argsort(hexes)
    hexes = hexes[order]
    sha = pa.array(hexes.astype("U64"))
    first4 = np.frombuffer(raw, dtype=">u4").reshape(rows, 8)[order, 0]
    split_bucket = first4.astype(np.int64) % 100  # = int(sha[:8], 16) % 100 (workloads.versions.split_for)
    split = np.where(split_bucket < 80, "train", np.where(split_bucket < 90, "val", "test"))
    pack_idx = rng.integers(0, len(PACKS), rows)
    label_idx = rng.integers(0, len(LABELS), rows)
    labelled = rng.random(rows) >= 0.05  # 5% unlabelled
    width = rng.choice(np.array([640, 800, 1024, 1280, 3000], np.int32), rows)
    height = (width * 3 // 4).astype(np.int32)
    nbytes = (width.astype(np.int64) * height * 0.25).astype(np.int64)
    params = ImageParams(ResizeParams(int(os.environ.get("CVGRAPH_IMAGE_SIZE", "64"))))
    prefix = pc.utf8_slice_codeunits(sha, 0, 2)
    pack = pa.array(np.array(PACKS)[pack_idx])
    label_str = np.array(LABELS)[label_idx]
    label = pa.array(label_str, mask=~labelled)
    member = pc.binary_join_element_wise(pa.array(label_str), pa.array(np.char.mod("img_%07d.jpg", np.arange(rows))), "/")
    rid, eid = params.resize_id, params.edges_id
    columns = {
        "sha256": sha,
        "pack_id": pack,
        "member": member,
        "packs": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), pack),
        "label": label,
        "width": pa.array(width),
        "height": pa.array(height),
        "format": pa.array(["JPEG"] * rows),
        "bytes": pa.array(nbytes),
        "split": pa.array(split),
        "original_key": pc.binary_join_element_wise("raw", prefix, pc.binary_join_element_wise(sha, "jpg", "."), "/"),
        "resized_key": pc.binary_join_element_wise("resized", rid, prefix, pc.binary_join_element_wise(sha, "jpg", "."), "/"),
        "edges_key": pc.binary_join_element_wise("edges", eid, prefix, pc.binary_join_element_wise(sha, "png", "."), "/"),
        "boxes": pa.array(np.zeros(rows, np.int32)),
    }
    # Columns the schema has beyond these (it evolves): content hashes get hashes, the rest a zero value.
    for f in IMAGES_SCHEMA:
        if f.name in columns:
            continue
        if f.name.endswith("sha256") and pa.types.is_string(f.type):
            columns[f.name] = pa.array(np.frombuffer(rng.bytes(32 * rows).hex().encode(), dtype="S64").astype("U64"))
        elif pa.types.is_string(f.type):
            columns[f.name] = pa.array([""] * rows)
        elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
            columns[f.name] = pa.array(np.zeros(rows), type=f.type)
        else:
            columns[f.name] = pa.nulls(rows, type=f.type)
    table = pa.table({f.name: columns[f.name] for f in IMAGES_SCHEMA}, schema=IMAGES_SCHEMA)
    t1 = time.perf_counter()
    firsts = hexes.astype("S2")  # sorted, so each prefix is one contiguous slice
    keys = np.array([p.encode() for p in HASH_PREFIXES], dtype="S2")
    starts, ends = np.searchsorted(firsts, keys, side="left"), np.searchsorted(firsts, keys, side="right")
    for p, a, b in zip(HASH_PREFIXES, starts, ends):
        part = table.slice(int(a), int(b - a))
        write_parquet(lake, table_key("images", p), part)
        for asset in ("raw_images", "resized_images", "edge_maps", "image_tables"):
            rec = {"prefix": p, "images": part.num_rows, "data_version": prefix_version(part["sha256"].to_pylist()[:16], asset)}
            lake.put(f"_versions/{asset}/{p}.json", json.dumps(rec, sort_keys=True).encode())
        for stage in ("resize", "edges"):
            (lake.root / output_dir(stage, params, p)).mkdir(parents=True, exist_ok=True)
    t2 = time.perf_counter()
    return {"rows": rows, "build_s": round(t1 - t0, 2), "write_s": round(t2 - t1, 2),
            "table_mb": round(sum(f.stat().st_size for f in (lake.root / "tables").rglob("*.parquet")) / 1e6, 1)}


def phases(ds, sql: str, check_sample: int = 100_000) -> dict:
    """The frozen_subsets asset's steps, timed one by one outside Dagster (same functions)."""
    from collections import Counter

    from assets.subsets import PREFIX_ASSETS, _packs_of, _plot_labels, query_manifest
    from assets.versioning import lake_merkle_root, read_prefix_versions
    from workloads.lake import read_parquet, write_parquet
    from workloads.versions import table_hash

    store = ds.lake
    catalog = ds._resources["catalog"]
    out: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        out[name] = round(time.perf_counter() - t, 3)
        return value

    manifest = timed("query (DuckDB over 256 files, sort by sha256)", lambda: query_manifest(catalog, sql))
    timed("merkle root + prefix versions (1,280 small reads)", lambda: (lake_merkle_root(store, "image_tables"), {a: read_prefix_versions(store, a) for a in PREFIX_ASSETS}))
    rows = timed("manifest rows to Python dicts (labels, splits)", lambda: manifest.select(["prefix", "label", "split"]).to_pylist())
    timed("label and split counts (Python)", lambda: (Counter(str(r["label"]) for r in rows), Counter(r["split"] for r in rows)))
    key = f"phase_probe_{time.time_ns()}"
    timed("write manifest parquet", lambda: write_parquet(store, f"subsets/{key}/manifest.parquet", manifest))
    timed("table_hash(manifest) (rows as JSON, in Python)", lambda: table_hash(manifest))
    timed("packs of the subset (Python)", lambda: _packs_of(manifest))
    timed("label plot (matplotlib)", lambda: _plot_labels(store, key, dict(Counter(str(r["label"]) for r in rows))))

    # The check does one exists() per variant file: time it on a sample, scale to the subset.
    sample = min(manifest.num_rows, check_sample)
    keys_sample = manifest.slice(0, sample).select(["resized_key", "edges_key"]).to_pylist()

    def check():
        return sum(1 for r in keys_sample for k in (r["resized_key"], r["edges_key"]) if not k or not store.exists(k))

    timed("manifest_intact check: exists() per variant file", check)
    out["manifest_intact check: exists() per variant file"] = round(out["manifest_intact check: exists() per variant file"] * manifest.num_rows / max(sample, 1), 3)
    timed("manifest_intact check: read manifest", lambda: read_parquet(store, f"subsets/{key}/manifest.parquet").select(["resized_key", "edges_key"]).to_pylist())
    return {"rows": manifest.num_rows, "steps_s": out, "exists_check_sampled_rows": sample}


def run(home: Path, rows: int, breakdown: bool) -> dict:
    from workloads.lake import LocalLake

    lake = LocalLake(home / "lake")
    gen = generate(lake, rows)
    t0 = time.perf_counter()
    from cvgraph import Datasets

    ds = Datasets()
    t1 = time.perf_counter()
    ds.freeze_dataset("warmup", "SELECT * FROM images WHERE sha256 < '0010'")  # one-time imports and instance setup
    t2 = time.perf_counter()
    rec = ds.freeze_dataset("big", MAIN_SQL)
    t3 = time.perf_counter()
    sel = ds.freeze_dataset("selective", SELECTIVE_SQL)
    t4 = time.perf_counter()
    out = {"table": gen, "sql": MAIN_SQL, "subset_rows": rec["rows"], "freeze_s": round(t3 - t2, 3),
           "selective": {"sql": SELECTIVE_SQL, "rows": sel["rows"], "freeze_s": round(t4 - t3, 3)},
           "sdk_import_s": round(t1 - t0, 3), "first_freeze_small_s": round(t2 - t1, 3)}
    if breakdown:
        try:
            out["breakdown"] = phases(ds, MAIN_SQL)
            out["breakdown"]["sum_s"] = round(sum(out["breakdown"]["steps_s"].values()), 3)
        except Exception as e:  # the asset's internals moved: the headline number still stands
            out["breakdown"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--no-breakdown", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(run(Path(args.home), args.rows, not args.no_breakdown)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Freezing a subset over a 1,000,000-row ``images`` table, through ``Datasets().freeze_dataset``.

The table is generated straight into a scratch lake (``tables/images/prefix=<pp>/part-0.parquet`` and its state,
256 files, ``workloads.tables.IMAGES_SCHEMA``, written by the project's ``write_parquet``), with
the per-prefix version records the image assets leave (``_versions/<asset>/<pp>.json``) and the
variant directories. The big subset is frozen first with the variant files absent, then (an
empty file for each of the 2 M resized/edges keys created, about two minutes) again under a
new key with them present, as in a lake the image stages made: the ``manifest_intact`` check
lists them. That second figure is the measurement.

After the timed freezes, the big one is repeated under cProfile (a new key) to show where the
time goes, whatever the ``frozen_subsets`` asset does at the time.

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
    from assets.subsets import PREFIX_ASSETS
    from assets.versioning import write_prefix_records
    from workloads.image_params import ImageParams
    from workloads.kernels import ResizeParams
    from workloads.lake import write_parquet
    from workloads.layout import output_dir, part_key, tables_state_key
    from workloads.table_rows import IMAGES_SCHEMA
    from workloads.versions import HASH_PREFIXES, prefix_version

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    raw = rng.bytes(32 * rows)
    hexes = np.frombuffer(raw.hex().encode(), dtype="S64")
    order = np.argsort(hexes)
    hexes = hexes[order]
    sha = pa.array(hexes.astype("U64"))
    first4 = np.frombuffer(raw, dtype=">u4").reshape(rows, 8)[order, 0]
    split_bucket = (
        first4.astype(np.int64) % 100
    )  # = int(sha[:8], 16) % 100 (workloads.versions.split_for)
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
    member = pc.binary_join_element_wise(
        pa.array(label_str), pa.array(np.char.mod("img_%07d.jpg", np.arange(rows))), "/"
    )
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
        "original_key": pc.binary_join_element_wise(
            "raw", prefix, pc.binary_join_element_wise(sha, "jpg", "."), "/"
        ),
        "resized_key": pc.binary_join_element_wise(
            "resized", rid, prefix, pc.binary_join_element_wise(sha, "jpg", "."), "/"
        ),
        "edges_key": pc.binary_join_element_wise(
            "edges", eid, prefix, pc.binary_join_element_wise(sha, "png", "."), "/"
        ),
        "boxes": pa.array(np.zeros(rows, np.int32)),
    }
    # Columns the schema has beyond these (it evolves): content hashes get hashes, the rest a zero value.
    for f in IMAGES_SCHEMA:
        if f.name in columns:
            continue
        if f.name.endswith("sha256") and pa.types.is_string(f.type):
            columns[f.name] = pa.array(
                np.frombuffer(rng.bytes(32 * rows).hex().encode(), dtype="S64").astype("U64")
            )
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
    starts, ends = (
        np.searchsorted(firsts, keys, side="left"),
        np.searchsorted(firsts, keys, side="right"),
    )
    records: dict[str, dict[str, dict]] = {asset: {} for asset in PREFIX_ASSETS}
    for p, a, b in zip(HASH_PREFIXES, starts, ends):
        part = table.slice(int(a), int(b - a))
        # one part per prefix (as a compacted prefix has) and the state naming it
        write_parquet(lake, part_key("images", p, "0"), part)
        lake.put(tables_state_key(p), json.dumps({"images": part.num_rows, "objects": 0}).encode())
        for asset in PREFIX_ASSETS:
            records[asset][p] = {
                "images": part.num_rows,
                "data_version": prefix_version(part["sha256"].to_pylist()[:16], asset),
            }
        for stage in ("resize", "edges"):
            (lake.root / output_dir(stage, params, p)).mkdir(parents=True, exist_ok=True)
    for asset, recs in records.items():
        write_prefix_records(lake, asset, recs)
    t2 = time.perf_counter()
    return {
        "rows": rows,
        "build_s": round(t1 - t0, 2),
        "write_s": round(t2 - t1, 2),
        "table_mb": round(
            sum(f.stat().st_size for f in (lake.root / "tables").rglob("*.parquet")) / 1e6, 1
        ),
    }


def profile_freeze(ds, sql: str, key: str = "big_profiled", top: int = 12) -> dict:
    """Freeze ``sql`` again under a new key with cProfile on, and report where the time goes:
    the project's functions (assets/, workloads/, resources/) by cumulative time (whatever the
    asset does today) and the hottest
    functions by own time. The profiler inflates Python-heavy steps; the unprofiled freeze above
    is the measurement, this is the map."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    try:
        ds.freeze_dataset(key, sql, allow_pending=True)
    finally:
        prof.disable()
    wall = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    repo = str(Path(__file__).resolve().parent.parent) + "/"
    ours, hot = [], []
    for (file, line, func), (_cc, nc, tottime, cumtime, _callers) in stats.items():
        where = (
            file[len(repo) :]
            if file.startswith(repo)
            else (file.rsplit("site-packages/", 1)[-1] if "site-packages/" in file else file)
        )
        name = f"{where}:{line}({func})" if line else func
        if file.startswith(repo) and where.split("/", 1)[0] in ("assets", "workloads", "resources"):
            ours.append((round(cumtime, 3), nc, name))
        hot.append((round(tottime, 3), nc, name))
    ours.sort(reverse=True)
    hot.sort(reverse=True)
    return {
        "profiled_wall_s": round(wall, 3),
        "project_functions_by_cumulative_s": [
            {"s": c, "calls": n, "function": f} for c, n, f in ours[:top]
        ],
        "hottest_by_own_time_s": [{"s": c, "calls": n, "function": f} for c, n, f in hot[:top]],
    }


def run(home: Path, rows: int, breakdown: bool) -> dict:
    from workloads.lake import LocalLake

    lake = LocalLake(home / "lake")
    gen = generate(lake, rows)
    t0 = time.perf_counter()
    from cvgraph import Datasets

    ds = Datasets()
    t1 = time.perf_counter()
    # one-time imports and instance setup; 1/128 of the rows, so even the quick table has some
    ds.freeze_dataset("warmup", "SELECT * FROM images WHERE sha256 < '02'", allow_pending=True)
    t2 = time.perf_counter()
    rec = ds.freeze_dataset("big", MAIN_SQL, allow_pending=True)
    t3 = time.perf_counter()
    sel = ds.freeze_dataset("selective", SELECTIVE_SQL, allow_pending=True)
    t4 = time.perf_counter()
    files = touch_variants(lake)
    t5 = time.perf_counter()
    present = ds.freeze_dataset("big_present", MAIN_SQL, allow_pending=True)
    t6 = time.perf_counter()
    assert present["manifest_sha256"] == rec["manifest_sha256"]  # the same rows, the same bytes
    out = {
        "table": gen,
        "sql": MAIN_SQL,
        "subset_rows": rec["rows"],
        "freeze_s": round(t6 - t5, 3),
        "variant_files": files,
        "touch_s": round(t5 - t4, 1),
        "freeze_variant_files_absent_s": round(t3 - t2, 3),
        "selective": {"sql": SELECTIVE_SQL, "rows": sel["rows"], "freeze_s": round(t4 - t3, 3)},
        "sdk_import_s": round(t1 - t0, 3),
        "first_freeze_small_s": round(t2 - t1, 3),
    }
    if breakdown:
        out["profile"] = profile_freeze(ds, MAIN_SQL)
    return out


def touch_variants(lake) -> int:
    """Create an (empty) file for every resized/edges key of the table: the lake as the image
    stages leave it."""
    from workloads.lake import read_parquet

    n = 0
    for o in lake.list("tables/images/"):
        t = read_parquet(lake, o.key).select(["resized_key", "edges_key"])
        for col in ("resized_key", "edges_key"):
            for k in t[col].to_pylist():
                if k:
                    os.close(os.open(lake.root / k, os.O_CREAT | os.O_WRONLY, 0o644))
                    n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--no-breakdown", action="store_true")
    args = ap.parse_args(argv)
    out = run(Path(args.home), args.rows, not args.no_breakdown)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

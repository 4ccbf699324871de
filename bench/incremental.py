"""A new pack into a small lake vs into a large one: what absorbing it costs as the lake grows.

Two lakes are built by the pipeline (packs of small synthetic PNGs ingested, then one ranged
Dagster run over 00..ff), a small one and one 30x larger; both are cached between bench runs
under ``$CVGRAPH_BENCH_CACHE`` (keyed by the hash of the code that writes them). Then, on a
clone of each, the same 100-image pack lands in ``incoming/`` and goes the way the daemon takes
it: the ``incoming_packs`` sensor (ingest run), then the automation conditions (one ranged run).
Measured per lake: the summed step time of those runs (Dagster's step stats), the lake requests
the steps report (their ``lake_requests`` metadata: the orchestrator's and the workers'), and the
latency from the zip's put to its rows being queryable. Once with a name that sorts after the
sensor's cursor, once with one before it.

    python -m bench.incremental build --home DIR --images N       # a lake built by the pipeline
    python -m bench.incremental absorb --home DIR --name NAME     # the new pack's run; JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, log, run_json
from workloads.layout import incoming_key

NEW_PACK = 100
PACK_SIZE = 500
SIZE = 32


def _env(home: Path) -> dict:
    return {
        "CVGRAPH_HOME": str(home),
        "CVGRAPH_PROFILE": "local",
        "CVGRAPH_WORKERS": "2",
        "CVGRAPH_IMAGE_SIZE": str(SIZE),
    }


def _pngs(seed: int, n: int):
    from bench.inputs import noise_png

    return (
        (f"noise/{seed}_{i:05d}.png", noise_png(seed * 1_000_003 + i, 24, 24)) for i in range(n)
    )


def _code_hash() -> str:
    """What the cached lakes depend on: the code that writes them."""
    h = hashlib.sha256()
    for d in ("workloads", "assets", "bench"):
        for p in sorted((REPO / d).glob("*.py")):
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def build(home: Path, images: int) -> dict:
    """Packs of PACK_SIZE images ingested, then one ranged run of the four prefix assets."""
    import dagster as dg

    from bench.inputs import write_pack
    from orchestration import runs
    from orchestration.definitions import build_defs
    from orchestration.instance import instance
    from workloads.ingest import ingest_pack
    from workloads.lake import LocalLake

    lake = LocalLake(home / "lake")
    t0 = time.perf_counter()
    for k in range(images // PACK_SIZE):
        name = f"base{k:04d}"
        write_pack(lake.root / "incoming" / f"{name}.zip", _pngs(k + 1, PACK_SIZE))
        ingest_pack(lake, name, incoming_key(name))
    defs = build_defs("local")
    inst = instance()
    inst.add_dynamic_partitions("packs", [f"base{k:04d}" for k in range(images // PACK_SIZE)])
    keys = [dg.AssetKey(k) for k in ("raw_images", "resized_images", "edge_maps", "image_tables")]
    runs.materialize(inst, keys, partition_range=("00", "ff"), definitions=defs)
    # the sensor's cursor as the daemon would have left it: after the last base pack
    runs.tick_incoming(inst, definitions=defs)
    return {
        "images": images,
        "packs": images // PACK_SIZE,
        "build_s": round(time.perf_counter() - t0, 1),
    }


def absorb(home: Path, name: str) -> dict:
    """The new pack, from its put in incoming/ to its rows being queryable, the daemon's way."""
    from bench.inputs import write_pack
    from cvgraph import Datasets
    from orchestration import runs
    from orchestration.definitions import build_defs
    from orchestration.instance import instance

    defs = build_defs("local")
    inst = instance()
    run_ids: list[str] = []
    t0 = time.perf_counter()
    write_pack(home / "lake" / "incoming" / f"{name}.zip", _pngs(999, NEW_PACK))
    ticks = 0
    while not runs.tick_incoming(
        inst, on_run=lambda _p, r: run_ids.append(r.run_id), definitions=defs
    ):
        ticks += 1  # the daemon ticks every 10 s; here back to back
        if ticks > 3:
            raise RuntimeError(f"the sensor did not see incoming/{name}.zip in {ticks} ticks")
    runs.sync(inst, on_run=lambda _k, _r, r: run_ids.append(r.run_id), definitions=defs)
    rows = (
        Datasets()
        .sql_query(f"SELECT count(*) AS n FROM images WHERE pack_id = '{name}'")
        .to_pylist()[0]["n"]
    )
    latency = time.perf_counter() - t0
    steps, requests, by_step, events = 0.0, {}, {}, 0
    for run_id in run_ids:
        events += len(
            inst.all_logs(run_id)
        )  # Dagster's bookkeeping: every event is a write to the event log
        for s in inst.get_run_step_stats(run_id):
            if s.start_time and s.end_time:
                steps += s.end_time - s.start_time
                by_step[s.step_key] = round(
                    by_step.get(s.step_key, 0) + s.end_time - s.start_time, 3
                )
        for asset, counts in run_requests(inst, run_id).items():
            requests[asset] = {m: requests.get(asset, {}).get(m, 0) + v for m, v in counts.items()}
    total = {
        m: sum(r[m] for r in requests.values())
        for m in ("lake_requests", "lake_bytes_read", "lake_bytes_written")
    }
    return {
        "name": name,
        "rows": rows,
        "latency_s": round(latency, 2),
        "sensor_ticks": ticks + 1,
        "step_s": round(steps, 2),
        "steps": by_step,
        **total,
        "by_asset": requests,
        "runs": len(run_ids),
        "dagster_events": events,
    }


def run_requests(inst, run_id: str) -> dict[str, dict[str, int]]:
    """The lake requests a run's steps report, per asset. A ranged step's result is recorded for
    every partition with the same totals: one per asset."""
    import dagster as dg

    found: dict[str, int] = {}
    for rec in inst.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records:
        mat = rec.event_log_entry.asset_materialization
        key = mat.asset_key.to_user_string()
        if "lake_requests" in mat.metadata and key not in found:
            found[key] = {
                m: mat.metadata[m].value
                for m in ("lake_requests", "lake_bytes_read", "lake_bytes_written")
            }
    return found


def bench(work: Path, small: int, large: int, cache: Path | None) -> dict:
    out = {"new_pack_images": NEW_PACK, "lakes": {}}
    for label, n in (("small", small), ("large", large)):
        src = (cache or work) / f"lake-{_code_hash()}-{n}"
        if not (src / "built.json").exists():
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            log(f"incremental: building the {label} lake ({n} images) in {src}")
            info = run_json(
                ["bench.incremental", "build", "--home", str(src), "--images", str(n)],
                extra_env=_env(src),
                drop=("DAGSTER_HOME", "CVGRAPH_LAKE_URL"),
                timeout=3600,
            )
            (src / "built.json").write_text(json.dumps(info))
        info = json.loads((src / "built.json").read_text())
        res = {"images": info["images"], "build_s": info["build_s"]}
        for order, name in (("after_cursor", "zz_new"), ("before_cursor", "aa_new")):
            home = work / f"{label}-{order}"
            shutil.rmtree(home, ignore_errors=True)
            home.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["cp", "-a", str(src), str(home)], check=True
            )  # a copy: the runs write into it
            res[order] = run_json(
                ["bench.incremental", "absorb", "--home", str(home), "--name", name],
                extra_env=_env(home),
                drop=("DAGSTER_HOME", "CVGRAPH_LAKE_URL"),
            )
            shutil.rmtree(home, ignore_errors=True)
            log(
                f"incremental: {label} lake, {order}: {res[order]['step_s']} s of steps, {res[order]['lake_requests']} requests, latency {res[order]['latency_s']} s"
            )
        out["lakes"][label] = res
    s, big = out["lakes"]["small"]["after_cursor"], out["lakes"]["large"]["after_cursor"]
    out["incremental_time_ratio"] = round(big["step_s"] / s["step_s"], 3)
    out["incremental_requests_ratio"] = round(big["lake_requests"] / s["lake_requests"], 3)
    out["requests_per_new_image"] = round(big["lake_requests"] / NEW_PACK, 2)
    moved = lambda r: r["lake_bytes_read"] + r["lake_bytes_written"]
    out["incremental_bytes_ratio"] = round(moved(big) / moved(s), 3)
    out["new_pack_latency_s"] = max(
        r[o]["latency_s"] for r in out["lakes"].values() for o in ("after_cursor", "before_cursor")
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["build", "absorb"])
    ap.add_argument("--home", required=True)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--name", default="zz_new")
    args = ap.parse_args(argv)
    home = Path(args.home)
    print(
        json.dumps(build(home, args.images) if args.mode == "build" else absorb(home, args.name)),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

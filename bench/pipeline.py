"""Orchestrated vs bare: one ranged Dagster run over 00..ff vs the workload CLI alone.

Both start from clones (hard links) of one lake into which a pack of small distinct JPEGs
was ingested. Both do the same work, so the ratio is what orchestration costs: the bare
run calls the workload the run's steps call, with nothing around it — ``python -m
workloads.chain`` (index, images and tables of each prefix in one task: what a run that selects
all four assets starts), sharded over the same worker processes, threads and environment as
``LocalProcessPool`` gives them. The orchestrated run materialises raw_images + resized_images +
edge_maps + image_tables in one ranged run (local profile, its own CVGRAPH_HOME and Dagster
instance): its index step starts the chain, the image and table steps find their work done.

    python -m bench.pipeline orchestrate --home DIR     # one Dagster run; prints JSON
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import PY, REPO, LoadMeter, env, log
from workloads.layout import incoming_key, results_dir

ASSETS = ("raw_images", "resized_images", "edge_maps", "image_tables")
PACK_ID = "bench_small"


def settings_env(home: Path, workers: int, threads: int, size: int) -> dict:
    return {
        "CVGRAPH_HOME": str(home),
        "CVGRAPH_PROFILE": "local",
        "CVGRAPH_WORKERS": str(workers),
        "CVGRAPH_IMAGE_THREADS": str(threads),
        "CVGRAPH_IMAGE_SIZE": str(size),
    }


def prepare(work: Path, n: int) -> dict:
    """A lake with ``n`` small distinct JPEGs ingested (one pack), pending for the index: both
    sides start from the ingest, as the run after a new pack does."""
    from bench.inputs import small_crops, write_pack
    from workloads.index import rebuild_raw_index
    from workloads.ingest import ingest_pack
    from workloads.lake import LocalLake
    from workloads.versions import HASH_PREFIXES

    lake_dir = work / "lake0"
    t0 = time.perf_counter()
    members = ((f"crops/crop_{i:05d}.jpg", data) for i, data in enumerate(small_crops(n)))
    pack = write_pack(lake_dir / "incoming" / f"{PACK_ID}.zip", members)
    t1 = time.perf_counter()
    lake = LocalLake(lake_dir)
    res = ingest_pack(lake, PACK_ID, incoming_key(PACK_ID))
    t2 = time.perf_counter()
    index = rebuild_raw_index(
        lake, list(HASH_PREFIXES)
    )  # written nowhere: what the runs will index
    assert res.accepted == n, f"ingest accepted {res.accepted} of {n} ({res.rejected[:3]})"
    return {
        "lake": str(lake_dir),
        "images": n,
        "pack_bytes": pack["zip_bytes"],
        "generate_s": round(t1 - t0, 2),
        "ingest_s": round(t2 - t1, 2),
        "prefixes_with_images": sum(1 for t in index.values() if t.num_rows),
        "per_prefix": {p: t.num_rows for p, t in index.items()},
    }


def clone(src: Path, dst: Path) -> None:
    """A copy that shares the (never rewritten) files: every lake write is tmp + rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def prefixes_in(rng: tuple[str, str]) -> list[str]:
    from workloads.versions import HASH_PREFIXES

    return [p for p in HASH_PREFIXES if rng[0] <= p <= rng[1]]


def _sharded(module: str, args: list[str], shards: list[list[str]]) -> list[dict]:
    """``python -m module`` once per shard, in parallel, with a worker's environment; result lines."""
    procs = [
        subprocess.Popen(
            [PY, "-m", module, *args, "--prefixes", ",".join(s)],
            cwd=REPO,
            env=env(worker=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in shards
        if s
    ]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"{module} exited {p.returncode}: {err[-2000:]}")
    return [
        json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")
    ]


def bare(
    lake: Path, workers: int, threads: int, size: int, rng: tuple[str, str] = ("00", "ff")
) -> dict:
    """The run's workload without Dagster: the chain CLI, sharded over the worker processes as
    LocalProcessPool shards it (prefixes[i::n])."""
    from orchestration.profiles import image_settings

    prefixes = prefixes_in(rng)
    shards = [prefixes[i::workers] for i in range(workers)]
    meter = LoadMeter(children=True)
    t0 = time.perf_counter()
    recs = _sharded(
        "workloads.chain",
        [
            *("--lake", str(lake), "--run-id", "bare", "--threads", str(threads)),
            *("--size", str(size), "--shard-images", str(image_settings().shard_images)),
        ],
        shards,
    )
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 3),
        "processed": sum(r["processed"] for r in recs if r["stage"] == "resize"),
        "table_rows": sum(r["images"] for r in recs if r["stage"] == "tables"),
        "parts_s": {
            stage: round(sum(r["seconds"] for r in recs if r["stage"] == stage), 3)
            for stage in ("index", "resize", "tables")
        },
        "external_load_cores": meter.external_cores(),
    }


def orchestrated(
    home: Path,
    workers: int,
    threads: int,
    size: int,
    rng: tuple[str, str] = ("00", "ff"),
    pg_url: str | None = None,
) -> dict:
    """The ranged run in a process of its own; ``pg_url``: its instance on PostgreSQL."""
    from bench.common import run_json

    env = settings_env(home, workers, threads, size)
    if pg_url:
        env["CVGRAPH_DAGSTER_PG_URL"] = pg_url
    return run_json(
        ["bench.pipeline", "orchestrate", "--home", str(home), "--range", f"{rng[0]}:{rng[1]}"],
        extra_env=env,
        drop=("DAGSTER_HOME", "CVGRAPH_LAKE_URL"),
    )


def _orchestrate(home: Path, rng: tuple[str, str]) -> dict:
    t_start = time.perf_counter()
    import dagster as dg

    from assets.versioning import asset_records
    from orchestration import runs
    from orchestration.definitions import build_defs
    from orchestration.instance import instance
    from workloads.lake import LocalLake

    defs = build_defs("local")
    inst = instance()
    inst.get_runs(limit=1)  # an existing instance: storage initialised before the run
    t_ready = time.perf_counter()
    keys = [dg.AssetKey(k) for k in ASSETS]
    meter = LoadMeter(children=True)
    t0 = time.perf_counter()
    result = runs.materialize(inst, keys, partition_range=rng, definitions=defs)
    wall = time.perf_counter() - t0
    load = meter.external_cores()
    steps = {}
    for s in inst.get_run_step_stats(result.run_id):
        if s.start_time and s.end_time:
            steps[s.step_key] = round(s.end_time - s.start_time, 3)
    lake = LocalLake(home / "lake")
    processed = sum(
        json.loads(lake.get(o.key))["processed"]
        for o in lake.list(results_dir(result.run_id, "resize"))
    )
    rows = sum(r["images"] for r in asset_records(lake, "image_tables").values())
    workers_s = sum(
        json.loads(lake.get(o.key))["seconds"]
        for o in lake.list(results_dir(result.run_id, "resize"))
    )
    return {
        "wall_s": round(wall, 3),
        "startup_s": round(t_ready - t_start, 3),
        "processed": processed,
        "table_rows": rows,
        "steps_s": steps,
        "prefix_task_seconds_sum": round(workers_s, 2),
        "run_id": result.run_id,
        "external_load_cores": load,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["orchestrate"])
    ap.add_argument("--home", required=True)
    ap.add_argument("--range", default="00:ff")
    args = ap.parse_args(argv)
    print(json.dumps(_orchestrate(Path(args.home), tuple(args.range.split(":")))), flush=True)
    return 0


def bench(
    work: Path,
    n: int,
    trials: int,
    workers: int = 2,
    threads: int = 4,
    size: int = 64,
    rng: tuple[str, str] = ("00", "ff"),
) -> dict:
    """Interleaved trials (bare, orchestrated on SQLite, orchestrated on PostgreSQL, ...), each
    from a fresh clone of the same lake; the PostgreSQL instance on a throwaway local server."""
    from bench.postgres import cluster, new_database

    prep = prepare(work, n)
    log(f"pipeline: {n} images ingested in {prep['ingest_s']} s")
    lake0 = Path(prep["lake"])
    out = {"bare": [], "orchestrated": [], "orchestrated_postgres": []}
    last_home = None
    with cluster() as server:
        for t in range(trials):
            b = work / f"bare_{t}" / "lake"
            clone(lake0, b)
            out["bare"].append(bare(b, workers, threads, size, rng))
            shutil.rmtree(b.parent, ignore_errors=True)
            home = work / f"home_{t}"
            clone(lake0, home / "lake")
            out["orchestrated"].append(orchestrated(home, workers, threads, size, rng))
            if last_home:
                shutil.rmtree(last_home, ignore_errors=True)
            last_home = home
            pg_home = work / f"pg_home_{t}"
            clone(lake0, pg_home / "lake")
            url = new_database(server, f"bench_{t}")
            out["orchestrated_postgres"].append(
                orchestrated(pg_home, workers, threads, size, rng, pg_url=url)
            )
            shutil.rmtree(pg_home, ignore_errors=True)
            log(
                f"pipeline trial {t}: bare {out['bare'][-1]['wall_s']} s, orchestrated "
                f"{out['orchestrated'][-1]['wall_s']} s (SQLite), "
                f"{out['orchestrated_postgres'][-1]['wall_s']} s (PostgreSQL)"
            )
    expected = sum(prep["per_prefix"].get(p, 0) for p in prefixes_in(rng))
    for r in out["bare"] + out["orchestrated"] + out["orchestrated_postgres"]:
        assert r["processed"] == expected, f"a run processed {r['processed']} of {expected} images"
        assert r["table_rows"] == expected, (
            f"a run wrote {r['table_rows']} table rows for {expected} images"
        )
    del prep["per_prefix"]
    return {
        "prepare": prep,
        **out,
        "home": str(last_home),
        "workers": workers,
        "threads": threads,
        "size": size,
        "range": list(rng),
        "images_in_range": expected,
    }


if __name__ == "__main__":
    sys.exit(main())

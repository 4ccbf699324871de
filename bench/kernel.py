"""Image kernel benchmarks: fast path vs naive path vs decode alone (one core), and 2 workers vs 1.

    python -m bench.kernel single --inputs DIR --size 224 --rounds 5     # one process, one thread
    python -m bench.kernel worker --inputs DIR --size 224 --passes N     # waits for "go" on stdin

The fast path is the production kernel (``resize_bytes(fast=True)`` = DCT-scaled decode,
INTER_AREA resize, centre crop, JPEG encode; then ``edges_png``); the naive path is the same
with ``fast=False`` (full decode). Variants run interleaved, round by round, on the same
images; rates are medians of per-round rates. Rates are per CPU second of this process
(= per core, since OpenCV runs one thread), and wall-clock rates are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2

from bench.common import median
from workloads.kernels import EdgeParams, ResizeParams, decode, edges_png, resize_bytes


def load_inputs(d: Path) -> list[dict]:
    meta = json.loads((d / "inputs.json").read_text())
    for m in meta:
        m["bytes"] = (d / m["name"]).read_bytes()
    return meta


def save_inputs(d: Path, images: list[dict]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for m in images:
        (d / m["name"]).write_bytes(m["bytes"])
    (d / "inputs.json").write_text(
        json.dumps([{k: v for k, v in m.items() if k != "bytes"} for m in images])
    )


def variants(size: int):
    rp, ep = ResizeParams(size, 90), EdgeParams()

    def fast(m):
        return edges_png(
            resize_bytes(m["bytes"], m["format"], m["width"], m["height"], rp, fast=True), ep
        )

    def naive(m):
        return edges_png(
            resize_bytes(m["bytes"], m["format"], m["width"], m["height"], rp, fast=False), ep
        )

    def decode_only(m):  # the reduced decode alone (a full decode for PNG: it has no scaled decode)
        return decode(m["bytes"], m["format"], m["width"], m["height"], size, fast=True)

    return {"fast": fast, "naive": naive, "decode": decode_only}


def _time(fn, items) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    for m in items:
        fn(m)
    return time.process_time() - c0, time.perf_counter() - w0


def single(images: list[dict], size: int, rounds: int) -> dict:
    """Per-set, per-variant medians of img/s and MB/s over interleaved rounds."""
    cv2.setNumThreads(1)
    fns = variants(size)
    sets = {
        "jpeg": [m for m in images if m["format"] == "JPEG"],
        "png": [m for m in images if m["format"] == "PNG"],
    }
    sets = {k: v for k, v in sets.items() if v}
    for items in sets.values():  # warm-up (allocator, code paths), not measured
        for fn in fns.values():
            fn(items[0])
    per_round: dict[str, dict[str, list[tuple[float, float]]]] = {
        s: {v: [] for v in fns} for s in sets
    }
    for r in range(rounds):
        order = (
            list(fns) if r % 2 == 0 else list(fns)[::-1]
        )  # alternate order: no variant always runs first
        for s, items in sets.items():
            for v in order:
                per_round[s][v].append(_time(fns[v], items))
    out = {}
    for s, items in sets.items():
        n, mb = len(items), sum(len(m["bytes"]) for m in items) / 1e6
        pixels = sum(m["width"] * m["height"] for m in items)
        res = {
            "images": n,
            "compressed_mb": round(mb, 3),
            "bytes_per_pixel": round(mb * 1e6 / pixels, 3),
        }
        for v, times in per_round[s].items():
            cpu = median([n / c for c, _ in times])
            wall = median([n / w for _, w in times])
            res[v] = {
                "img_per_cpu_s": round(cpu, 2),
                "mb_per_cpu_s": round(cpu * mb / n, 2),
                "img_per_wall_s": round(wall, 2),
            }
        # ratio of CPU times within each round (same conditions), then the median over rounds
        fast = [c for c, _ in per_round[s]["fast"]]
        res["fast_over_naive"] = round(
            median([b / a for a, (b, _) in zip(fast, per_round[s]["naive"])]), 3
        )
        res["fast_over_decode"] = round(
            median([b / a for a, (b, _) in zip(fast, per_round[s]["decode"])]), 3
        )
        out[s] = res
    if len(sets) > 1:  # the mixed set: all images, total time per variant
        n = len(images)
        tot = {v: [sum(per_round[s][v][r][0] for s in sets) for r in range(rounds)] for v in fns}
        out["mixed"] = {
            "images": n,
            "fast_over_naive": round(median([b / a for a, b in zip(tot["fast"], tot["naive"])]), 3),
            "fast_over_decode": round(
                median([b / a for a, b in zip(tot["fast"], tot["decode"])]), 3
            ),
        }
    out["rounds"] = rounds
    out["size"] = size
    return out


def worker(images: list[dict], size: int, passes: int) -> dict:
    """Fast path over ``images`` ``passes`` times, after "go" arrives on stdin."""
    cv2.setNumThreads(1)
    fast = variants(size)["fast"]
    fast(images[0])  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(passes):
        for m in images:
            fast(m)
    return {
        "images": passes * len(images),
        "cpu_s": time.process_time() - c0,
        "wall_s": time.perf_counter() - w0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["single", "worker"])
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--formats", default="JPEG,PNG")
    args = ap.parse_args(argv)
    images = [m for m in load_inputs(Path(args.inputs)) if m["format"] in args.formats.split(",")]
    out = (
        single(images, args.size, args.rounds)
        if args.mode == "single"
        else worker(images, args.size, args.passes)
    )
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _start_workers(k: int, inputs: Path, size: int, passes: int):
    import subprocess

    from bench.common import PY, REPO, env

    cmd = [
        PY,
        "-m",
        "bench.kernel",
        "worker",
        "--inputs",
        str(inputs),
        "--size",
        str(size),
        "--passes",
        str(passes),
        "--formats",
        "JPEG",
    ]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env(worker=True),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(k)
    ]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"scaling worker did not start: {line!r}")
    return procs


def scaling_trial(k: int, inputs: Path, size: int, passes_total: int) -> dict:
    """``k`` worker processes share ``passes_total`` passes over the same JPEGs; images/s of wall time."""
    from bench.common import LoadMeter

    procs = _start_workers(k, inputs, size, passes_total // k)
    meter = LoadMeter()
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.stdout.readline()) for p in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.wait()
    ours = sum(o["cpu_s"] for o in outs)
    images = sum(o["images"] for o in outs)
    return {
        "workers": k,
        "images": images,
        "wall_s": round(wall, 3),
        "img_per_s": round(images / wall, 2),
        "worker_cpu_s": round(ours, 3),
        "external_load_cores": meter.external_cores(ours),
    }

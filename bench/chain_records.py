"""What a chain task's records cost a prefix, over S3: ``python -m bench.chain_records``.

The demo's digits pack (1,797 images over all 256 prefixes) ingested into two lakes on one
S3 endpoint on 127.0.0.1 (``bench.training.s3_endpoint``: moto's server), then one chain task
(``workloads.chain.run_chain``) over every prefix of each, with each request made to wait
``--latency`` (20 ms: S3's time to a first byte) before it is sent: once a prefix at a time
(``--record-threads 1``), once ``RECORD_THREADS`` at a time (each part, ``on_forks``). Printed:
each chain's seconds (and its process's CPU seconds: moto's server is another process, on the
same cores here), the seconds and requests its result records give each part; and what
``workloads.costs.Rates`` takes from them: ``prefix_task_s`` (a part of a prefix, one at a
time: a digit's image work is a few milliseconds) and ``record_speedup`` (one at a time over
``RECORD_THREADS`` at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

BUCKET = "bench-chain"


def _latency(seconds: float) -> dict:
    """Every S3 client made after this waits ``seconds`` before each request it sends, once
    ``switch["on"]`` (boto3's default session: the lake's clients and its forks' come from it)."""
    import boto3

    switch = {"on": False}

    def wait(**_kwargs) -> None:  # None: botocore goes on to send the request
        if switch["on"]:
            time.sleep(seconds)

    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-send.s3", wait)
    return switch


def _parts(lake, run_id: str) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Seconds the chain's result records say each part took, summed over its prefixes, and
    the requests they counted."""
    from collections import Counter

    from workloads.lake import get_json
    from workloads.layout import results_dir

    seconds, requests = {}, {}
    for stage in ("index", "resize", "edges", "tables"):
        records = [get_json(lake, k) for k in lake.keys(results_dir(run_id, stage))]
        seconds[stage] = round(sum(r["seconds"] for r in records), 2)
        counted = sum((Counter(r["requests"]) for r in records), Counter())
        requests[stage] = {k: v for k, v in sorted(counted.items()) if not k.startswith("bytes")}
    return seconds, requests


def measure(latency: float = 0.02, threads: tuple[int, ...] = (1, 0)) -> dict:
    from bench.training import s3_endpoint
    from cvgraph.demo_packs import build_digits_pack
    from workloads.chain import run_chain
    from workloads.image_params import ImageParams
    from workloads.ingest import ingest_pack
    from workloads.s3lake import S3Lake
    from workloads.tasks import RECORD_THREADS
    from workloads.versions import HASH_PREFIXES

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    switch = _latency(latency)
    runs = {}
    with s3_endpoint() as url, tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        zip_path = Path(tmp) / "digits.zip"
        build_digits_pack(zip_path)
        for asked in threads:
            n = asked or RECORD_THREADS
            lake = S3Lake(f"s3://{BUCKET}/t{n}", endpoint_url=url)
            if not runs:
                lake.client.create_bucket(Bucket=BUCKET)
            lake.put_file("incoming/digits.zip", zip_path)
            ingest_pack(lake, "digits", "incoming/digits.zip")
            switch["on"] = True
            before, t0, cpu0 = dict(lake.counters), time.perf_counter(), time.process_time()
            run_chain(
                lake,
                f"bench-{n}",
                list(HASH_PREFIXES),
                ImageParams(),
                threads=4,
                shard_images=1_000,
                record_threads=n,
            )
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            requests = sum(
                v for k, v in lake.counters.since(before).items() if not k.startswith("bytes")
            )
            switch["on"] = False
            parts, part_requests = _parts(lake, f"bench-{n}")
            runs[n] = {
                "chain_s": round(seconds, 2),
                # this process's CPU (its threads'; not the S3 server's, another process here)
                "chain_cpu_s": round(cpu, 2),
                "requests": requests,
                "parts_s": parts,
                "part_requests": part_requests,
                "per_prefix_s": round(seconds / len(HASH_PREFIXES), 3),
            }
    one, many = runs[min(runs)], runs[max(runs)]
    # a digit's image work is a few ms: a prefix's time is its three parts' records
    return {
        "latency_s": latency,
        "prefixes": len(HASH_PREFIXES),
        "runs": runs,
        "prefix_task_s": round(one["per_prefix_s"] / 3, 3),
        "record_speedup": round(one["chain_s"] / many["chain_s"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to each request")
    ap.add_argument(
        "--record-threads",
        type=int,
        nargs="+",
        default=[1, 0],
        help="the chains to run: prefixes at a time each (0: RECORD_THREADS)",
    )
    args = ap.parse_args()
    print(json.dumps(measure(args.latency, tuple(args.record_threads)), indent=1))


if __name__ == "__main__":
    main()

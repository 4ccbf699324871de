"""What every prefix workload CLI shares: its arguments, the prefix an AWS Batch array child
takes, and the result record each prefix task writes last (its commit marker).

    python -m workloads.<index|images|tables> --lake URL --run-id R [...] --prefixes 00,01,...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from workloads.layout import result_key

# The exit code of ``python -m workloads.ingest`` for a pack that is not a readable zip: a
# verdict on the input, not a failure of the task.
PACK_UNREADABLE = 3
# ... for a zip that replaced an ingested pack's bytes under its key: refused, the pack kept.
PACK_REPLACED = 4
VERDICTS = (PACK_UNREADABLE, PACK_REPLACED)


def task_token(prefix: str, shard: int = 0, shards: int = 1) -> str:
    """A task's name: the prefix, or ``<pp>.<s>of<n>`` for shard s of n of a prefix whose
    pending images pass the shard threshold (an array child each, so children stay bounded)."""
    return prefix if shards == 1 else f"{prefix}.{shard}of{shards}"


def parse_task(token: str) -> tuple[str, int, int]:
    """``(prefix, shard, shards)`` of a task token."""
    prefix, _, shard = token.partition(".")
    if not shard:
        return prefix, 0, 1
    s, _, n = shard.partition("of")
    return prefix, int(s), int(n)


def shard_tasks(pending: dict[str, int], shard_images: int) -> list[str]:
    """The tasks for prefixes with ``pending`` images: a prefix with more than ``shard_images``
    is split into ceil(pending / shard_images) shards."""
    out = []
    for prefix in sorted(pending):
        n = max(1, -(-pending[prefix] // max(1, shard_images)))
        out += [task_token(prefix, s, n) for s in range(n)]
    return out


def prefix_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument(
        "--prefixes",
        required=True,
        help="comma-separated prefixes or shard tasks (ab.0of3); an array child takes one by index",
    )
    return ap


def selected_prefixes(args: argparse.Namespace) -> list[str]:
    """The prefixes of ``--prefixes``; in an AWS Batch array child, the one its index names."""
    prefixes = [p for p in args.prefixes.split(",") if p]
    index = os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX")
    return [prefixes[int(index)]] if index is not None else prefixes


def open_task_lake(args: argparse.Namespace):
    from workloads.lake import open_lake

    return open_lake(args.lake, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))


def run_prefix_tasks(
    args: argparse.Namespace, stage: str, task: Callable[[object, str], dict]
) -> int:
    """``task(lake, prefix)`` for each selected prefix; its record (with the task's seconds and
    lake requests) is written last and printed as one line, for the pool's progress."""
    lake = open_task_lake(args)
    for prefix in selected_prefixes(args):
        before, t0 = dict(lake.counters), time.perf_counter()
        record = {"prefix": prefix, "stage": stage, **task(lake, prefix)}
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record["requests"] = lake.counters.since(before)
        lake.put(
            result_key(args.run_id, stage, prefix), json.dumps(record, sort_keys=True).encode()
        )
        print(
            json.dumps(
                {k: record[k] for k in ("stage", "prefix", "seconds") if k in record}
                | {k: record[k] for k in ("images", "changed") if k in record}
            ),
            flush=True,
        )
    return 0

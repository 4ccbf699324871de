"""What every prefix workload CLI shares: its arguments, the prefix an AWS Batch array child
takes, and the result record each prefix task writes last (its commit marker).

    python -m workloads.<index|images|tables> --lake URL --run-id R [...] --prefixes 00,01,...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from workloads.layout import result_key

# The exit code of ``python -m workloads.ingest`` for a pack that is not a readable zip: a
# verdict on the input, not a failure of the task.
PACK_UNREADABLE = 3
# ... for a zip that replaced an ingested pack's bytes under its key: refused, the pack kept.
PACK_REPLACED = 4
VERDICTS = (PACK_UNREADABLE, PACK_REPLACED)
# Prefix tasks a workload runs at once (``prefix_results``): a task's records are a handful of
# small requests, each mostly S3's time to a first byte, so threads overlap them.
RECORD_THREADS = 8


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


def children(work_s: float, tasks: float, *, child_s: float, max_children: int) -> int:
    """How many Batch array children ``tasks`` tasks of ``work_s`` seconds of work in all take:
    about ``child_s`` of work each when there is that much, one when the work is small, never
    more than ``max_children`` (what the compute environment runs at once) or than tasks.
    ``tasks`` may be an expected count (a plan's look ahead): a fraction counts as one."""
    if tasks <= 0:
        return 0
    return max(1, min(math.ceil(tasks - 1e-9), max_children, math.ceil(work_s / child_s - 1e-9)))


def group_tasks(work: dict[str, float], *, child_s: float, max_children: int) -> list[list[str]]:
    """The tasks of ``work`` ({task: seconds of work}), in order, cut into ``children(...)``
    contiguous groups of about equal work: one array child each. Every group has a task."""
    tasks = sorted(work)
    n = children(sum(work.values()), len(tasks), child_s=child_s, max_children=max_children)
    groups, start, left = [], 0, sum(work.values())
    for g in range(n):
        later = n - g - 1  # groups still to fill after this one: a task each at least
        end, w = start + 1, work[tasks[start]]
        # the next task joins while that brings the group nearer its share of what is left
        while len(tasks) - end > later and (
            not later or w + work[tasks[end]] / 2 < left / (later + 1)
        ):
            w += work[tasks[end]]
            end += 1
        groups.append(tasks[start:end])
        start, left = end, left - w
    return groups


def group_args(groups: list[list[str]]) -> list[str]:
    """What a prefix command takes besides ``--prefixes`` (every task, the groups' in order) when
    each array child runs a group: the groups' sizes."""
    return ["--group-sizes", ",".join(str(len(g)) for g in groups)]


def prefix_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument(
        "--prefixes",
        required=True,
        help="comma-separated prefixes or shard tasks (ab.0of3); an array child takes its group "
        "of them (--group-sizes), or the one its index names",
    )
    ap.add_argument(
        "--group-sizes",
        default="",
        help="comma-separated sizes of the consecutive groups of --prefixes, one per array child",
    )
    return ap


def selected_prefixes(args: argparse.Namespace) -> list[str]:
    """The prefixes of ``--prefixes``; in an AWS Batch array child, the group (or the one
    prefix) its index names."""
    prefixes = [p for p in args.prefixes.split(",") if p]
    index = os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX")
    if index is None:
        return prefixes
    if not args.group_sizes:
        return [prefixes[int(index)]]
    sizes = [int(n) for n in args.group_sizes.split(",")]
    start = sum(sizes[: int(index)])
    return prefixes[start : start + sizes[int(index)]]


def open_task_lake(args: argparse.Namespace):
    from workloads.lake import open_lake

    return open_lake(args.lake, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))


def run_prefix_tasks(
    args: argparse.Namespace, stage: str, task: Callable[[object, str], dict]
) -> int:
    """``task(lake, prefix)`` for each selected prefix (``prefix_results``)."""
    prefix_results(open_task_lake(args), args.run_id, stage, selected_prefixes(args), task)
    return 0


def prefix_results(
    lake,
    run_id: str,
    stage: str,
    prefixes: list[str],
    task: Callable[[object, str], dict],
    carry: dict[str, int] | None = None,
    *,
    threads: int = RECORD_THREADS,
) -> dict[str, dict]:
    """``task(lake, prefix)`` for each of ``prefixes``, ``threads`` prefixes at a time (a prefix
    task is mostly waiting on its records' requests); its record (with the task's seconds and
    lake requests) is written last and printed as one line, for the pool's progress. Returns
    the records. ``carry``: requests the caller made for these tasks, counted with the first.
    Each thread works on its own fork of the lake (``on_forks``)."""
    first = prefixes[0] if prefixes else None
    return on_forks(
        lake,
        prefixes,
        lambda fork, p: _prefix_result(fork, run_id, stage, p, task, carry if p == first else None),
        threads=threads,
    )


def on_forks(lake, items: list[str], work: Callable, *, threads: int) -> dict:
    """``{item: work(a lake, item)}`` for each of ``items``, ``threads`` at a time, each thread
    on its own ``lake.fork()`` (its requests counted apart: a task's record counts its own),
    their counts added to ``lake.counters`` at the end; one at a time on ``lake`` itself when
    ``threads`` is 1. The forks are made here, before the threads start (boto3's default session
    makes clients one thread at a time). The first failure is raised once the others are done."""
    if threads <= 1 or len(items) <= 1:
        return {item: work(lake, item) for item in items}
    forks = [lake.fork() for _ in range(min(threads, len(items)))]
    free: queue.SimpleQueue = queue.SimpleQueue()
    for f in forks:
        free.put(f)

    def one(item):
        fork = free.get()  # a thread holds one fork at a time: none is shared
        try:
            return work(fork, item)
        finally:
            free.put(fork)

    try:
        with ThreadPoolExecutor(len(forks)) as pool:
            return dict(zip(items, pool.map(one, items), strict=True))
    finally:
        for f in forks:
            lake.counters.update(f.counters)


def _prefix_result(lake, run_id: str, stage: str, prefix: str, task, carry) -> dict:
    before, t0 = dict(lake.counters), time.perf_counter()
    record = {"prefix": prefix, "stage": stage, **task(lake, prefix)}
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["requests"] = lake.counters.since(before)
    for k, v in (carry or {}).items():
        record["requests"][k] = record["requests"].get(k, 0) + v
    lake.put(result_key(run_id, stage, prefix), json.dumps(record, sort_keys=True).encode())
    line = json.dumps(
        {k: record[k] for k in ("stage", "prefix", "seconds") if k in record}
        | {k: record[k] for k in ("images", "changed") if k in record}
    )
    progress(line)
    return record


_PRINTING = threading.Lock()


def progress(line: str) -> None:
    """A line of a task's progress (the local pool reads them): one whole line at a time,
    whichever of its threads prints."""
    with _PRINTING:
        print(line, flush=True)

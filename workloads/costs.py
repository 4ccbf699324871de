"""What a stage's work will cost before it runs: Batch task time, lake requests and bytes, dollars.

A stage's work is given as its prefix tasks and the images they hold; a Batch array child takes
a group of tasks (``task_groups``: about a minute of work each, one for little work).
The request counts per task and per image are the ones the workloads make (``tests/cvgraph/
test_plan.py`` compares them with a run's counted requests); the rates and prices are settings
whose defaults the README dates and sources. Dagster-free: the assets, the planner and the
bench all estimate through here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from workloads.tasks import children, group_tasks
from workloads.versions import HASH_PREFIXES

# Lake requests of one unit of work, as the workloads make them: the index step reads a
# pending pack's rows of the prefix, checks its record, drops its marker; the image stages read
# each original once and write its two variants; every prefix task reads and writes its own
# records. "step": what the Dagster step itself reads (records), once per run.
REQUESTS = {
    "ingest": {
        "pack": {"get": 1, "head": 1, "put": 3},  # the zip; its manifest, rejects and record
        "image": {"put": 1},  # the original (a conditional put: duplicates cost it too)
        "prefix": {"put": 2},  # the pack's rows of the prefix and its pending marker
    },
    "index": {
        "step": {"get": 1, "list": 2},
        # + the task's unrecorded mark, and the step's delete of it once recorded
        "prefix": {"get": 2, "list": 1, "put": 4, "delete": 1},
        "pack_prefix": {"get": 1, "head": 1, "delete": 1},
    },
    "images": {
        "step": {"get": 3, "list": 2},
        "prefix": {"get": 1},  # its result record, read by the step
        "task": {"get": 3, "head": 3, "put": 6, "delete": 2},  # a prefix, or a shard of one
        "merge": {"get": 15, "head": 1, "list": 4, "put": 4, "delete": 4},  # a sharded prefix's
        "image": {"get": 1, "put": 2},
        # each stage a task of its own: both read their records; edges reads the resized image back
        "split_task": {"get": 2, "head": 1},
        "split_image": {"get": 1},
    },
    "tables": {
        "step": {"get": 4, "list": 2},  # the records; the catalog, and the index markers
        "prefix": {"get": 6, "head": 3, "list": 3, "put": 2, "delete": 1},
    },
    # one task start for index, images and tables (``workloads.chain``): besides their work, the
    # index step reads the image and table records and the pending packs' records to size the
    # children; each child reads the image and table records it decides by and lists the run's
    # results of its four parts (a retried child goes on from there)
    "chain": {"step": {"get": 3}, "pack": {"get": 1}, "child": {"get": 3, "list": 4}},
}
# S3 bills PUT, COPY, POST and LIST at one rate, GET and all other requests at another, DELETE free.
PUT_TIER, FREE = {"put", "list"}, {"delete"}
ROW_BYTES = 700  # an index row (Parquet, zstd): the index of a prefix is rewritten whole
OUTPUT_BYTES_PER_PIXEL = 0.6  # a resized JPEG and its PNG edge map, per output pixel (demo packs)
RESIZED_SHARE = 0.9  # of that, the JPEG's


@dataclass(frozen=True)
class Rates:
    """How fast a Batch task works, and what one is (``CVGRAPH_PLAN_*``)."""

    images_per_vcpu_s: float = 100.0  # resize + edges, one worker (make bench: 6-MP photos)
    ingest_mb_per_vcpu_s: float = 30.0  # hash + header checks of a pack's members
    ingest_images_per_vcpu_s: float = 1200.0
    task_start_s: float = 30.0  # image pull and Python start of a Fargate task
    task_vcpus: float = 1.0
    task_memory_gb: float = 2.0
    min_billed_s: float = 60.0  # Fargate bills a task one minute at least
    # A Batch array child takes a group of prefix tasks: about this much work when there is that
    # much (a start is amortised over a minute of work), never more children than run at once.
    child_work_s: float = 60.0
    max_children: int = 256  # the stack's SpotMaxVcpus over its job's 1 vCPU
    # What a prefix task costs besides its images: its records (bench.chain_records: a chain
    # task one prefix at a time over S3 at 20 ms a request, 1.28 s a prefix for its three parts).
    prefix_task_s: float = 0.425
    # An index or table task, and each part of a chain task, runs ``RECORD_THREADS`` prefixes at
    # once (``workloads.tasks.on_forks``): their records' requests overlap, so a prefix of it
    # takes this much less (bench.chain_records: the whole chain 8 at a time 3.35x faster, with
    # moto's server on the task's own two cores).
    record_speedup: float = 3.35

    @property
    def record_task_s(self) -> float:
        """Seconds of a prefix's records in a task that runs many prefixes at once."""
        return self.prefix_task_s / self.record_speedup


@dataclass(frozen=True)
class Prices:
    """USD list prices (``CVGRAPH_PRICE_*``); defaults: us-east-1, Linux/x86, Fargate Spot."""

    vcpu_hour: float = 0.01334053
    gb_hour: float = 0.00146489
    s3_put_per_1000: float = 0.005
    s3_get_per_1000: float = 0.0004


@dataclass
class Estimate:
    """One stage's work: tasks, images, billed task time, lake requests and bytes."""

    stage: str
    prefixes: float = 0
    images: float = 0
    tasks: float = 0
    vcpu_s: float = 0.0
    requests: Counter = field(default_factory=Counter)
    bytes_read: float = 0
    bytes_written: float = 0
    wall_s: float = 0.0  # from its first task's start to its last task's end

    def __add__(self, other: Estimate) -> Estimate:
        """Both stages' work, one after the other (as a sync runs them); prefixes and images:
        the most any one stage touches."""
        return Estimate(
            "total",
            max(self.prefixes, other.prefixes),
            max(self.images, other.images),
            self.tasks + other.tasks,
            self.vcpu_s + other.vcpu_s,
            self.requests + other.requests,
            self.bytes_read + other.bytes_read,
            self.bytes_written + other.bytes_written,
            self.wall_s + other.wall_s,
        )

    def cost(self, prices: Prices, rates: Rates) -> dict[str, float]:
        hours = self.vcpu_s / 3600
        compute = hours * prices.vcpu_hour + hours / rates.task_vcpus * rates.task_memory_gb * (
            prices.gb_hour
        )
        put = sum(n for k, n in self.requests.items() if k in PUT_TIER)
        get = sum(n for k, n in self.requests.items() if k not in PUT_TIER | FREE)
        requests = put / 1000 * prices.s3_put_per_1000 + get / 1000 * prices.s3_get_per_1000
        return {"compute_usd": compute, "requests_usd": requests, "usd": compute + requests}

    def to_json(self, prices: Prices, rates: Rates) -> dict:
        out = dataclasses.asdict(self)
        out["requests"] = {k: round(v) for k, v in sorted(self.requests.items()) if round(v)}
        for k in ("prefixes", "images", "tasks", "bytes_read", "bytes_written"):
            out[k] = round(out[k])
        out["vcpu_hours"] = round(self.vcpu_s / 3600, 4)
        out["wall_s"] = round(self.wall_s, 1)
        out["requests_total"] = sum(out["requests"].values())
        out.update({k: round(v, 4) for k, v in self.cost(prices, rates).items()})
        del out["vcpu_s"]
        return out


def _scaled(unit: dict[str, int], n: float) -> Counter:
    return Counter({k: v * n for k, v in unit.items()})


def billed_s(work_s: float, rates: Rates) -> float:
    """vCPU-seconds Batch bills one task for ``work_s`` of work."""
    return max(rates.min_billed_s, rates.task_start_s + work_s) * rates.task_vcpus


def image_task_s(images: float, rates: Rates, split: int = 1) -> float:
    """Seconds of work of an image-stage task of ``images`` images in one stage's child (of
    ``split`` stages run as arrays of their own, each does its share of the images' work)."""
    return rates.prefix_task_s + images / rates.images_per_vcpu_s / split


def chain_task_s(images: float | None, rates: Rates) -> float:
    """Seconds of work of one prefix's chain task: its index, and when it has image work that
    the chain does (``images`` pending, None: none or sharded), both stages and its tables; a
    chain runs each part many prefixes at a time (``record_task_s``)."""
    if images is None:
        return rates.record_task_s
    return 3 * rates.record_task_s + images / rates.images_per_vcpu_s


def task_groups(work: dict[str, float], rates: Rates) -> list[list[str]]:
    """The tasks of ``work`` ({task: seconds}) in groups, one Batch array child each: what the
    steps submit and the estimates below count (``workloads.tasks.group_tasks``)."""
    return group_tasks(work, child_s=rates.child_work_s, max_children=rates.max_children)


def grouped(work_s: float, tasks: float, rates: Rates) -> tuple[int, float, float]:
    """(array children, billed vCPU-seconds, wall seconds) of ``tasks`` tasks holding ``work_s``
    of work in all, grouped as ``task_groups`` groups them (about equal work a child). The
    children run at once (there are no more than ``max_children``, what the compute
    environment's vCPUs hold), so the wall time is one child's: its start and its share."""
    n = children(work_s, tasks, child_s=rates.child_work_s, max_children=rates.max_children)
    if not n:
        return 0, 0.0, 0.0
    return n, n * billed_s(work_s / n, rates), rates.task_start_s + work_s / n


def ingest_estimate(packs: list[tuple[int, int, int]], rates: Rates) -> Estimate:
    """``packs``: (images, zip bytes, image bytes) of each pack to ingest: one task each."""
    est = Estimate("ingest", tasks=len(packs))
    unit = REQUESTS["ingest"]
    for images, zip_bytes, image_bytes in packs:
        prefixes = expected_prefixes(images)  # each pack writes its rows of each
        est.images += images
        work = (
            images / rates.ingest_images_per_vcpu_s + zip_bytes / 1e6 / rates.ingest_mb_per_vcpu_s
        )
        est.vcpu_s += billed_s(work, rates)
        # the packs' tasks at once: the longest is the stage's wall time
        est.wall_s = max(est.wall_s, rates.task_start_s + work / rates.task_vcpus)
        est.requests += (
            _scaled(unit["pack"], 1)
            + _scaled(unit["image"], images)
            + _scaled(unit["prefix"], prefixes)
        )
        est.bytes_read += zip_bytes
        est.bytes_written += image_bytes + images * ROW_BYTES
    est.prefixes = expected_prefixes(est.images)  # of all the packs: a prefix counts once
    return est


def index_estimate(prefixes: list[tuple[float, float, float]], rates: Rates) -> Estimate:
    """``prefixes``: (weight, pending pack markers, index rows after) of each prefix whose index
    changes: one task each. A weight below 1 is the chance a pack not yet ingested touches it."""
    unit = REQUESTS["index"]
    est = Estimate("index")
    if not prefixes:
        return est
    est.requests = _scaled(unit["step"], 1)
    for weight, packs, rows in prefixes:
        est.prefixes += weight
        est.requests += _scaled(unit["prefix"], weight) + _scaled(unit["pack_prefix"], packs)
        est.bytes_read += weight * rows * ROW_BYTES
        est.bytes_written += weight * rows * ROW_BYTES
    est.tasks, est.vcpu_s, est.wall_s = grouped(
        est.prefixes * rates.record_task_s, est.prefixes, rates
    )
    return est


def images_estimate(
    tasks: list[tuple[float, float, float]],
    prefixes: float,
    merges: float,
    size: int,
    rates: Rates,
    split: int = 1,
) -> Estimate:
    """``tasks``: (weight, images, their bytes) of each image-stage task (a prefix, or a shard of
    one); ``merges``: sharded prefixes, each folded back by a merge task; ``size``: output side;
    ``split``: 1 when one task runs both stages (locally), 2 when each stage is a task of its own
    (a Batch array job per stage: the edges child reads the resized image back)."""
    unit = REQUESTS["images"]
    est = Estimate("images", prefixes=prefixes)
    if not tasks:
        return est
    units = sum(w for w, _, _ in tasks)
    # each stage an array (split) of the same groups; merges an array of their own
    work_s = sum(w * image_task_s(images, rates, split) for w, images, _ in tasks)
    stage_children, stage_s, stage_wall = grouped(work_s, units, rates)
    merge_children, merge_s, merge_wall = grouped(merges * rates.prefix_task_s, merges, rates)
    est.tasks = stage_children * split + merge_children
    est.vcpu_s = stage_s * split + merge_s
    # a stage's child i starts when the stage before's child i is done (N_TO_N); merges after
    est.wall_s = stage_wall * split + merge_wall
    est.requests = (
        _scaled(unit["step"], 1)
        + _scaled(unit["prefix"], prefixes)
        + _scaled(unit["task"], units)
        + _scaled(unit["merge"], merges)
        + _scaled(unit["split_task"], units * (split - 1))
    )
    resized = size * size * OUTPUT_BYTES_PER_PIXEL * RESIZED_SHARE
    for weight, images, image_bytes in tasks:
        est.images += weight * images
        est.requests += _scaled(unit["image"], weight * images)
        est.requests += _scaled(unit["split_image"], weight * images * (split - 1))
        est.bytes_read += weight * (image_bytes + (split - 1) * images * resized)
        est.bytes_written += weight * images * size * size * OUTPUT_BYTES_PER_PIXEL
    return est


def tables_estimate(prefixes: list[tuple[float, float]], rates: Rates) -> Estimate:
    """``prefixes``: (weight, new rows) of each prefix whose rows change: one task each."""
    unit = REQUESTS["tables"]
    est = Estimate("tables")
    if not prefixes:
        return est
    est.requests = _scaled(unit["step"], 1)
    for weight, rows in prefixes:
        est.prefixes += weight
        est.images += rows
        est.requests += _scaled(unit["prefix"], weight)
        est.bytes_read += rows * ROW_BYTES
        est.bytes_written += rows * ROW_BYTES
    est.tasks, est.vcpu_s, est.wall_s = grouped(
        est.prefixes * rates.record_task_s, est.prefixes, rates
    )
    return est


def chain_estimate(
    parts: list[Estimate], work: list[tuple[float, float]], packs: int, rates: Rates
) -> Estimate:
    """Index, images and tables of the same prefixes run as one chain (``workloads.chain``):
    ``parts`` are their estimates (the images' with ``split`` 1: a chain runs both stages in one
    task), ``work`` (weight, ``chain_task_s``) of each prefix's chain task, ``packs`` the pending
    packs whose records size it. Their requests and bytes; its own children."""
    est = Estimate("chain")
    if not work:
        return est
    units = sum(w for w, _ in work)
    est.tasks, est.vcpu_s, est.wall_s = grouped(sum(w * s for w, s in work), units, rates)
    unit = REQUESTS["chain"]
    est.requests = (
        _scaled(unit["step"], 1) + _scaled(unit["pack"], packs) + _scaled(unit["child"], est.tasks)
    )
    est.prefixes = units
    for part in parts:
        est.images = max(est.images, part.images)
        est.requests += part.requests
        est.bytes_read += part.bytes_read
        est.bytes_written += part.bytes_written
    return est


def expected_prefixes(images: float, among: int = len(HASH_PREFIXES)) -> float:
    """How many of ``among`` prefixes ``images`` uniformly hashed images touch, on average."""
    return among * (1 - (1 - 1 / among) ** images) if images else 0.0


def summary_line(est: Estimate, prices: Prices, rates: Rates) -> str:
    """One line of an estimate, for a run's log and the CLI."""
    c = est.cost(prices, rates)
    requests = sum(est.requests.values())
    images = f"{est.images:,.0f} images, " if round(est.images) else ""
    tasks = f"{est.tasks:,.0f} task" + ("" if round(est.tasks) == 1 else "s")
    return (
        f"{est.stage}: {est.prefixes:,.0f} prefixes, {images}{tasks}, "
        f"{est.vcpu_s / 3600:.3f} vCPU-h, ~{wall(est.wall_s)} wall, {requests:,.0f} lake requests, "
        f"{est.bytes_read / 1e6:,.1f} MB read, {est.bytes_written / 1e6:,.1f} MB written, "
        f"${c['usd']:.4f}"
    )


def wall(seconds: float) -> str:
    """A wall time as a person reads it: ``45 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

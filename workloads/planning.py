"""What a prefix owes each stage, from the lake's records: the decisions the Dagster steps, the
plan, the owed sensor and a chain task (``workloads.chain``) all make, written once.

Dagster-free: a Batch child decides with the same functions the orchestrator does, so a chain
task runs exactly the image and table work the steps after it would have run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from workloads.costs import Estimate, images_estimate
from workloads.lake import get_many
from workloads.layout import legacy_versions_dir, marker_pack, pack_keys, versions_key
from workloads.tasks import parse_task, shard_tasks

# The prefix assets whose records a table row's inputs are.
INPUTS = ("raw_images", "resized_images", "edge_maps")
# The image stages and the asset each records.
STAGE_ASSETS = {"resize": "resized_images", "edges": "edge_maps"}


def tagged_records(lake, asset: str) -> tuple[dict[str, dict], str | None]:
    """(``{prefix: record}`` of ``_versions/<asset>.json``, the object's tag). A lake written
    before the records were one object per asset has ``_versions/<asset>/<pp>.json``: read those
    until the first update folds them in."""
    data, tag = lake.get_tagged(versions_key(asset))
    if data is not None:
        return json.loads(data)["prefixes"], tag
    legacy = get_many(lake, {o.key: o.key for o in lake.list(legacy_versions_dir(asset))})
    return {rec["prefix"]: rec for rec in legacy.values()}, None


def asset_records(lake, asset: str) -> dict[str, dict]:
    """The recorded ``_versions`` of every materialised prefix of ``asset``: one read."""
    return tagged_records(lake, asset)[0]


def stage_work(prior: dict | None, raw: dict | None, params_id: str) -> bool:
    """Whether a prefix's stage must run: its images or params changed since it last ran, or
    images failed then."""
    if prior is None:
        return bool(raw and raw["images"])
    return (
        prior.get("inputs") != {"raw_images": (raw or {}).get("data_version")}
        or prior["params_id"] != params_id
        or bool(prior.get("failed"))  # (a record a bench wrote by hand has none)
    )


def pending_count(prior: dict | None, raw: dict | None, params_id: str) -> int:
    """Images of a prefix a stage has still to make, from its records (the stage's own count
    leaves out images that failed)."""
    images = (raw or {}).get("images", 0)
    return (
        images
        if prior is None or prior["params_id"] != params_id
        else max(0, images - prior["images"])
    )


def tables_work(prior: dict | None, raw: dict | None, inputs: dict) -> bool:
    """A prefix's tables change only when an input's version did, or rows still lack a variant."""
    if prior is None:
        return bool((raw or {}).get("images"))
    return prior.get("inputs") != inputs or bool(prior.get("missing_variants"))


def new_rows(prior: dict | None, raw: dict | None) -> int:
    """Rows a prefix's tables are to gain (its originals not in them yet)."""
    return max(0, (raw or {}).get("images", 0) - (prior or {}).get("images", 0))


def images_owed(stages: dict[str, dict | None], raw: dict | None, params) -> tuple[bool, int]:
    """(whether the image stages of a prefix must run, the images the most behind of them has
    to make): ``stages`` maps each selected stage to the prefix's record of it (None: never
    recorded), ``raw`` is its ``raw_images`` record, ``params`` the ``ImageParams``."""
    work = any(stage_work(prior, raw, params.stage_id(s)) for s, prior in stages.items())
    pending = max(pending_count(prior, raw, params.stage_id(s)) for s, prior in stages.items())
    return work, pending


def stage_inputs(raw: dict | None) -> dict:
    """The inputs an image stage's record names: the index version it was made from."""
    return {"raw_images": (raw or {}).get("data_version")}


def table_inputs(records: dict[str, dict | None]) -> dict:
    """The inputs an ``image_tables`` record names: ``records`` of the prefix, by asset."""
    return {a: (records.get(a) or {}).get("data_version") for a in INPUTS}


def arriving_rows(lake, pending: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """(``{prefix: {pack: rows}}`` the committed pending packs bring, the mean stored bytes of an
    original of each), from the pending markers' keys ``pending`` (one listing of
    ``PENDING_RAW``, made by the caller) and one record read per pack."""
    found = {m for k in pending if (m := marker_pack(k))}
    forgotten = {p for p, forgetting in found if forgetting}
    ids = {p for p, forgetting in found if not forgetting} - forgotten
    records = get_many(lake, {p: pack_keys(p)["record"] for p in ids})
    arriving: dict[str, dict[str, int]] = {}
    for pack_id, rec in records.items():
        for prefix, rows in rec.get("prefixes", {}).items():
            arriving.setdefault(prefix, {})[pack_id] = rows
    mean = {p: rec["bytes_stored"] / max(1, rec["accepted"]) for p, rec in records.items()}
    return arriving, mean


@dataclass(frozen=True)
class ImagePlan:
    """What the image stages owe a set of prefixes (``plan_tasks``)."""

    work: list[str]  # the prefixes with work, in the order asked
    tasks: list[str]  # their tasks: a prefix, or a shard of one (``workloads.tasks.task_token``)
    sharded: list[str]  # the prefixes split into shards (each folded back by a merge task)
    pending: dict[str, int]  # images each prefix with work has still to make


def plan_tasks(
    stages: dict[str, dict[str, dict]],
    raw: dict[str, dict],
    prefixes: list[str],
    params,
    *,
    shard_images: int,
    arriving: dict[str, int] | None = None,
) -> ImagePlan:
    """The image work of ``prefixes``: ``stages`` maps each selected stage to its records
    (``{prefix: record}``), ``raw`` holds the index's. A prefix with more than ``shard_images``
    pending images (from the records) becomes (prefix, shard) tasks. ``arriving``: rows an index
    step has yet to bring in (a plan's look ahead)."""
    arriving = arriving or {}
    owes = {
        p: images_owed({s: records.get(p) for s, records in stages.items()}, raw.get(p), params)
        for p in prefixes
    }
    work = [p for p in prefixes if arriving.get(p) or owes[p][0]]
    pending = {p: arriving.get(p, 0) + owes[p][1] for p in work}
    tasks = shard_tasks(pending, shard_images)
    sharded = sorted({parse_task(t)[0] for t in tasks if parse_task(t)[2] > 1})
    return ImagePlan(work=work, tasks=tasks, sharded=sharded, pending=pending)


def mean_bytes(record: dict | None) -> float:
    """The mean size of a prefix's originals, from its raw_images record."""
    return (record or {}).get("bytes", 0) / max(1, (record or {}).get("images", 0))


def pending_mean(
    raw: dict | None,
    pending: float,
    arriving: dict[str, int],
    pack_mean: dict[str, float],
    spread: tuple[float, float] = (0.0, 0.0),
) -> float:
    """The mean bytes of a prefix's ``pending`` originals: those indexed already (``raw``), the
    ``arriving`` rows of pending packs ({pack: rows}, ``pack_mean`` of each) and a ``spread`` of
    (images, mean bytes) expected from zips not ingested yet."""
    rows_in = sum(arriving.values())
    total = pending + spread[0]
    known = mean_bytes(raw) * (pending - rows_in) + sum(
        pack_mean[k] * n for k, n in arriving.items()
    )
    return (known + spread[0] * spread[1]) / total if total else 0.0


def image_work_estimate(
    work: dict[str, tuple[float, float, float]], shard_images: int, size: int, rates, split: int
) -> Estimate:
    """The image stages' estimate of ``work``: {prefix: (weight, pending images, mean bytes of
    one)}, each prefix split into shards as ``plan_tasks`` splits it; ``split``: tasks per
    prefix task (``ImageCompute.tasks_per_image_task``)."""
    tasks, merges = [], 0.0
    for weight, images, mean in work.values():
        shards = max(1, math.ceil(images / max(1, shard_images)))
        merges += weight if shards > 1 else 0
        tasks += [(weight, images / shards, images / shards * mean)] * shards
    return images_estimate(tasks, sum(w for w, _, _ in work.values()), merges, size, rates, split)

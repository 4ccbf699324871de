"""Hash-prefix image assets: raw_images (the index), resized_images and edge_maps.

Every step takes the whole partition range of its run (``context.partition_keys``), so a
256-prefix backfill is one run and, on AWS, one Batch array job per stage. The step itself reads
only records (pending markers, ``_versions``, result records); the work on a prefix's data runs
in the workload CLIs, and only on the prefixes that have work: the rest keep their records.
"""

import json
from collections import Counter
from dataclasses import dataclass

import dagster as dg

from assets.packs import raw_packs
from assets.versioning import (
    prefix_records,
    record_prefixes,
    request_metadata,
    version_record,
    write_prefix_records,
)
from partitions import hash_prefix_partitions_def
from resources.compute import ImageCompute, WorkloadFailed, index_command, merge_shards_command
from resources.dagster_internals import selected_asset_keys
from resources.settings import CostSettings, ImageSettings
from resources.storage import LakeResource
from resources.tables import TableWriter
from workloads.costs import (
    Estimate,
    chain_estimate,
    chain_task_s,
    image_task_s,
    index_estimate,
    tables_estimate,
    task_groups,
)
from workloads.images import empty_stage_record
from workloads.index import empty_index_stats
from workloads.lake import get_many
from workloads.layout import (
    PENDING_RAW,
    pending_raw_prefix,
    result_key,
    results_dir,
    unrecorded_key,
)
from workloads.planning import (
    arriving_rows,
    image_work_estimate,
    mean_bytes,
    new_rows,
    pending_mean,
    plan_tasks,
    stage_inputs,
)
from workloads.tasks import parse_task

single_run = dg.BackfillPolicy.single_run()


def run_tasks(store, run_id: str, stages: list[str], prefixes: list[str], run, keep) -> None:
    """``run()`` the tasks; if some fail, ``keep({stage: {prefix: result}})`` of those that
    finished first, so the step's re-run redoes only the rest (as Batch redoes only failed children)."""
    try:
        run()
    except WorkloadFailed:
        keep({s: get_many(store, {p: result_key(run_id, s, p) for p in prefixes}) for s in stages})
        raise


def task_results(
    context: dg.AssetExecutionContext, store, run_id: str, stage: str, prefixes: list[str]
) -> dict[str, dict]:
    """The result record of each prefix task; a missing one fails the step, naming the prefix."""
    found = get_many(store, {p: result_key(run_id, stage, p) for p in prefixes})
    if missing := [p for p in prefixes if p not in found]:
        raise dg.Failure(
            description=f"{stage}: no result record for prefix(es) {', '.join(missing[:20])} (task did not finish): {result_key(run_id, stage, missing[0])}"
        )
    return found


RAW = dg.AssetKey("raw_images")
RESIZED = dg.AssetKey("resized_images")
EDGES = dg.AssetKey("edge_maps")
TABLES = dg.AssetKey("image_tables")
STAGE_OF = {RESIZED: "resize", EDGES: "edges"}


def chained(context: dg.AssetExecutionContext) -> bool:
    """Whether the run selects the index, both image stages and the tables (every sync does):
    its index step then starts one chain task per group for all of them (``workloads.chain``)."""
    selected = selected_asset_keys(context)
    # a re-execution of some steps keeps its parent's selection: the steps must run too
    steps = context.run.step_keys_to_execute
    return {RAW, RESIZED, EDGES, TABLES} <= selected and (
        steps is None or {"raw_images", "image_stages", "image_tables"} <= set(steps)
    )


def chain_results(
    context: dg.AssetExecutionContext, store, stages: list[str], prefixes: list[str]
) -> dict[str, dict[str, dict]]:
    """``{stage: {prefix: result}}`` of the ``prefixes`` this run's chain tasks did every one of
    ``stages`` for: a listing of the run's results per stage, then their records (outside a
    chained run, nothing and no request)."""
    if not prefixes or not chained(context):
        return {s: {} for s in stages}
    run_id = context.run.run_id
    listed = [set(store.keys(results_dir(run_id, s))) for s in stages]
    done = [
        p
        for p in prefixes
        if all(result_key(run_id, s, p) in keys for s, keys in zip(stages, listed))
    ]
    return {s: get_many(store, {p: result_key(run_id, s, p) for p in done}) for s in stages}


@dataclass(frozen=True)
class ChainPlan:
    """A chained run's index step: the groups of prefixes its chain tasks take, its estimate."""

    groups: list[list[str]]
    estimate: Estimate


def plan_chain(
    store, pending_keys, work, raw, settings: ImageSettings, rates, *, index_work, tables: bool
):
    """The chain over ``work`` (prefixes with pending packs): each prefix's task sized by the
    images its packs bring and the stages owe (the records the chain decides by), the groups
    ``task_groups`` makes of them, and the estimate (``chain_estimate``); ``tables``: whether the
    chain writes the tables too."""
    params = settings.params()
    stages = {k: prefix_records(store, k.to_user_string(), work) for k in (RESIZED, EDGES)}
    prior_tables = prefix_records(store, TABLES.to_user_string(), work)
    arriving, pack_mean = arriving_rows(store, pending_keys)
    rows_in = {p: sum(arriving.get(p, {}).values()) for p in work}
    planned = plan_tasks(
        {STAGE_OF[k]: records for k, records in stages.items()},
        raw,
        work,
        params,
        shard_images=settings.shard_images,
        arriving=rows_in,
    )
    chain = {p: planned.pending[p] for p in planned.work if p not in planned.sharded}
    seconds = {p: chain_task_s(chain.get(p), rates) for p in work}
    parts = [
        index_work,
        image_work_estimate(
            {
                p: (1, n, pending_mean(raw.get(p), n, arriving.get(p, {}), pack_mean))
                for p, n in chain.items()
            },
            settings.shard_images,
            params.resize.size,
            rates,
            1,
        ),
        tables_estimate(
            [(1, new_rows(prior_tables.get(p), raw.get(p)) + rows_in[p]) for p in chain if tables],
            rates,
        ),
    ]
    return ChainPlan(
        groups=task_groups(seconds, rates),
        estimate=chain_estimate(parts, [(1, s) for s in seconds.values()], len(pack_mean), rates),
    )


@dg.asset(
    partitions_def=hash_prefix_partitions_def,
    deps=[dg.AssetDep(raw_packs, partition_mapping=dg.AllPartitionMapping())],
    backfill_policy=single_run,
    code_version="2",
    group_name="images",
    kinds={"parquet"},
    description="Index of the originals whose sha256 starts with the prefix: labels, boxes and the packs they came from.",
)
def raw_images(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    image_compute: ImageCompute,
    image_settings: ImageSettings,
    table_writer: TableWriter,
    cost_settings: CostSettings,
) -> dg.MaterializeResult:
    store = lake.lake()
    before = dict(store.counters)
    prefixes, run_id = list(context.partition_keys), context.run.run_id
    # One listing of the pending markers tells which prefixes have packs to absorb, or an index
    # change a killed run did not record (``unrecorded_key``: deleted below, once recorded).
    listed = store.keys(PENDING_RAW)
    markers = Counter(pending_raw_prefix(k) for k in listed)
    unrecorded = [k for k in listed if k.endswith(".unrecorded")]
    work = sorted(set(markers) & set(prefixes))
    prior = prefix_records(store, "raw_images", prefixes)
    rates = cost_settings.rates()
    index_work = index_estimate(
        [(1, markers[p], (prior.get(p) or {}).get("images", 0)) for p in work], rates
    )
    # The version records hold what the steps decide by, a few hundred bytes a prefix: the label
    # counts stay in the index's state and the merged packs in the result record.
    drop = ("stage", "seconds", "labels", "packs_merged", "packs_dropped")

    def keep(done: dict) -> None:
        write_prefix_records(
            store, "raw_images", {p: version_record(r, drop) for p, r in done["index"].items()}
        )

    if work and chained(context):
        in_chain = table_writer.writes_in_chain()
        chain = plan_chain(
            store,
            listed,
            work,
            prior,
            image_settings,
            rates,
            index_work=index_work,
            tables=in_chain,
        )
        estimate = cost_settings.log_estimate(context, chain.estimate)
        context.log.info(
            f"one task start per group for index, images and tables: {len(chain.groups)} "
            f"chain task(s) over {len(work)} prefixes"
        )
        try:
            image_compute.run_chain(
                context,
                lake.url,
                run_id,
                work,
                image_settings.params(),
                shard_images=image_settings.shard_images,
                tables=in_chain,
                groups=chain.groups,
            )
        except WorkloadFailed as e:
            # every prefix indexed: the image and table steps run what the chain did not
            indexed = get_many(store, {p: result_key(run_id, "index", p) for p in work})
            if set(indexed) < set(work):
                keep({"index": indexed})
                raise
            context.log.warning(f"chain tasks failed after indexing, left to the next steps: {e}")
    else:
        estimate = cost_settings.log_estimate(context, index_work)
        run_tasks(
            store,
            run_id,
            ["index"],
            work,
            lambda: image_compute.run_prefix_tasks(
                context,
                "index",
                lambda shard: index_command(lake.url, run_id, shard),
                work,
                run_id,
                task_groups({p: rates.record_task_s for p in work}, rates),
            ),
            keep,
        )
    results = task_results(context, store, run_id, "index", work)
    kept = {p: r for p, r in prior.items() if p not in results}
    stats = {
        p: results.get(p)
        or kept.get(p)
        or {**empty_index_stats(), "packs_merged": [], "packs_dropped": [], "changed": 0}
        for p in prefixes
    }
    total = sum(s["images"] for s in stats.values())
    context.log.info(
        f"{len(work)} of {len(prefixes)} prefixes had packs to absorb or drop; {total} originals indexed"
    )
    # a record to write: rows changed, or the index holds a version the record does not (a killed
    # run's merge, re-read by this run's task), or the prefix was never recorded
    changed = {
        p
        for p in work
        if results[p]["changed"]
        or (prior.get(p) or {}).get("data_version") != results[p]["data_version"]
    } | {p for p in prefixes if p not in results and p not in kept}
    # Once recorded, the index marks go: each task's own, and the older ones of its prefix it
    # supersedes (counted with the step's requests, though they follow the records' write).
    merged = {p for p, r in results.items() if r.get("packs_merged") or r.get("packs_dropped")}
    recorded_marks = {unrecorded_key(p, results[p]["data_version"]) for p in merged} | {
        k for k in unrecorded if pending_raw_prefix(k) in results
    }
    requests = store.counters.since(before)
    if recorded_marks:
        requests["delete"] = requests.get("delete", 0) + len(recorded_marks)
    result = record_prefixes(
        context,
        store,
        context.asset_key,
        {p: version_record(s, drop) for p, s in stats.items()},
        ("images", "bytes", "changed"),
        changed,
        {**request_metadata(requests, list(results.values())), **estimate},
    )
    for k in recorded_marks:
        store.delete(k)
    return result


def stage_outputs(
    context,
    store,
    key,
    *,
    params,
    raw: dict,
    prior: dict,
    inputs: dict,
    work: list[str],
    results: dict[str, dict],
    metadata: dict,
):
    """The materialisation of one stage's asset over the run's prefixes, and its check:
    ``results`` of the ``work`` prefixes' tasks, the others keep their ``prior`` records;
    ``metadata``: the step's requests and estimate (given with the first asset only)."""
    stage, prefixes = STAGE_OF[key], list(context.partition_keys)
    stats = {
        p: version_record(results[p], inputs=inputs[p])
        if p in results
        # an empty prefix's record names its inputs too: else the next look finds it stale
        else prior.get(p) or version_record(empty_stage_record(stage, params, p), inputs=inputs[p])
        for p in prefixes
    }
    failed = [dict(f, prefix=p) for p, s in stats.items() for f in s["failed"]]
    for f in failed[:20]:
        context.log.warning(f"{stage} {f['prefix']}/{f['sha256']}: {f['reason']}")
    yield record_prefixes(
        context,
        store,
        key,
        stats,
        ("images", "processed", "skipped", "bytes_written", "seconds", "params_id"),
        set(work) | {p for p in prefixes if p not in prior},
        metadata,
    )
    raw_images_of = {p: (raw.get(p) or {}).get("images", 0) for p in prefixes}
    mismatched = {
        p: (stats[p]["images"], raw_images_of[p])
        for p in prefixes
        if stats[p]["images"] != raw_images_of[p]
    }
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name="complete",
        passed=not mismatched and not failed,
        metadata={
            "prefixes": len(prefixes),
            "mismatched_prefixes": json.dumps(dict(list(mismatched.items())[:20])),
            "failed_images": len(failed),
            "params_id": params.stage_id(stage),
        },
    )


# What both image stages' specs share.
STAGE_SPEC = {
    "partitions_def": hash_prefix_partitions_def,
    "code_version": "3",
    "group_name": "images",
    "kinds": {"opencv"},
    "skippable": True,
}


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            RESIZED,
            deps=[raw_images],
            description="Every original of the prefix resized (short side N, centre crop) as JPEG, under resized/<params_id>/.",
            **STAGE_SPEC,
        ),
        dg.AssetSpec(
            EDGES,
            deps=[RESIZED],
            description="Canny edges of each resized image as PNG, under edges/<params_id>/.",
            **STAGE_SPEC,
        ),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "complete",
            asset=RESIZED,
            description="resized count = raw count in every prefix of the run",
        ),
        dg.AssetCheckSpec(
            "complete",
            asset=EDGES,
            description="edge map count = raw count in every prefix of the run",
        ),
    ],
    can_subset=True,
    backfill_policy=single_run,
)
def image_stages(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    image_compute: ImageCompute,
    image_settings: ImageSettings,
    cost_settings: CostSettings,
):
    """resize and edges; fused into one pass (one download, two outputs) when both are selected."""
    store = lake.lake()
    before = dict(store.counters)
    params = image_settings.params()
    selected = [k for k in (RESIZED, EDGES) if k in context.selected_asset_keys]
    stages = [STAGE_OF[k] for k in selected]
    prefixes, run_id = list(context.partition_keys), context.run.run_id
    raw = prefix_records(store, "raw_images", prefixes)
    prior = {k: prefix_records(store, k.to_user_string(), prefixes) for k in selected}
    planned = plan_tasks(
        {STAGE_OF[k]: prior[k] for k in selected},
        raw,
        prefixes,
        params,
        shard_images=image_settings.shard_images,
    )
    work, tasks, sharded, pending = planned.work, planned.tasks, planned.sharded, planned.pending
    # in a chained run the index step's chain tasks did most prefixes: their results are here
    chain = chain_results(context, store, stages, work)
    tasks = [t for t in tasks if parse_task(t)[0] not in chain[stages[0]]]
    todo = sorted({parse_task(t)[0] for t in tasks})
    rates, split = cost_settings.rates(), image_compute.tasks_per_image_task(stages)
    estimate = cost_settings.log_estimate(
        context,
        image_work_estimate(
            {p: (1, pending[p], mean_bytes(raw.get(p))) for p in todo},
            image_settings.shard_images,
            params.resize.size,
            rates,
            split,
        ),
    )
    # a Batch child a group of tasks, about a minute of work each (the estimate's count)
    groups = task_groups(
        {
            t: image_task_s(pending[parse_task(t)[0]] / parse_task(t)[2], rates, split)
            for t in tasks
        },
        rates,
    )
    context.log.info(
        f"{len(work)} of {len(prefixes)} prefixes have {'/'.join(stages)} work"
        + (
            f", {len(work) - len(todo)} of them done by this run's chain tasks"
            if chain[stages[0]]
            else ""
        )
    )
    if sharded:
        context.log.info(
            f"{len(sharded)} prefix(es) split into {len(tasks) - len(todo) + len(sharded)} shard tasks of <= {image_settings.shard_images} images"
        )
    inputs = {p: stage_inputs(raw.get(p)) for p in prefixes}

    def run() -> None:
        if tasks:
            image_compute.run_image_stages(context, lake.url, run_id, stages, tasks, params, groups)
        image_compute.run_prefix_tasks(
            context,
            "merge",
            lambda chunk: merge_shards_command(lake.url, run_id, stages, chunk, params),
            sharded,
            run_id,
            task_groups({p: rates.prefix_task_s for p in sharded}, rates),
        )

    def keep(done: dict) -> None:
        for k in selected:
            found = {**chain[STAGE_OF[k]], **done[STAGE_OF[k]]}
            records = {p: version_record(r, inputs=inputs[p]) for p, r in found.items()}
            write_prefix_records(store, k.to_user_string(), records)

    run_tasks(store, run_id, stages, todo, run, keep)
    results = {s: {**chain[s], **task_results(context, store, run_id, s, todo)} for s in stages}
    for key in selected:
        stage = STAGE_OF[key]
        first = key == selected[0]
        yield from stage_outputs(
            context,
            store,
            key,
            params=params,
            raw=raw,
            prior=prior[key],
            inputs=inputs,
            work=work,
            results=results[stage],
            # the step's own requests and its estimate, reported once: with the first asset
            metadata={
                **request_metadata(
                    store.counters.since(before) if first else {},
                    list(results[stage].values()),
                ),
                **(estimate if first else {}),
            },
        )

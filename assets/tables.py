"""image_tables: the Athena/DuckDB tables ``images`` and ``objects``, a few parts per prefix."""

import json

import dagster as dg

from assets.images import (
    EDGES,
    RESIZED,
    chain_results,
    raw_images,
    run_tasks,
    single_run,
    task_results,
)
from assets.versioning import (
    prefix_records,
    record_prefixes,
    request_metadata,
    version_record,
    write_prefix_records,
)
from partitions import hash_prefix_partitions_def
from resources.catalog import Catalog
from resources.settings import CostSettings, ImageSettings
from resources.storage import LakeResource
from resources.tables import TableWriter
from workloads.costs import tables_estimate, task_groups
from workloads.layout import PENDING_TABLES, pending_tables_prefix
from workloads.planning import INPUTS, new_rows, table_inputs, tables_work
from workloads.tables import empty_tables_stats


def rows_match_images(stats: dict, raw_records: dict) -> dg.AssetCheckResult:
    """Every prefix has one ``images`` row per indexed original, each with all its variants."""
    bad = {}
    for p, s in stats.items():
        raw = (raw_records.get(p) or {}).get("images", 0)
        if s["images"] != raw or s["missing_variants"]:
            bad[p] = {"rows": s["images"], "raw": raw, "missing_variants": s["missing_variants"]}
    return dg.AssetCheckResult(
        check_name="rows_match_images",
        passed=not bad,
        metadata={
            "prefixes": len(stats),
            "rows": sum(s["images"] for s in stats.values()),
            "mismatched": json.dumps(dict(list(bad.items())[:20])),
        },
    )


@dg.asset(
    partitions_def=hash_prefix_partitions_def,
    deps=[raw_images, RESIZED, EDGES],
    backfill_policy=single_run,
    code_version="3",
    group_name="tables",
    kinds={"parquet", "athena"},
    description="Rows of `images` (one per image) and `objects` (one per annotated box) under tables/<table>/prefix=<pp>/.",
    check_specs=[
        dg.AssetCheckSpec(
            "rows_match_images",
            asset="image_tables",
            description="`images` rows = indexed originals, every row has its resized and edge map",
        )
    ],
)
def image_tables(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    image_settings: ImageSettings,
    catalog: Catalog,
    table_writer: TableWriter,
    cost_settings: CostSettings,
):
    store = lake.lake()
    before = dict(store.counters)
    params = image_settings.params()
    prefixes, run_id = list(context.partition_keys), context.run.run_id
    upstream = {a: prefix_records(store, a, prefixes) for a in INPUTS}
    inputs = {p: table_inputs({a: upstream[a].get(p) for a in INPUTS}) for p in prefixes}
    prior = prefix_records(store, "image_tables", prefixes)
    # One listing of the index's markers: a prefix whose last commit was killed before its
    # clean-up has markers and nothing else to do; its task finishes that commit.
    markers = {pending_tables_prefix(k) for k in store.keys(PENDING_TABLES)}
    work = [
        p
        for p in prefixes
        if p in markers or tables_work(prior.get(p), upstream["raw_images"].get(p), inputs[p])
    ]
    # in a chained run the index step's chain tasks did most prefixes: their results are here
    chain = chain_results(context, store, ["tables"], work)["tables"]
    todo = [p for p in work if p not in chain]
    rates = cost_settings.rates()
    estimate = cost_settings.log_estimate(
        context,
        tables_estimate(
            [(1, new_rows(prior.get(p), upstream["raw_images"].get(p))) for p in todo], rates
        ),
    )
    context.log.info(
        f"{len(work)} of {len(prefixes)} prefixes have table rows to update"
        + (f", {len(chain)} of them done by this run's chain tasks" if chain else "")
    )
    drop = ("stage", "seconds", "prefix")
    run_tasks(
        store,
        run_id,
        ["tables"],
        todo,
        lambda: table_writer.run(
            context,
            store,
            lake.url,
            run_id,
            todo,
            params,
            task_groups({p: rates.record_task_s for p in todo}, rates),
        ),
        lambda done: write_prefix_records(
            store,
            "image_tables",
            {p: version_record(r, drop, inputs[p]) for p, r in {**chain, **done["tables"]}.items()},
        ),
    )
    results = {**chain, **task_results(context, store, run_id, "tables", todo)}
    stats = {
        p: version_record(results[p], drop, inputs[p])
        if p in results
        else prior.get(p) or {**empty_tables_stats(), "inputs": inputs[p]}
        for p in prefixes
    }
    catalog.register_tables()
    yield record_prefixes(
        context,
        store,
        context.asset_key,
        stats,
        ("images", "objects", "missing_variants"),
        set(work) | {p for p in prefixes if p not in prior},
        {**request_metadata(store.counters.since(before), list(results.values())), **estimate},
    )
    yield rows_match_images(stats, upstream["raw_images"])

"""One task start for a prefix's whole chain: index → resize + edges → tables.

    python -m workloads.chain --lake URL --run-id R --threads N --shard-images S [params] \\
        --prefixes 00,01 [--group-sizes 1,1]

A run that selects the index, both image stages and the tables (every sync does) starts one
array of these from its index step (``assets.images.raw_images``) instead of three arrays one
after the other. Each part writes the result record its own workload writes, under the run's id;
the image and table steps of the run then decide their work from the records as they always do
and run only the tasks that have no result record yet, so Dagster records every asset as before.

A chain decides with the steps' own functions (``workloads.planning``) from the same records, so
it does the work the steps would have done and no other. A prefix whose pending images pass
``--shard-images`` is only indexed here: its shards, their merge and its tables are the steps'.
"""

from __future__ import annotations

import sys

from workloads.image_params import (
    IMAGE_THREADS,
    ImageParams,
    add_params_args,
    params_from_args,
)
from workloads.images import process_prefix, report
from workloads.index import index_task
from workloads.lake import get_many
from workloads.layout import result_key, results_dir
from workloads.planning import (
    STAGE_ASSETS,
    asset_records,
    images_owed,
    stage_inputs,
    table_inputs,
    tables_work,
)
from workloads.tables import write_prefix_tables
from workloads.tasks import (
    RECORD_THREADS,
    on_forks,
    open_task_lake,
    prefix_parser,
    prefix_results,
    selected_prefixes,
)

STAGES = list(STAGE_ASSETS)


def run_chain(
    lake,
    run_id: str,
    prefixes: list[str],
    params: ImageParams,
    *,
    threads: int,
    shard_images: int,
    tables: bool = True,
    record_threads: int = RECORD_THREADS,
) -> dict[str, list[str]]:
    """Index ``prefixes``, then make the images and (unless not ``tables``: another writer's)
    tables the steps after would make; returns the prefixes each part ran on
    (``{"index": …, "images": …, "tables": …}``). Each part runs ``record_threads``
    prefixes at a time (``workloads.tasks.on_forks``), a prefix's image stages ``threads``
    images at a time."""
    before = dict(lake.counters)
    # the records the image and table steps decide by (the index's: its results, as the index
    # step is about to record them)
    records = {a: asset_records(lake, a) for a in (*STAGE_ASSETS.values(), "image_tables")}
    # A retried task (Batch's retry of a reclaimed child, the pool's re-run of a killed worker)
    # goes on from where the last attempt of this run stopped: a part with a result record is
    # done, and its record (what it merged, made, counted) stays as that attempt wrote it.
    done = {
        s: {
            k[len(results_dir(run_id, s)) : -len(".json")]
            for k in lake.keys(results_dir(run_id, s))
        }
        for s in ("index", *STAGES, "tables")
    }
    index = get_many(
        lake, {p: result_key(run_id, "index", p) for p in prefixes if p in done["index"]}
    )
    carry = lake.counters.since(before)  # the chain's own reads: counted with its first task
    todo = [p for p in prefixes if p not in index]
    index.update(
        prefix_results(lake, run_id, "index", todo, index_task, carry, threads=record_threads)
    )
    images, later = [], set()
    for p in prefixes:
        work, pending = images_owed(
            {s: records[a].get(p) for s, a in STAGE_ASSETS.items()}, index[p], params
        )
        if work and pending > shard_images:
            later.add(p)  # shards and a merge, then its tables: the steps'
        elif work:
            images.append(p)
    made = {
        p: get_many(lake, {s: result_key(run_id, s, p) for s in STAGES})
        for p in images
        if all(p in done[s] for s in STAGES)
    }
    made.update(
        on_forks(
            lake,
            [p for p in images if p not in made],
            lambda fork, p: report(
                process_prefix(fork, p, STAGES, params, run_id, threads=threads)
            ),
            threads=record_threads,
        )
    )
    written = []
    for p in prefixes:
        if p in later or not tables:
            continue
        stage = {
            a: {**made[p][s], "inputs": stage_inputs(index[p])} if p in made else records[a].get(p)
            for s, a in STAGE_ASSETS.items()
        }
        inputs = table_inputs({"raw_images": index[p], **stage})
        if tables_work(records["image_tables"].get(p), index[p], inputs):
            written.append(p)
    prefix_results(
        lake,
        run_id,
        "tables",
        [p for p in written if p not in done["tables"]],
        lambda lake, p: write_prefix_tables(lake, p, params),
        threads=record_threads,
    )
    return {"index": prefixes, "images": images, "tables": written}


def main(argv: list[str] | None = None) -> int:
    ap = prefix_parser("index, image stages and tables of prefixes, in one task")
    add_params_args(ap)
    ap.add_argument(
        "--threads", type=int, default=IMAGE_THREADS, help="images a prefix's stages make at once"
    )
    ap.add_argument(
        "--record-threads",
        type=int,
        default=RECORD_THREADS,
        help="prefixes each part runs at once",
    )
    ap.add_argument(
        "--shard-images",
        type=int,
        required=True,
        help="a prefix with more pending images is only indexed (the image step shards it)",
    )
    ap.add_argument(
        "--no-tables", action="store_true", help="leave the tables to the step (another writer)"
    )
    args = ap.parse_args(argv)
    run_chain(
        open_task_lake(args),
        args.run_id,
        selected_prefixes(args),
        params_from_args(args),
        threads=args.threads,
        shard_images=args.shard_images,
        tables=not args.no_tables,
        record_threads=args.record_threads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

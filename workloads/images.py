"""Image stages over hash-prefix partitions: ``resize`` and ``edges``, fused when both run.

    python -m workloads.images --lake URL --run-id R --stages resize,edges --prefixes 00,01

In an AWS Batch array child, ``AWS_BATCH_JOB_ARRAY_INDEX`` picks one prefix of the list.
Each prefix is incremental (skips images whose output for this params id exists) and ends
by writing ``_results/<run_id>/<stage>/<pp>.json``, the commit marker of that prefix task.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace

from workloads.image_params import (
    IMAGE_THREADS,
    ImageParams,
    add_params_args,
    params_from_args,
)
from workloads.kernels import edges_png, resize_bytes
from workloads.lake import read_parquet
from workloads.layout import (
    hashes_key,
    inflight_key,
    output_key,
    raw_index_key,
    raw_key,
    result_key,
    shard_hashes_key,
)
from workloads.tasks import (
    open_task_lake,
    parse_task,
    prefix_parser,
    progress,
    selected_prefixes,
    task_token,
)
from workloads.variant_hashes import (
    read_hash_table,
    read_hashes,
    recover_inflight,
    shard_of,
    update_hashes,
    write_hash_table,
)
from workloads.versions import prefix_version, sha256_hex

STAGES = ("resize", "edges")
# What one image gave a stage: (stage, sha256, (bytes, output sha256)), or the reason it failed.
Outcome = tuple[str, str, tuple[int, str] | str]


def read_raw_index(lake, prefix: str) -> list[dict]:
    key = raw_index_key(prefix)
    if not lake.exists(key):
        return []
    cols = ["sha256", "ext", "format", "width", "height"]
    return read_parquet(lake, key).select(cols).to_pylist()


def process_prefix(
    lake,
    prefix: str,
    stages: list[str],
    params: ImageParams,
    run_id: str,
    threads: int = 4,
    fast: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, dict]:
    """Run the selected stages for one prefix, or for shard ``(s, n)`` of it (its images with
    ``shard_of(sha, n) == s``); returns ``{stage: result record}``."""
    t0, before = time.perf_counter(), dict(lake.counters)
    s_, n_ = shard
    images = [
        im for im in read_raw_index(lake, prefix) if n_ == 1 or shard_of(im["sha256"], n_) == s_
    ]
    hashes, index_shas = _known_hashes(lake, prefix, stages, params, shard)
    done = {s: set(hashes[s]) for s in stages}
    todo = [im for im in images if any(im["sha256"] not in done[s] for s in stages)]
    stats, fresh = _run_stages(
        lake, prefix, stages, params, todo, done, set(hashes.get("resize", {})), threads, fast
    )
    seconds = round(time.perf_counter() - t0, 3)
    records = {}
    for stage in stages:
        failed = {f["sha256"] for f in stats[stage]["failed"]}
        present = [im["sha256"] for im in images if im["sha256"] not in failed]
        record = StageResult.of(
            prefix=prefix,
            stage=stage,
            params=params,
            present=present,
            processed=stats[stage]["processed"],
            skipped=len(images) - len(todo),
            failed=stats[stage]["failed"],
            bytes_written=stats[stage]["bytes_written"],
            seconds=seconds,
        )
        _save_hashes(
            lake,
            stage,
            params,
            prefix,
            shard,
            hashes[stage],
            fresh[stage],
            index_shas[stage],
            {im["sha256"] for im in images},
        )
        lake.delete(inflight_key(stage, params, prefix, shard))
        records[stage], before = _put_record(
            lake, result_key(run_id, stage, task_token(prefix, s_, n_)), record, before
        )
    return records


def _known_hashes(
    lake, prefix: str, stages: list[str], params: ImageParams, shard: tuple[int, int]
) -> tuple[dict[str, dict[str, str]], dict[str, set[str]]]:
    """The outputs already made, per stage (resize's too when only edges run: edges start from
    a stored resized image), and the shas of each that the prefix's hash index itself holds."""
    # What is done is what the hash indexes say: one read per stage, no listing of outputs (a
    # shard also reads the hashes it made before, if its earlier attempt was not merged yet).
    hashes = {
        s: read_hashes(lake, s, params, prefix)
        for s in STAGES
        if s in stages or (s == "resize" and "edges" in stages)
    }
    index_shas = {s: set(h) for s, h in hashes.items()}
    s_, n_ = shard
    if n_ > 1:
        for s in hashes:
            hashes[s].update(read_hash_table(lake, shard_hashes_key(s, params, prefix, s_, n_)))
    for s in stages:
        recover_inflight(lake, s, params, prefix, hashes[s], shard)
    return hashes, index_shas


def _run_stages(
    lake,
    prefix: str,
    stages: list[str],
    params: ImageParams,
    todo: list[dict],
    done: dict[str, set[str]],
    resized_stored: set[str],
    threads: int,
    fast: bool,
) -> tuple[dict[str, dict], dict[str, dict[str, str]]]:
    """Make the missing outputs of ``todo`` on ``threads`` threads; returns per stage its counts
    and failures, and the output hashes it made."""
    stats = {s: {"processed": 0, "bytes_written": 0, "failed": []} for s in stages}
    fresh: dict[str, dict[str, str]] = {s: {} for s in stages}

    def work(im: dict) -> list[Outcome]:
        return _image_outputs(lake, im, prefix, stages, params, done, resized_stored, fast)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for outcome in pool.map(work, todo):
            for stage, sha, value in outcome:
                if isinstance(value, str):
                    stats[stage]["failed"].append({"sha256": sha, "reason": value})
                else:
                    stats[stage]["processed"] += 1
                    stats[stage]["bytes_written"] += value[0]
                    fresh[stage][sha] = value[1]
    return stats, fresh


def _image_outputs(
    lake,
    im: dict,
    prefix: str,
    stages: list[str],
    params: ImageParams,
    done: dict[str, set[str]],
    resized_stored: set[str],
    fast: bool,
) -> list[Outcome]:
    """The outputs one image still lacks, written; an error fails each stage it did not finish."""
    sha = im["sha256"]
    out: list[Outcome] = []
    try:
        resized_key = output_key("resize", params, prefix, sha)
        need_resize = "resize" in stages and sha not in done["resize"]
        need_edges = "edges" in stages and sha not in done["edges"]
        if need_resize or (need_edges and sha not in resized_stored):
            raw = lake.get(raw_key(sha, im["ext"]))
            resized = resize_bytes(
                raw, im["format"], im["width"], im["height"], params.resize, fast=fast
            )
            if need_resize:
                lake.put(resized_key, resized)
                out.append(("resize", sha, (len(resized), sha256_hex(resized))))
        else:
            resized = lake.get(resized_key) if need_edges else b""
        if need_edges:
            edges = edges_png(resized, params.edges)
            lake.put(output_key("edges", params, prefix, sha), edges)
            out.append(("edges", sha, (len(edges), sha256_hex(edges))))
    except Exception as e:  # recorded per image with its reason; the prefix goes on
        reason = f"{type(e).__name__}: {e}"
        finished = {s for s, _, _ in out}
        out.extend((s, sha, reason) for s in stages if sha not in done[s] and s not in finished)
    return out


def _save_hashes(
    lake,
    stage: str,
    params: ImageParams,
    prefix: str,
    shard: tuple[int, int],
    known: dict[str, str],
    fresh: dict[str, str],
    index_shas: set[str],
    present: set[str],
) -> None:
    """This run's output hashes: into the prefix's hash index, or for a shard into its own hash
    table (all it has made that the index lacks): the merge folds them in. ``present``: the
    images the task read from the raw index (for the whole prefix unless a shard)."""
    s_, n_ = shard
    if n_ == 1:
        update_hashes(lake, stage, params, prefix, known, fresh, present)
        return
    write_hash_table(
        lake,
        shard_hashes_key(stage, params, prefix, s_, n_),
        {sha: h for sha, h in {**known, **fresh}.items() if sha not in index_shas},
    )


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """A prefix (or shard) task's result record for one image stage
    (``_results/<run>/<stage>/<task>.json``, written last: the task's commit marker)."""

    prefix: str
    stage: str
    params_id: str
    images: int  # the images the stage holds for the prefix (those that did not fail)
    processed: int
    skipped: int  # done before: in the stage's hash index
    failed: list[dict]  # {"sha256", "reason"}, by sha256
    bytes_written: int
    seconds: float
    data_version: str
    shards: int | None = None  # a merged prefix: its shard tasks
    requests: dict[str, int] = field(default_factory=dict)  # the lake requests it made

    @classmethod
    def of(
        cls,
        *,
        prefix: str,
        stage: str,
        params: ImageParams,
        present: list[str],
        processed: int = 0,
        skipped: int = 0,
        failed: Sequence[dict] = (),
        bytes_written: int = 0,
        seconds: float = 0.0,
        shards: int | None = None,
    ) -> StageResult:
        """The record of a task that left the stage holding ``present`` (its data version is
        theirs, under the stage's params id)."""
        pid = params.stage_id(stage)
        return cls(
            prefix=prefix,
            stage=stage,
            params_id=pid,
            images=len(present),
            processed=processed,
            skipped=skipped,
            failed=sorted(failed, key=lambda f: f["sha256"]),
            bytes_written=bytes_written,
            seconds=seconds,
            data_version=prefix_version(present, pid),
            shards=shards,
        )

    def to_json(self) -> dict:
        """As the lake keeps it: an unsharded task's has no ``shards``, one not yet written
        (an empty prefix's) no ``requests``."""
        return {
            k: v
            for k, v in asdict(self).items()
            if not ((k == "shards" and v is None) or (k == "requests" and not v))
        }

    @classmethod
    def from_json(cls, data: dict) -> StageResult:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _put_record(
    lake, key: str, record: StageResult, before: dict, extra: dict | None = None
) -> tuple[dict, dict]:
    """Write ``record`` last (the task's commit marker) with the requests made since ``before``
    (plus ``extra``, its own put included); returns it as written, and the counters to count
    the next one from."""
    requests = lake.counters.since(before)
    for k, v in (extra or {}).items():
        requests[k] = requests.get(k, 0) + v
    written = replace(record, requests={**requests, "put": requests.get("put", 0) + 1}).to_json()
    lake.put(key, json.dumps(written, sort_keys=True).encode())
    return written, dict(lake.counters)


def merge_shards(
    lake, prefix: str, stages: list[str], params: ImageParams, run_id: str
) -> dict[str, dict]:
    """Fold the shard tasks of ``prefix`` (this run's) into the prefix: their hashes into its
    hash index (with any an earlier, unmerged attempt left), their records into the prefix's
    result record, as ``process_prefix`` writes it for an unsharded prefix."""
    t0, before = time.perf_counter(), dict(lake.counters)
    present = [im["sha256"] for im in read_raw_index(lake, prefix)]
    records = {}
    for stage in stages:
        shards = _shard_records(lake, run_id, stage, prefix)
        deltas = _fold_shard_hashes(lake, stage, params, prefix, set(present))
        failed = [f for r in shards for f in r.failed]
        kept = [sha for sha in present if sha not in {f["sha256"] for f in failed}]
        processed = sum(r.processed for r in shards)
        record = StageResult.of(
            prefix=prefix,
            stage=stage,
            params=params,
            present=kept,
            processed=processed,
            skipped=len(present) - processed - len(failed),
            failed=failed,
            bytes_written=sum(r.bytes_written for r in shards),
            seconds=round(max(r.seconds for r in shards) + time.perf_counter() - t0, 3),
            shards=len(shards),
        )
        for k in deltas:
            lake.delete(k)
        shard_requests: dict[str, int] = {}
        for r in shards:  # the shards' requests count as the prefix's
            for k, v in r.requests.items():
                shard_requests[k] = shard_requests.get(k, 0) + v
        records[stage], before = _put_record(
            lake, result_key(run_id, stage, prefix), record, before, shard_requests
        )
    return records


def _shard_records(lake, run_id: str, stage: str, prefix: str) -> list[StageResult]:
    """The result records of this run's shard tasks of ``prefix``, in shard order; they must be
    one whole set of shards."""
    under = result_key(run_id, stage, prefix)[: -len(".json")] + "."
    found = {
        parse_task(k.rsplit("/", 1)[1][: -len(".json")]): k
        for k in lake.keys(under)
        if re.fullmatch(r"[0-9a-f]{2}\.\d+of\d+\.json", k.rsplit("/", 1)[1])
    }
    counts = {n for _, _, n in found}
    if len(counts) != 1 or {s for _, s, _ in found} != set(range(next(iter(counts)))):
        raise FileNotFoundError(
            f"{stage} {prefix}: the shard result records under {under} are not one whole set of shards: {sorted(found)}"
        )
    return [StageResult.from_json(json.loads(lake.get(found[t]))) for t in sorted(found)]


def _fold_shard_hashes(
    lake, stage: str, params: ImageParams, prefix: str, present: set[str]
) -> list[str]:
    """Merge every shard hash table of the prefix into its hash index (without images no
    longer ``present``); returns their keys, to drop once the prefix's record is built."""
    deltas = [
        k
        for k in lake.keys(hashes_key(stage, params, prefix)[: -len(".parquet")] + ".shard-")
        if k.endswith(".parquet")
    ]
    old = read_hashes(lake, stage, params, prefix)
    fresh = {sha: h for k in deltas for sha, h in read_hash_table(lake, k).items()}
    update_hashes(lake, stage, params, prefix, old, fresh, present)
    return deltas


def empty_stage_record(stage: str, params: ImageParams, prefix: str) -> dict:
    """What ``process_prefix`` records for a prefix with no images."""
    return StageResult.of(prefix=prefix, stage=stage, params=params, present=[]).to_json()


def report(records: dict[str, dict]) -> dict[str, dict]:
    """One line per stage record of a prefix task, for the local pool's progress; the records."""
    for rec in records.values():
        keys = ("stage", "prefix", "images", "processed", "skipped", "seconds")
        progress(json.dumps({k: rec[k] for k in keys}))
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = prefix_parser("resize / edges over hash prefixes")
    ap.add_argument("--stages", default="resize,edges")
    add_params_args(ap)
    ap.add_argument(
        "--threads", type=int, default=IMAGE_THREADS, help="images a prefix's stages make at once"
    )
    ap.add_argument(
        "--full-decode", action="store_true", help="baseline path: no DCT-scaled decode"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="fold this run's shard tasks of each prefix into the prefix",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        print(f"unknown stage(s) {bad}; expected {STAGES}", file=sys.stderr)
        return 2
    params = params_from_args(args)
    lake = open_task_lake(args)
    for token in selected_prefixes(args):
        prefix, shard, shards = parse_task(token)
        if args.merge:
            records = merge_shards(lake, prefix, stages, params, args.run_id)
        else:
            records = process_prefix(
                lake,
                prefix,
                stages,
                params,
                args.run_id,
                threads=args.threads,
                fast=not args.full_decode,
                shard=(shard, shards),
            )
        report(records)
    # 0 even when images failed: they are in the records (the stage's check reports them, the
    # next run retries them); an error exit means a task did not commit its record.
    return 0


if __name__ == "__main__":
    sys.exit(main())

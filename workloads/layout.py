"""The lake's layout: every key cvgraph reads or writes is built here, and nowhere else.

Dagster-free, so workers, resources, assets and the SDK all build keys from one place::

    incoming/<name>.zip                          uploads; the sensor turns each into a pack
    packs/<pack>/manifest.parquet, rejects.parquet, pack.json, prefixes/<pp>.parquet
    raw/<pp>/<sha256>.<ext>                      content-addressed originals
    index/raw/<pp>.parquet, <pp>.json            the raw index of a prefix and its state
    resized/<resize id>/<pp>/<sha256>.jpg        variants, keyed by the id of their params
    edges/<edges id>/<pp>/<sha256>.png
    index/{resized,edges}/<id>/<pp>.parquet      each variant's sha256, what subsets verify
    tables/<table>/prefix=<pp>/part-<id>.parquet the tables Athena (or DuckDB) reads
    index/tables/<pp>.json                       a prefix's table commit point
    tables/predictions/<pack>.parquet            a pack's rows of ``predictions`` (its labeller's)
    packs/<pack>/predictions/predictions.json    ... and their record, confidence.png, least_confident.png
    subsets/<key>/manifest.parquet, subset.json, labels.png
    models/<key>/model.pt, metrics.json, model.json, curves.png (+ SageMaker's own dirs)
    exports/<key>/torchscript/model.pt, onnx/model.onnx, onnx_int8/model.onnx, exports.json
    _versions/<asset>.json                       every prefix's data-version record
    _pending/..., _results/<run>/<stage>/<pp>.json   change markers and task commit markers

``stage`` is an image stage (``resize``, ``edges``); ``params`` anything with ``stage_id(stage)``
(``workloads.images.ImageParams``).
"""

from __future__ import annotations

import hashlib
import re

# -- names of packs, subsets and models: partition keys, lake path parts and job names --------
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid ``kind`` (subset, model) key, else ValueError saying why."""
    if not NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"{kind} key {name!r} is not allowed: use 1-100 of A-Z a-z 0-9 . _ - "
            "(starting with a letter or digit)"
        )
    return name


def safe_name(name: str) -> str:
    """``name`` if it is already a valid key, else a cleaned form plus a hash of the original,
    so two different names never map to the same key."""
    if NAME_RE.match(name) and ".." not in name:
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:80].replace("..", "_") or "pack"
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


# -- packs -----------------------------------------------------------------------
INCOMING = "incoming/"
PACKS = "packs/"
PENDING_RAW = "_pending/raw_images/"


def incoming_key(name: str) -> str:
    return f"{INCOMING}{name}.zip"


def pack_id_for(key: str) -> str:
    """``incoming/digits.zip`` → ``digits``; any other name gets a cleaned form plus a hash
    (``incoming/team/cats v2.zip`` → ``team_cats_v2-1a2b3c4d``), so distinct zips never share a
    pack."""
    stem = key.removeprefix(INCOMING)
    stem = stem[: -len(".zip")] if stem.lower().endswith(".zip") else stem
    return safe_name(stem)


def pack_keys(pack_id: str) -> dict[str, str]:
    base = f"{PACKS}{pack_id}"
    return {
        "manifest": f"{base}/manifest.parquet",
        "rejects": f"{base}/rejects.parquet",
        "record": record_key("pack", pack_id),
    }


def replaced_key(pack_id: str, zip_sha256: str) -> str:
    """Why other bytes under pack ``pack_id``'s key were refused (one record per such zip)."""
    return f"{PACKS}{pack_id}/replaced/{zip_sha256}.json"


def unreadable_key(pack_id: str) -> str:
    """The verdict on a zip that is no readable pack (its key, size, sha256 and reason): those
    bytes are owed no ingest (``assets.owed``); other bytes under the key are."""
    return f"{PACKS}{pack_id}/unreadable.json"


def pack_prefix_key(pack_id: str, prefix: str) -> str:
    """The manifest rows of one prefix: what that prefix's index reads of this pack."""
    return f"{PACKS}{pack_id}/prefixes/{prefix}.parquet"


def pending_raw_key(prefix: str, pack_id: str) -> str:
    """Pack ``pack_id`` has rows for ``prefix`` that its index has not absorbed yet."""
    return f"{PENDING_RAW}{prefix}/{pack_id}.json"


def forget_raw_key(prefix: str, pack_id: str) -> str:
    """Pack ``pack_id`` is being forgotten: ``prefix``'s index is to drop its rows (and the
    originals no other pack holds). Beside, never instead of, a ``pending_raw_key``."""
    return f"{PENDING_RAW}{prefix}/{pack_id}.forget"


def unrecorded_key(prefix: str, version: str) -> str:
    """``prefix``'s index changed to ``version`` and the ``raw_images`` step has not recorded it
    yet: written by the index task before it drops the pack markers, deleted by the step once its
    ``_versions`` record says so. A run killed in between leaves it, and the prefix's index step
    is owed again (a re-merge changes nothing; the step records what the index holds)."""
    return f"{PENDING_RAW}{prefix}/{version}.unrecorded"


def pending_raw_prefix(key: str) -> str:
    """The prefix of a ``pending_raw_key`` or ``forget_raw_key``."""
    return key.removeprefix(PENDING_RAW).split("/")[0]


def marker_pack(key: str) -> tuple[str, bool] | None:
    """(pack id, whether it is being forgotten) of a ``pending_raw_key`` or ``forget_raw_key``;
    None for anything else under ``PENDING_RAW``."""
    name = key.rsplit("/", 1)[1]
    for suffix, forgetting in ((".json", False), (".forget", True)):
        if name.endswith(suffix):
            return name.removesuffix(suffix), forgetting
    return None


def pending_packs(lake) -> set[str]:
    """The packs with rows an index has not absorbed (or dropped) yet: one listing of their
    markers."""
    return {m[0] for k in lake.keys(PENDING_RAW) if (m := marker_pack(k))}


# -- originals and the raw index -------------------------------------------------
RAW = "raw/"
PENDING_TABLES = "_pending/image_tables/"


def raw_key(sha: str, ext: str) -> str:
    return f"{RAW}{sha[:2]}/{sha}.{ext}"


def raw_index_key(prefix: str) -> str:
    return f"index/raw/{prefix}.parquet"


def index_state_key(prefix: str) -> str:
    return f"index/raw/{prefix}.json"


def pending_tables_key(prefix: str, token: str) -> str:
    """Rows of ``prefix`` that changed in one merge, for the table step (token: the new version)."""
    return f"{PENDING_TABLES}{prefix}/{token}.json"


def pending_tables_prefix(key: str) -> str:
    """The prefix of a ``pending_tables_key``."""
    return key.removeprefix(PENDING_TABLES).split("/")[0]


# -- image variants --------------------------------------------------------------
STAGE_DIRS = {"resize": "resized", "edges": "edges"}
STAGE_EXTS = {"resize": ".jpg", "edges": ".png"}
# a subset row's lake key and sha256 of each variant a model or a Dataset can read
VARIANT_COLUMNS = {"resized": "resized_key", "edges": "edges_key", "original": "original_key"}
VARIANT_HASHES = {"resized": "resized_sha256", "edges": "edges_sha256", "original": "sha256"}


def stage_root(stage: str, params) -> str:
    """``resized/<id>/``: every output of ``stage`` under these params."""
    return f"{STAGE_DIRS[stage]}/{params.stage_id(stage)}/"


def output_dir(stage: str, params, prefix: str) -> str:
    return f"{stage_root(stage, params)}{prefix}/"


def output_key(stage: str, params, prefix: str, sha: str) -> str:
    return output_dir(stage, params, prefix) + sha + STAGE_EXTS[stage]


def hashes_key(stage: str, params, prefix: str) -> str:
    """sha256 of every output of ``stage`` in ``prefix``: what a frozen subset verifies against."""
    return f"index/{STAGE_DIRS[stage]}/{params.stage_id(stage)}/{prefix}.parquet"


def _shard_suffix(shard: int, shards: int) -> str:
    return f".shard-{shard}of{shards}"


def shard_hashes_key(stage: str, params, prefix: str, shard: int, shards: int) -> str:
    """The output hashes one shard task made, until the prefix's merge folds them into its index."""
    return hashes_key(stage, params, prefix).removesuffix(".parquet") + (
        _shard_suffix(shard, shards) + ".parquet"
    )


def inflight_key(stage: str, params, prefix: str, shard: tuple[int, int] = (0, 1)) -> str:
    """Present while a task works on the prefix (or shard): found at the start, the last task
    was killed."""
    suffix = "" if shard[1] == 1 else _shard_suffix(*shard)
    return hashes_key(stage, params, prefix).removesuffix(".parquet") + suffix + ".inflight"


# -- tables ----------------------------------------------------------------------
def table_root(table: str) -> str:
    return f"tables/{table}/"


def table_dir(table: str, prefix: str) -> str:
    return f"{table_root(table)}prefix={prefix}/"


def part_key(table: str, prefix: str, part_id: str) -> str:
    """One part of ``table`` in ``prefix``; id "0" is the single object a lake written before
    parts holds (``part-0.parquet``)."""
    return f"{table_dir(table, prefix)}part-{part_id}.parquet"


def part_pattern(table: str) -> str:
    """A regex of the part keys of ``table`` (what a catalog accepts as the table's files)."""
    return rf"{table_root(table)}prefix=[0-9a-f]{{2}}/[^/]+\.parquet"


def tables_state_key(prefix: str) -> str:
    """The prefix's commit point: its live parts, row digests, params, rows missing a variant."""
    return f"index/tables/{prefix}.json"


# -- predictions: a labeller model's classes for a pack's images -----------------------------
PREDICTIONS = "predictions"  # the table's name


def predictions_part_key(pack_id: str) -> str:
    """The pack's rows of the ``predictions`` table: one object per pack (no hive folders: the
    Glue table is unpartitioned), replaced whole by a re-score, so no reader sees half of it."""
    return f"{table_root(PREDICTIONS)}{pack_id}.parquet"


def predictions_pattern() -> str:
    """A regex of the part keys of the ``predictions`` table (a catalog's files)."""
    return rf"{table_root(PREDICTIONS)}[A-Za-z0-9][A-Za-z0-9._-]*\.parquet"


def prediction_keys(pack_id: str) -> dict[str, str]:
    """The pack's scoring: its part, and beside the pack (``forget pack`` takes them) its record
    (the commit marker, written last) and pictures."""
    base = f"{PACKS}{pack_id}/predictions"
    return {
        "part": predictions_part_key(pack_id),
        "record": f"{base}/predictions.json",
        "confidence": f"{base}/confidence.png",
        "least_confident": f"{base}/least_confident.png",
    }


# -- subsets, models, exports ----------------------------------------------------
EXPORT_FILES = {
    "torchscript": "torchscript/model.pt",
    "onnx": "onnx/model.onnx",
    "onnx_int8": "onnx_int8/model.onnx",
    "onnx_fp16": "onnx_fp16/model.onnx",
}


def subset_keys(key: str) -> dict[str, str]:
    base = f"subsets/{key}"
    return {
        "manifest": f"{base}/manifest.parquet",
        "record": record_key("subset", key),
        "labels": f"{base}/labels.png",
        # written first, conditionally: two freezes of one key race for it (assets/subsets.py)
        "claim": f"{base}/claim.json",
    }


def shard_keys(subset: str, variant: str) -> dict[str, str]:
    """The training shards of subset ``subset``'s ``variant`` images: a derived cache under the
    subset (``forget subset`` takes it too). ``index`` is written last, and names each split's
    shards (``<base>/<split>/shard-000000.tar``, ...) relative to ``base``."""
    base = f"subsets/{subset}/shards/{variant}"
    return {"base": base, "index": f"{base}/index.json"}


def model_keys(model_key: str) -> dict[str, str]:
    base = f"models/{model_key}"
    return {
        "model": f"{base}/model.pt",
        "metrics": f"{base}/metrics.json",
        "record": record_key("model", model_key),
        "curves": f"{base}/curves.png",
        "sagemaker_output": f"{base}/sagemaker/",
        "init": f"{base}/init.pt",  # the weights a training starts from (init_from)
    }


def checkpoints_dir(model_key: str, base_job: str) -> str:
    """SageMaker's checkpoints of one training job (its fallback attempts share them)."""
    return f"models/{model_key}/checkpoints/{base_job}/"


def export_keys(key: str) -> dict[str, str]:
    return {
        **{f: f"exports/{key}/{p}" for f, p in EXPORT_FILES.items()},
        "preprocess": f"exports/{key}/preprocess.json",
        "record": record_key("export", key),
    }


EVALUATIONS = "evaluations/"


def evaluation_keys(model: str, subset: str) -> dict[str, str]:
    """Model ``model`` scored on subset ``subset``: its record and pictures."""
    base = f"{EVALUATIONS}{model}/{subset}"
    return {
        "record": f"{base}/evaluation.json",
        "confusion": f"{base}/confusion.png",  # a classifier's
        "pr_curves": f"{base}/pr_curves.png",  # a detector's
        "worst": f"{base}/worst.png",
    }


def evaluations(lake, model: str | None = None) -> list[tuple[str, str]]:
    """(model, subset) of every evaluation there is (of ``model``): one listing."""
    under = f"{EVALUATIONS}{model}/" if model else EVALUATIONS
    found = []
    for k in lake.keys(under):
        parts = k.removeprefix(EVALUATIONS).split("/")
        if len(parts) == 3 and k == evaluation_keys(parts[0], parts[1])["record"]:
            found.append((parts[0], parts[1]))
    return sorted(found)


# -- bookkeeping -----------------------------------------------------------------
PIPES = "_pipes"


def versions_key(asset: str) -> str:
    return f"_versions/{asset}.json"


def legacy_versions_dir(asset: str) -> str:
    """Where a lake written before records were one object per asset keeps them per prefix."""
    return f"_versions/{asset}/"


def results_dir(run_id: str, stage: str) -> str:
    return f"_results/{run_id}/{stage}/"


def result_key(run_id: str, stage: str, prefix: str) -> str:
    return f"{results_dir(run_id, stage)}{prefix}.json"


# -- what exists ------------------------------------------------------------------
# Each kind of named thing and the record that, once written, says it exists (its commit marker).
RECORDS = {
    "pack": ("packs/", "pack.json"),
    "subset": ("subsets/", "subset.json"),
    "model": ("models/", "model.json"),
    "export": ("exports/", "exports.json"),
}


def record_key(kind: str, name: str) -> str:
    """The record of ``name``, a pack, subset, model or export."""
    root, record = RECORDS[kind]
    return f"{root}{name}/{record}"


def recorded(lake, kind: str) -> list[str]:
    """The names of every ``kind`` (pack, subset, model, export) whose record is in the lake: one
    listing."""
    root, record = RECORDS[kind]
    names = []
    for key in lake.keys(root):
        parts = key[len(root) :].split("/")
        if len(parts) == 2 and parts[1] == record:
            names.append(parts[0])
    return sorted(names)

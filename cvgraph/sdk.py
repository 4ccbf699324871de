"""What a data scientist imports: every workflow the CLI offers, as methods of ``Datasets``.

Packs in (``upload``, ``ingest``, ``sync``), SQL over the tables (``sql_query``), immutable subsets
(``freeze_dataset``, ``subset``), models (``train``, ``export``) and where they came from
(``lineage``). Each runs what the Dagster daemon would run, on the same instance, so the UI shows it.
A failure the user can act on raises a ``CvgraphError`` whose message is one line naming what
failed and why.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cvgraph.errors import (  # noqa: F401  (the SDK's exceptions are imported from here too)
    NOUNS,
    BadQuery,
    CvgraphError,
    FreezeRefused,
    InvalidRequest,
    PackNotIngested,
    RunFailed,
    UnknownKey,
)
from orchestration.settings import endpoint_url, lake_url
from workloads.lake import open_lake

if TYPE_CHECKING:
    import pyarrow as pa


PREDICT_FORMATS = ("onnx", "onnx_int8", "onnx_fp16")  # the exports onnxruntime runs


@dataclass(frozen=True)
class Upload:
    key: str  # incoming/<name>.zip
    pack_id: str
    uploaded: bool  # False: the same bytes were already there


class Datasets:
    """Entry point of the SDK; the profile and CVGRAPH_HOME come from the environment.

    Dagster (the definitions, the instance) is loaded on first use: ``upload`` needs only the
    lake. ``progress``, if given, hears each run's log lines as the run goes (``"<step>:
    <message>"``: prefixes done, Batch states, training epochs), e.g. ``progress=print``."""

    def __init__(self, home: str | None = None, progress: Callable[[str], None] | None = None):
        if home:
            os.environ["CVGRAPH_HOME"] = str(home)
        self.progress = progress
        self.lake_url = lake_url()
        self.lake = open_lake(self.lake_url, endpoint_url=endpoint_url())

    @cached_property
    def definitions(self):
        """The profile's definitions as the environment is now, not at first import."""
        from orchestration.definitions import build_defs

        return build_defs(resources=self.resources)

    @cached_property
    def resources(self) -> dict:
        """The profile's resources; a query needs these, not the assets (nor torch)."""
        from orchestration.profiles import resources_for

        return resources_for()

    @cached_property
    def instance(self):
        from orchestration.instance import instance

        return instance()

    @cached_property
    def _runs(self):
        from orchestration import runs

        return runs

    # -- runs on the Dagster instance ---------------------------------------------------------
    def materialize(self, keys, **kw):
        """Materialise ``keys`` in one run (``partition_key=`` or ``partition_range=``); raises
        ``RunFailed`` naming the failed step unless ``raise_on_error=False``."""
        try:
            return self._runs.materialize(
                self.instance, keys, definitions=self.definitions, on_log=self.progress, **kw
            )
        except self._runs.RunFailed as e:
            raise self._failed(e) from None

    def _failed(self, e) -> RunFailed:
        """The SDK's one-line error of a failed run (each failed step's first line)."""
        result = e.result
        return RunFailed(
            self._runs.failure_message(result, first_lines=True), self._runs.failure_message(result)
        )

    def ensure_partition(self, partitions_def, key: str) -> None:
        self._runs.ensure_partition(self.instance, partitions_def, key)

    def _run_new(self, partitions_def, key: str, asset, undo: Callable | None = None, **kw):
        """Materialise ``asset``'s partition ``key``; a partition this call added is removed again
        when the run fails, and ``undo()`` run, so a failed command leaves no key behind (the run
        stays in the instance's history)."""
        from workloads.layout import record_key, subset_keys

        self.end_dead_runs()  # none holds the key for good
        new = not self.instance.has_dynamic_partition(partitions_def.name, key)
        self.ensure_partition(partitions_def, key)
        try:
            return self.materialize([asset.key], partition_key=key, **kw)
        except RunFailed:
            # Another run may hold the key (this one lost a race): then it stays. A freeze holds
            # its key by its claim once its query is done; any run holds it while it goes on.
            kind = partitions_def.name.removesuffix("s")
            held = subset_keys(key)["claim"] if kind == "subset" else record_key(kind, key)
            if (
                new
                and not self.lake.exists(held)
                and not self._runs.running(self.instance, asset, key)
            ):
                self.instance.delete_dynamic_partition(partitions_def.name, key)
                if undo:
                    undo()
            raise

    def end_dead_runs(self) -> list[str]:
        """End every unfinished run whose process is gone (marked failed, its remote work
        stopped), each said on one line to ``progress``; returns their ids."""
        return self._runs.end_dead(self.instance, self.definitions, self.progress)

    def record(self, kind: str, key: str) -> dict:
        """The record of pack/subset/model/export ``key``; ``UnknownKey`` names those there are."""
        from workloads.layout import record_key, recorded

        try:
            return json.loads(self.lake.get(record_key(kind, key)))
        except FileNotFoundError:
            known = recorded(self.lake, kind)
            listing = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") or "none yet"
            raise UnknownKey(f"no {NOUNS[kind]} {key!r} ({NOUNS[kind]}s: {listing})") from None

    # -- packs --------------------------------------------------------------------------------
    def upload(self, path: str | Path, name: str | None = None) -> Upload:
        """Put the zip at ``incoming/<name>.zip`` (default name: the file's stem) unless the same
        bytes are already there; the sensor, or ``sync``, takes it from there."""
        from workloads.layout import incoming_key, pack_id_for, record_key

        path = Path(path)
        key = incoming_key(name or path.stem)
        lake = self.lake
        pack_id = pack_id_for(key)
        # the same bytes already there: compare sizes (one HEAD) before reading the object
        there = lake.exists(key)
        uploaded = not (
            there and lake.size(key) == path.stat().st_size and lake.get(key) == path.read_bytes()
        )
        if uploaded and there and lake.exists(record_key("pack", pack_id)):
            # an ingested pack is immutable: its zip is not overwritten (ingest would refuse it)
            raise InvalidRequest(
                f"{key} holds ingested pack {pack_id}, and {path} has other bytes: upload it "
                f"under a new name (--name), or `cvgraph forget pack {pack_id}` first"
            )
        if uploaded:
            lake.put_file(key, path)
        return Upload(key, pack_id, uploaded)

    def ingest(self, path: str | Path, name: str | None = None) -> dict:
        """Upload the zip and materialise its ``raw_packs`` partition now; returns its report
        (``pack_report``, with ``unchanged``: these bytes were ingested before). Raises
        ``PackNotIngested`` (e.g. not a readable zip), having removed what this call made."""
        from assets.packs import PACK_KEY_TAG, raw_packs
        from partitions import pack_partitions_def
        from workloads.layout import PACKS, record_key

        up = self.upload(path, name)
        known = self.lake.exists(record_key("pack", up.pack_id))

        def undo() -> None:  # a pack never ingested keeps nothing: not its upload, nor its reasons
            if not known:
                for key in [up.key] * up.uploaded + self.lake.keys(f"{PACKS}{up.pack_id}/"):
                    self.lake.delete(key)

        tags = {PACK_KEY_TAG: up.key}
        try:
            self._run_new(pack_partitions_def, up.pack_id, raw_packs, undo=undo, tags=tags)
        except RunFailed as e:
            message = f"pack {up.pack_id} ({path}) was not ingested: {e}"
            raise PackNotIngested(up.pack_id, message) from None
        return {
            **self.pack_report(up.pack_id),
            "unchanged": known and not up.uploaded,
            "queryable": not self.waiting(up.pack_id),
        }

    def waiting(self, pack_id: str | None = None) -> bool:
        """Whether ingested images (of ``pack_id``, else of any pack) are not in the tables yet:
        their index or table step has still to run (``sync``, or the daemon's automation)."""
        from workloads.layout import PENDING_TABLES, pending_packs

        raw = pending_packs(self.lake)
        return (pack_id in raw if pack_id else bool(raw)) or bool(self.lake.keys(PENDING_TABLES))

    def pack_report(self, pack_id: str) -> dict:
        """``{"pack_id", "accepted", "duplicates", "rejected": [{"member", "reason"}], "labels":
        {label: images}, "boxes": {"accepted", "rejected"}, "label_conflicts": [{"sha256",
        "member", "labels": {"pack/member": label}, "kept"}]}`` of an ingested pack."""
        rec = self.record("pack", pack_id)
        return {
            "pack_id": pack_id,
            "accepted": rec["accepted"],
            "duplicates": rec["duplicates"],
            "rejected": rec["rejected"],
            "labels": rec["labels"],
            "boxes": rec.get("boxes", {"accepted": 0, "rejected": 0}),
            "label_conflicts": rec.get("label_conflicts", []),
        }

    def tick_incoming(self, on_run: Callable | None = None) -> list[str]:
        """One tick of the incoming-packs sensor, and the ingest runs it requests; returns pack ids."""
        return self._runs.tick_incoming(
            self.instance, on_run=on_run, definitions=self.definitions, on_log=self.progress
        )

    def sync(
        self,
        on_run: Callable | None = None,
        on_ingest: Callable | None = None,
        packs: bool = True,
        on_owed: Callable | None = None,
    ) -> list[dict]:
        """Do what the lake is owed (what ``plan`` shows): end the runs whose process is gone,
        ingest every zip with no committed pack record (``on_ingest(pack id, result)`` after
        each; ``packs=False``: none), then bring every owed prefix up to date as ranged runs
        (``on_run(asset names, (first, last prefix), result)`` after each); ``on_owed(owed)``
        hears what is still owed when it stops; returns those runs."""
        try:
            return self._runs.sync(
                self.instance,
                on_run=on_run,
                definitions=self.definitions,
                on_log=self.progress,
                on_ingest=on_ingest,
                packs=packs,
                on_owed=on_owed,
            )
        except self._runs.RunFailed as e:
            raise self._failed(e) from None

    def owed(self):
        """What the lake is owed (``assets.owed.Owed``): zips to ingest, prefixes to run."""
        return self._runs.lake_owed(self.definitions)

    # -- tables and subsets -------------------------------------------------------------------
    def sql_query(self, sql: str) -> pa.Table:
        """Run one read-only SELECT over ``images`` and ``objects``; returns an Arrow table.
        ``BadQuery`` says, on one line, why a query gave no rows."""
        from resources.catalog import QueryError

        try:
            return self.resources["catalog"].query(sql)
        except QueryError as e:
            raise BadQuery(str(e)) from None

    def freeze_dataset(self, key: str, sql: str, allow_pending: bool = False) -> dict:
        """Materialise the ``frozen_subsets`` partition ``key`` from ``sql``; returns its record.

        Freezing the same key with the same query again (up to case and spacing) returns the
        same subset; a different query under a frozen key, or one that matches no rows, is
        refused, and a refused new key is not kept. So is a lake with work owed (``owed``: zips
        to ingest, prefixes whose stages lag), unless ``allow_pending``: then the record says
        what was owed (``pending``).
        """
        from assets.subsets import frozen_subsets
        from partitions import subset_partitions_def
        from resources.catalog import ensure_select
        from workloads.layout import check_name

        try:
            check_name("subset", key)
            ensure_select(sql)
        except ValueError as e:  # QueryRefused is a ValueError too
            raise FreezeRefused(str(e)) from None
        config = {"sql": sql, "allow_pending": allow_pending}
        run_config = {"ops": {"frozen_subsets": {"config": config}}}
        try:
            self._run_new(subset_partitions_def, key, frozen_subsets, run_config=run_config)
        except RunFailed as e:
            raise FreezeRefused(f"freeze of {key!r} failed: {e}") from None
        return self.record("subset", key)

    def subset(self, key: str) -> dict:
        """The record of frozen subset ``key``, after checking its manifest is what was frozen."""
        from assets.subsets import verify_subset

        self.record("subset", key)
        return verify_subset(self.lake, key)

    # -- models -------------------------------------------------------------------------------
    def train(
        self,
        key: str,
        subset: str | None = None,
        epochs: int | None = None,
        *,
        sweep: dict | None = None,
        **spec,
    ) -> dict:
        """Train model ``key`` on a frozen subset; returns its record (``test_accuracy``, or a
        detector's ``test_map`` and ``test_map50``; ``counts``, ``mlflow_run_id``, ...).
        ``spec``: any of ``workloads.training.spec.TRAIN_SPEC``'s fields (task, arch, epochs,
        min_steps, lr, augment, input_size, variant, ...); what is not given is the model's last
        (subset too), else the task's default (``task="detection"``: a detector of the subset's
        box categories). Checked before anything runs: the key, each field's range, the subset
        exists and has two classes or more (a detector: one box category or more)."""
        from assets.models import trained_models
        from partitions import model_partitions_def
        from workloads.training.spec import check_spec, task_defaults

        self.check_key("model", key)
        given = {k: v for k, v in {"epochs": epochs, **spec}.items() if v is not None}
        try:
            check_spec(given)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        trains_on = subset
        if trains_on is None:  # the model's previous subset (and spec: the asset reads them)
            try:
                trains_on = self.record("model", key)["subset"]
            except UnknownKey:
                raise InvalidRequest(
                    f"model {key!r} is new: give the frozen subset to train it on (--subset)"
                ) from None
        subset_record = self.record("subset", trains_on)
        task = given.get("task")
        if task is None:
            try:
                task = self.record("model", key)["spec"].get("task", "classification")
            except UnknownKey:
                task = "classification"
        if task == "detection":
            if not subset_record.get("boxes"):
                raise InvalidRequest(
                    f"subset {trains_on!r} has no boxes: a detector needs a subset of annotated "
                    "images (COCO, VOC or YOLO annotations in its packs)"
                )
            try:
                check_spec({**task_defaults("detection"), **given})
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
        classes = [c for c in subset_record["labels"] if c != "None"]
        if task != "detection" and len(classes) < 2:
            raise InvalidRequest(
                f"subset {trains_on!r} has {len(classes)} labelled class(es) ({', '.join(classes)}): "
                "a classifier needs two or more"
            )
        cfg = {**given, **({"subset": subset} if subset else {}), **(sweep or {})}
        run_config = {"ops": {"trained_models": {"config": cfg}}}
        self._run_new(model_partitions_def, key, trained_models, run_config=run_config)
        return self.record("model", key)

    def tune(
        self,
        key: str,
        subset: str | None = None,
        *,
        trials: int,
        parallel: int = 1,
        space: dict | str | None = None,
        **spec,
    ) -> dict:
        """Sweep model ``key``: ``trials`` trainings, ``parallel`` at once, spec fields drawn
        from ``space`` (``workloads.training.sweep.parse_space``; None: the task's default) by
        Optuna (on AWS: a SageMaker tuning job), the others ``spec``'s (else as ``train`` has them). The best on the validation
        split becomes the model's next registered version. Returns ``{"trials": [{"number",
        "params", "objective"}], "best", "objective", "version", "test_score", ...}``."""
        from workloads.training.spec import SCORE, SCORE_NAME, task_of
        from workloads.training.sweep import parse_space

        if trials < 2:
            raise InvalidRequest(f"a sweep has 2 trials or more, not {trials}")
        if not 1 <= parallel <= trials:
            raise InvalidRequest(f"parallel must be 1 to trials ({trials}), not {parallel}")
        task = spec.get("task") or "classification"
        with contextlib.suppress(UnknownKey):
            task = spec.get("task") or task_of(self.record("model", key))
        try:
            parsed = parse_space(space, task)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        sweep = {"trials": trials, "parallel": parallel, "space": json.dumps(parsed)}
        rec = self.train(key, subset, sweep=sweep, **spec)
        s = rec["sweep"]
        trials_out = [
            {"number": t["number"], "params": t["params"], "objective": t["objective"]}
            for t in s["trials"]
        ]
        metric = SCORE[task_of(rec)]
        return {
            "model": key,
            "sweep": s["name"],
            "objective": s["objective"],
            "trials": trials_out,
            "best": trials_out[s["best"]],
            "version": rec["mlflow_model_version"],
            "test_score_name": SCORE_NAME[metric],
            "test_score": rec[f"test_{metric}"],
            "mlflow_run_id": s["mlflow_run_id"],
        }

    def shards(self, subset: str, variant: str = "resized") -> dict:
        """The training shards of frozen subset ``subset``'s ``variant`` images (the
        ``training_shards`` asset; written now if they are missing); their index."""
        from assets.shards import training_shards
        from workloads.layout import VARIANT_COLUMNS, shard_keys

        self.check_key("subset", subset)
        self.record("subset", subset)  # UnknownKey, naming the subsets there are
        if variant not in VARIANT_COLUMNS:
            raise InvalidRequest(
                f"variant {variant!r}: expected one of {', '.join(VARIANT_COLUMNS)}"
            )
        run_config = {"ops": {"training_shards": {"config": {"variant": variant}}}}
        self.materialize([training_shards.key], partition_key=subset, run_config=run_config)
        return json.loads(self.lake.get(shard_keys(subset, variant)["index"]))

    def export(self, key: str) -> dict:
        """TorchScript, ONNX and ONNX int8 of model ``key``, each checked against it; returns the
        exports record (``formats``: key, bytes, max_abs_error, top1_agreement per format)."""
        from assets.exports import exported_models

        self.check_key("model", key)
        self.record("model", key)
        self.materialize([exported_models.key], partition_key=key)
        return self.record("export", key)

    def evaluate(self, model: str, subset: str) -> dict:
        """Score model ``model`` on subset ``subset`` (its test split if it is the model's own, else
        every row it did not train on) and apply the promotion rule; returns the evaluation
        record (``scores``, ``champion``, ``model_version``, pictures' keys)."""
        import dagster as dg

        from assets.evaluations import model_evaluations
        from workloads.layout import evaluation_keys

        self.check_key("model", model)
        self.check_key("subset", subset)
        self.record("model", model)
        self.record("subset", subset)
        key = dg.MultiPartitionKey({"model": model, "subset": subset})
        self.materialize([model_evaluations.key], partition_key=key)
        return json.loads(self.lake.get(evaluation_keys(model, subset)["record"]))

    def predict(
        self,
        key: str,
        images: list[str | Path],
        fmt: str = "onnx",
        draw: str | Path | None = None,
        min_score: float | None = None,
    ) -> list[dict]:
        """Run model ``key``'s export (``onnx``, ``onnx_int8`` or ``onnx_fp16``) on image files (a directory:
        the image files in it, by name), preprocessed as its ``preprocess.json`` says: a
        classifier's ``[{"image", "class", "probability", "logits"}]``, a detector's ``[{"image",
        "width", "height", "boxes": [{"class", "score", "x", "y", "w", "h"}]}]`` (boxes scoring
        ``min_score`` or more, default 0.3, in the image's own pixels). ``draw``: a directory
        the images are written to as PNG with their boxes drawn (a detector's)."""
        import tempfile

        from workloads.layout import export_keys
        from workloads.member_names import IMAGE_EXTS
        from workloads.training.predict import draw_predictions, predict

        if fmt not in PREDICT_FORMATS:
            raise InvalidRequest(f"format {fmt!r}: expected one of {', '.join(PREDICT_FORMATS)}")
        self.check_key("model", key)
        self.record("export", key)
        keys = export_keys(key)
        if not self.lake.exists(keys["preprocess"]):
            raise InvalidRequest(
                f"model {key!r} was exported before preprocess.json: export it again"
            )
        pre = json.loads(self.lake.get(keys["preprocess"]))
        files = [
            f
            for p in map(Path, images)
            for f in (sorted(p.iterdir()) if p.is_dir() else [p])
            if not p.is_dir() or (f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        ]
        if not files:
            raise InvalidRequest(f"no image files in {', '.join(map(str, images))}")
        data = {str(p): p.read_bytes() for p in files}
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model.onnx"
            model.write_bytes(self.lake.get(keys[fmt]))
            try:
                out = predict(model, pre, data, **({"min_score": min_score} if min_score else {}))
            except ValueError as e:
                raise InvalidRequest(f"not an image the model can read: {e}") from None
        if draw is not None:
            if pre["output"]["name"] != "detections":
                raise InvalidRequest(f"model {key!r} is a classifier: it has no boxes to draw")
            out_dir = Path(draw)
            out_dir.mkdir(parents=True, exist_ok=True)
            for row in out:
                png = draw_predictions(data[row["image"]], row["boxes"])
                target = out_dir / f"{Path(row['image']).stem}.png"
                target.write_bytes(png)
                row["drawn"] = str(target)
        return out

    def predictions(self, pack: str) -> dict:
        """The labeller's classes for the images of ingested pack ``pack``: scored now (the
        ``pack_predictions`` asset: the champion's ONNX export of model CVGRAPH_LABELLER, or its
        latest export while it has no champion, which ``scored_by`` says) unless the lake holds
        them already. ``{"pack", "model", "version", "champion", "scored_by", "data_version",
        "images", "failed", "failures", "rows": [{"member", "sha256", "label", "class",
        "probability"}]}``, rows by member; ``label`` is the pack's own (a prediction never
        replaces it).
        ``InvalidRequest`` when there is no labeller or it cannot score (no export, a detector)."""
        from assets.predictions import pack_predictions, scored_entry, target_version
        from partitions import pack_partitions_def
        from resources.labeller import LabellerRefused
        from workloads.lake import get_json, read_parquet
        from workloads.layout import pack_keys, prediction_keys
        from workloads.predictions import scored_packs

        self.check_key("pack", pack)
        self.record("pack", pack)  # UnknownKey, naming the packs there are
        try:
            export = self.resources["labeller"].export(self.lake)
        except LabellerRefused as e:
            raise InvalidRequest(str(e)) from None
        self.end_dead_runs()  # a killed command's run holds nothing
        keys = prediction_keys(pack)
        target, _ = target_version(self.lake, pack, export)
        record = get_json(self.lake, keys["record"])
        if not (
            record
            and record["data_version"] == target
            and self.lake.exists(keys["part"])
            and scored_packs(self.lake).get(pack) == scored_entry(record, export)
        ):
            self.ensure_partition(pack_partitions_def, pack)
            self.materialize([pack_predictions.key], partition_key=pack)
            record = json.loads(self.lake.get(keys["record"]))
        members = {}
        for m in read_parquet(self.lake, pack_keys(pack)["manifest"]).to_pylist():
            members.setdefault(m["sha256"], m)  # an image twice in the pack: its first member
        rows = [
            {
                "member": members[r["sha256"]]["member"],
                "sha256": r["sha256"],
                "label": members[r["sha256"]]["label"],
                "class": r["class"],
                "probability": r["probability"],
            }
            for r in read_parquet(self.lake, keys["part"]).to_pylist()
        ]
        return {
            "pack": pack,
            "model": record["model"],
            "version": record["version"],
            "champion": export.champion,
            "scored_by": export.note,
            "data_version": record["data_version"],
            "images": record["images"],
            "failed": record["failed"],
            "failures": record["failures"],  # the first 20: {"sha256", "reason"}
            "rows": sorted(rows, key=lambda r: r["member"]),
        }

    def forget(self, kind: str, key: str) -> int:
        """Remove pack, subset, model or export ``key`` and its records (``cvgraph.forget``);
        refused while something made from it is kept. Returns the lake objects removed."""
        from cvgraph.forget import forget

        return forget(self, kind, key)

    @staticmethod
    def check_key(kind: str, key: str) -> None:
        """``InvalidRequest`` unless ``key`` is a valid ``kind`` key (before anything is made)."""
        from workloads.layout import check_name

        try:
            check_name(kind, key)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    def plan(self, prefixes: str | list[str] | None = None) -> dict:
        """What a sync (``prefixes`` None) or a backfill of ``prefixes`` (``"00-3f"``, or a list)
        would do and cost, per stage, before anything runs (``cvgraph.plan``)."""
        from cvgraph.plan import parse_prefixes, plan

        if isinstance(prefixes, str):
            try:
                prefixes = parse_prefixes(prefixes)
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
        return plan(self.instance, self.definitions, prefixes)

    def __repr__(self) -> str:
        return f"Datasets(lake={self.lake_url!r})"

    def ls(self, kind: str) -> list[dict]:
        """One summary per ``packs``, ``subsets`` or ``models`` there are (``cvgraph.listing``)."""
        from cvgraph.listing import KINDS, listing

        if kind not in KINDS:
            raise InvalidRequest(f"ls {kind!r}: expected one of {', '.join(KINDS)}")
        return listing(self.lake, kind)

    def made_from(self, pack: str | None = None, image: str | None = None) -> dict:
        """Reverse lineage of pack ``pack`` or image ``image`` (its sha256): every subset that
        holds it, and the models and exports made from those."""
        import re

        from cvgraph.listing import made_from
        from workloads.index import read_index

        if (pack is None) == (image is None):
            raise InvalidRequest("give one of a pack (--pack) or an image's sha256 (--image)")
        if pack is not None:
            self.record("pack", pack)
        elif not re.fullmatch(r"[0-9a-f]{64}", image):
            raise InvalidRequest(f"image {image!r}: expected a sha256 (64 lower-case hex digits)")
        elif image not in set(read_index(self.lake, image[:2])["sha256"].to_pylist()):
            raise UnknownKey(f"no image {image} in the index (prefix {image[:2]})")
        return made_from(self.lake, pack=pack, image=image)

    def lineage(self, key: str) -> dict:
        """Export → model → subset → prefix versions → packs of a model or subset ``key``."""
        from cvgraph.lineage import lineage_of

        try:
            return lineage_of(self.lake, self.instance, key)
        except KeyError as e:
            raise UnknownKey(str(e.args[0])) from None

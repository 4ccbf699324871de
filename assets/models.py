"""trained_models: one training run of a model spec on a frozen subset (+ an MLflow run)."""

import io
import json
from pathlib import Path
from typing import Any  # the mlflow resource: dagster-mlflow's MlFlow, imported when it starts

import dagster as dg
from pydantic import Field

from assets.keys import require_key
from assets.shards import ensure_shards, training_shards
from assets.subsets import frozen_subsets, verify_subset
from assets.sweeps import job_name as sweep_job_name
from assets.sweeps import run_sweep
from assets.versioning import picture
from partitions import model_partitions_def
from resources.compute import ImageCompute
from resources.storage import LakeResource
from resources.tracking import (
    discard_run,
    end_mlflow_on_run_finished,
    log_training,
    register_version,
)
from resources.training import Trainer, output_key
from workloads.layout import model_keys, shard_keys, subset_keys
from workloads.staging import staging
from workloads.training.byo import check_outputs, source_archive
from workloads.training.spec import (
    ADDED_FIELDS,
    FIELDS,
    SCORE,
    SCORE_NAME,
    TRAIN_SPEC,
    check_spec,
    task_defaults,
    task_of,
)
from workloads.training.sweep import SweepPlan, parse_space, trial_model_key
from workloads.versions import sha256_hex

SWEEP_FIELDS = ("trials", "parallel", "space")  # TrainConfig's fields that are not the spec's


def _unset(field: str):
    """A config field left unset: the model's last value, else the spec's default (``FIELDS``)."""
    return Field(None, description=FIELDS[field][1])


class TrainConfig(dg.Config):
    """Unset fields: the model's last spec (and subset), else the task's defaults
    (``workloads.training.spec.task_defaults``)."""

    subset: str = Field("", description="the frozen subset to train on (default: the last)")
    task: str | None = _unset("task")
    arch: str | None = _unset("arch")
    epochs: int | None = _unset("epochs")
    min_steps: int | None = _unset("min_steps")
    lr: float | None = _unset("lr")
    warmup: float | None = _unset("warmup")
    weight_decay: float | None = _unset("weight_decay")
    label_smoothing: float | None = _unset("label_smoothing")
    batch_size: int | None = _unset("batch_size")
    input_size: int | None = _unset("input_size")
    variant: str | None = _unset("variant")
    augment: str | None = _unset("augment")
    patience: int | None = _unset("patience")
    seed: int | None = _unset("seed")
    width: int | None = _unset("width")
    init_from: str | None = _unset("init_from")
    entry_point: str | None = _unset("entry_point")
    training_image: str | None = _unset("training_image")
    trials: int = Field(
        1,
        description="a sweep: this many trainings, spec fields drawn from `space` by Optuna (on "
        "AWS: a SageMaker hyperparameter tuning job); the best on the validation split is kept "
        "(1: one training of the spec)",
    )
    parallel: int = Field(1, description="a sweep's trials trained at once")
    space: str = Field(
        "",
        description='a sweep\'s search space, JSON {field: [low, high] | {"low", "high", "log"} | '
        '{"choices": [...]}} (default: the task\'s, workloads.training.sweep.DEFAULT_SPACE)',
    )


def _plot_curves(history: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="val")
    a.set_title("loss")
    a.set_xlabel("epoch")
    a.legend()
    metric = "val_map" if history and "val_map" in history[0] else "val_accuracy"
    b.plot(epochs, [h[metric] for h in history], color="green")
    b.set_title(metric.replace("_", " ").replace("map", "mAP"))
    b.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def test_scores(record: dict) -> dict:
    """The test split's scores in a model's record (``metrics.json``): accuracy, or mAP and
    mAP@0.5 for a detector."""
    return {k: record[k] for k in ("test_accuracy", "test_map", "test_map50") if k in record}


def _metadata(record: dict, curves_png: bytes | None = None) -> dict:
    return {
        **({"training_curves": picture("training curves", curves_png)} if curves_png else {}),
        "subset": record["subset"],
        "subset_manifest_sha256": record["subset_manifest_sha256"],
        "task": task_of(record),
        **test_scores(record),
        "classes": len(record["classes"]),
        "arch": record["spec"].get("arch", "small_cnn"),
        "epochs": record.get("epochs_run", record["spec"]["epochs"]),
        "best_epoch": record.get("best_epoch", record["spec"]["epochs"]),
        "model_sha256": record["model_sha256"],
        "mlflow_run_id": record["mlflow_run_id"],
        "mlflow_model_version": record.get("mlflow_model_version", ""),
        "curves_png": record["curves"],
    }


def version_tags(
    subset: str, subset_record: dict, dagster_run_id: str, job: str, record: dict
) -> dict:
    """What a registered version was made from: enough to go back to the packs; the sha256 of
    its weights (checked by a training that starts from them) and the version it started from."""
    return {
        "model_sha256": record["model_sha256"],
        **({"init_from": record["spec"]["init_from"]} if record["spec"].get("init_from") else {}),
        "subset": subset,
        "subset_manifest_sha256": subset_record["manifest_sha256"],
        "input_merkle_root": subset_record["input_merkle_root"],
        "dagster_run_id": dagster_run_id,
        "training_job": job,
    }


def model_version(mlf, store, record: dict) -> str:
    """The registered version of a trained model; a model trained before the registry is
    registered now, from its record (which then names its version)."""
    if record.get("mlflow_model_version"):
        return record["mlflow_model_version"]
    subset_record = verify_subset(store, record["subset"])
    tags = version_tags(
        record["subset"], subset_record, record["dagster_run_id"], record["training_job"], record
    )
    record["mlflow_model_version"] = register_version(
        mlf, record["key"], record["mlflow_run_id"], tags
    )
    store.put(
        model_keys(record["key"])["record"], json.dumps(record, indent=2, sort_keys=True).encode()
    )
    return record["mlflow_model_version"]


def training_spec(key: str, config: TrainConfig, prior: dict | None) -> tuple[str, dict]:
    """(subset, spec) of a training: what the config sets, over the model's previous subset and
    spec (so a re-run is the same training, and nothing to do), else the defaults."""
    subset = config.subset or (prior or {}).get("subset")
    if not subset:
        raise dg.Failure(
            description=f"model {key}: give the frozen subset to train on as config `subset`"
        )
    given = {
        k: v
        for k, v in config.model_dump().items()
        if k not in ("subset", *SWEEP_FIELDS) and v is not None
    }
    last = prior_spec(prior)
    task = given.get("task") or last.get("task", TRAIN_SPEC["task"])
    try:  # another task than the last: its defaults, not the last spec's values
        base = {**task_defaults(task), **(last if last.get("task") == task else {})}
        return subset, check_spec({**base, **given})
    except ValueError as e:
        raise dg.Failure(description=f"model {key}: {e}") from None


def prior_spec(prior: dict | None) -> dict:
    """The spec of a model's record, with the fields added since it was written at the values it
    was trained with (so an old record's training is still the same training)."""
    return {**ADDED_FIELDS, **prior["spec"]} if prior else {}


def _init_weights(mlf, store, key: str, spec: dict) -> dict:
    """The registered version a training starts from (``spec["init_from"]``, resolved in place
    to ``MODEL@VERSION``), its weights checked and put at ``models/<key>/init.pt`` for the job."""
    from resources.tracking import version_weights
    from workloads.training.spec import parse_init_from

    name, version = parse_init_from(spec["init_from"])
    rkey = model_keys(name)["record"]
    rec = json.loads(store.get(rkey)) if store.exists(rkey) else {}
    known = (
        {rec["mlflow_model_version"]: rec["model_sha256"]}
        if rec.get("mlflow_model_version")
        else {}
    )
    with staging(store, "train") as tmp:
        try:
            init = version_weights(mlf, name, version, Path(tmp), known)
        except (LookupError, ValueError) as e:
            raise dg.Failure(description=f"model {key}: init_from: {e}") from None
        theirs = init["params"].get("arch", "small_cnn")  # trained before the choice: the CNN
        if theirs != spec["arch"]:
            raise dg.Failure(
                description=f"model {key}: init_from {name}@{init['version']} is a {theirs} "
                f"model: train it with --arch {theirs}"
            )
        size = int(init["params"].get("input_size", spec["input_size"]))
        if size != spec["input_size"]:  # a small input's stem is not a large one's
            raise dg.Failure(
                description=f"model {key}: init_from {name}@{init['version']} was trained at "
                f"{size} px: train it with --input-size {size}"
            )
        store.put(model_keys(key)["init"], Path(init["path"]).read_bytes())
    spec["init_from"] = f"{init['model']}@{init['version']}"
    return init


def _sweep_plan(key: str, config: TrainConfig, spec: dict, subset_record: dict) -> SweepPlan:
    """The sweep the config asks for, checked (its space, its sizes)."""
    if spec["init_from"]:
        raise dg.Failure(description=f"model {key}: a sweep trains anew: drop init_from")
    if spec["entry_point"]:
        raise dg.Failure(description=f"model {key}: a sweep trains with the built-in trainer")
    if config.parallel < 1 or config.parallel > config.trials:
        raise dg.Failure(
            description=f"model {key}: parallel must be 1 to trials ({config.trials}), "
            f"not {config.parallel}"
        )
    try:
        space = parse_space(config.space, task_of(spec))
    except ValueError as e:
        raise dg.Failure(description=f"model {key}: {e}") from None
    # the drawn fields at their defaults: the model's last spec (a previous sweep's winner) does
    # not make another sweep of the same space
    defaults = task_defaults(task_of(spec))
    return SweepPlan(
        model=key,
        subset_manifest_sha256=subset_record["manifest_sha256"],
        base={**spec, **{k: defaults[k] for k in space}},
        space=space,
        trials=config.trials,
        parallel=config.parallel,
        seed=spec["seed"],
    )


def _source(key: str, spec: dict, store) -> dict:
    """An entry point's folder as a reproducible archive in the lake (what a SageMaker job in
    script mode downloads); ``{"key", "sha256"}``."""
    path = Path(spec["entry_point"])
    if not path.is_file():
        raise dg.Failure(description=f"model {key}: entry_point {path} is not a file here")
    blob, sha = source_archive(str(path))
    source_key = f"models/{key}/source/{sha}.tar.gz"
    if not store.exists(source_key):
        store.put(source_key, blob)
    return {"key": source_key, "sha256": sha}


def local_copy(store, key: str, directory: Path) -> str:
    """The object at ``key`` as a file in ``directory`` (what MLflow logs as an artifact)."""
    path = directory / Path(key).name
    path.write_bytes(store.get(key))
    return str(path)


@dg.asset(
    partitions_def=model_partitions_def,
    deps=[
        dg.AssetDep(frozen_subsets, partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep(training_shards, partition_mapping=dg.AllPartitionMapping()),
    ],
    code_version="1",
    group_name="models",
    kinds={"pytorch", "sagemaker", "mlflow"},
    description="A classifier (arch: small_cnn, resnet18, mobilenet_v3_small) or a detector (task: detection; CenterNet on resnet18 or mobilenet_v3_small) trained on a frozen subset's training shards (written first if missing): models/<key>/model.pt, model.json, curves.png; each training a version of the MLflow registered model <key>.",
    hooks={end_mlflow_on_run_finished},  # a failed step ends its MLflow run as FAILED
)
def trained_models(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    lake: LakeResource,
    trainer: Trainer,
    image_compute: ImageCompute,
    mlflow: dg.ResourceParam[Any],
) -> dg.MaterializeResult:
    mlf = mlflow
    key = require_key("model", context.partition_key)
    store = lake.lake()
    keys = model_keys(key)
    prior = json.loads(store.get(keys["record"])) if store.exists(keys["record"]) else None
    subset, spec = training_spec(key, config, prior)
    init = _init_weights(mlf, store, key, spec) if spec["init_from"] else None
    try:
        subset_record = verify_subset(store, subset)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise dg.Failure(description=f"model {key}: subset {subset!r} is not usable: {e}") from None
    sweep = None
    if config.trials > 1:
        sweep = _sweep_plan(key, config, spec, subset_record)
    source = _source(key, spec, store) if spec["entry_point"] else None
    if (
        prior
        and (
            prior.get("sweep", {}).get("name") == sweep.name
            if sweep
            else prior_spec(prior) == spec and "sweep" not in prior
        )
        and prior.get("source_sha256") == (source or {}).get("sha256")
        and prior["subset"] == subset
        and prior["subset_manifest_sha256"] == subset_record["manifest_sha256"]
        and store.exists(output_key(key, spec))
    ):
        what = "this sweep" if sweep else "this subset and spec"
        context.log.info(f"model {key} already trained on {what}; nothing to do")
        discard_run(mlf)
        return dg.MaterializeResult(
            metadata=_metadata(
                prior, store.get(keys["curves"]) if store.exists(keys["curves"]) else None
            ),
            data_version=dg.DataVersion(prior["model_sha256"][:24]),
        )

    ensure_shards(context, image_compute, lake, subset, spec["variant"], record=subset_record)
    shards = shard_keys(subset, spec["variant"])["base"]
    if sweep:
        outcome = run_sweep(
            context,
            plan=sweep,
            trainer=trainer,
            store=store,
            mlf=mlf,
            subset=subset,
            shards_key=shards,
        )
        kept = outcome.kept
        spec, job_name, run_id = kept.spec, kept.training_job, kept.mlflow_run_id
        tkeys = model_keys(trial_model_key(key, sweep.name, kept.number))
        for name in ("model", "metrics"):  # the kept trial's training is the model's
            store.put(keys[name], store.get(tkeys[name]))
        metrics = json.loads(store.get(keys["metrics"]))
        curves = _plot_curves(metrics["history"], f"{key} on {subset} (trial {kept.number})")
        store.put(keys["curves"], curves)
        model_sha = sha256_hex(store.get(keys["model"]))
    else:
        identity = {**spec, **({"source_sha256": source["sha256"]} if source else {})}
        job_name = sweep_job_name(key, identity, subset_record["manifest_sha256"])
        live = {}  # each epoch's metrics go to this run as they are made, if the job reaches it
        if trainer.reaches(uri := mlf.get_tracking_uri()):
            live = {"mlflow_tracking_uri": uri, "mlflow_run_id": mlf.active_run().info.run_id}
        if init:
            live.update(init_weights=keys["init"], init_sha256=init["model_sha256"])
        if source:  # an entry point of the user's: its sources and the subset's manifest
            live.update(source_key=source["key"], manifest_key=subset_keys(subset)["manifest"])
        metrics = trainer.train(context, store, job_name, shards, key, {**spec, **live})
        weights = output_key(key, spec)
        if source:
            try:
                check_outputs(store.get(weights), metrics)
            except ValueError as e:
                raise dg.Failure(
                    description=f"model {key}: {Path(spec['entry_point']).name}: {e} "
                    "(README, Bring your own trainer)"
                ) from None
        curves = None
        if metrics.get("history"):
            curves = _plot_curves(metrics["history"], f"{key} on {subset}")
            store.put(keys["curves"], curves)
        model_sha = sha256_hex(store.get(weights))
        with staging(store, "train", on_sweep=lambda s: context.log.info(str(s))) as tmp:
            paths = [
                local_copy(store, k, Path(tmp))
                for k in (weights, keys["metrics"], *([keys["curves"]] if curves else []))
            ]
            run_id = log_training(
                mlf,
                key,
                subset_record["manifest_sha256"],
                {**identity, "subset": subset},
                metrics,
                paths,
            )
    version = register_version(
        mlf,
        key,
        run_id,
        version_tags(
            subset,
            subset_record,
            context.run.run_id,
            job_name,
            {"model_sha256": model_sha, "spec": spec},
        ),
    )
    record = {
        "key": key,
        "spec": spec,
        "subset": subset,
        "subset_manifest_sha256": subset_record["manifest_sha256"],
        "subset_input_merkle_root": subset_record["input_merkle_root"],
        "classes": metrics["classes"],
        **test_scores(metrics),
        **({"test_per_class": metrics["test_per_class"]} if "test_per_class" in metrics else {}),
        "counts": metrics["counts"],
        "model_sha256": model_sha,
        "mlflow_run_id": run_id,
        "mlflow_model_version": version,
        "curves": keys["curves"] if curves else "",
        "preprocess": metrics["preprocess"],
        "best_epoch": metrics.get("best_epoch", 0),
        "epochs_run": len(metrics.get("history", [])),
        "training_job": job_name,
        "dagster_run_id": context.run.run_id,
        **(
            {"init_from": {k: init[k] for k in ("model", "version", "model_sha256")}}
            if init
            else {}
        ),
        **({"sweep": outcome.to_json()} if sweep else {}),
        **(
            {"format": "onnx", "weights": output_key(key, spec), "source_sha256": source["sha256"]}
            if source
            else {}
        ),
    }
    store.put(keys["record"], json.dumps(record, indent=2, sort_keys=True).encode())
    metric = SCORE[task_of(spec)]
    context.log.info(
        f"model {key}: test {SCORE_NAME[metric]} {metrics['test_' + metric]:.4f} on {metrics['counts']['test']} held-out images"
    )
    metadata = _metadata(record, curves)
    if sweep:
        metadata.update(
            sweep=picture("objective per trial", store.get(outcome.picture)),
            sweep_trials=len(outcome.trials),
            sweep_best_trial=outcome.kept.number,
            **{f"sweep_best_{outcome.to_json()['objective']}": outcome.kept.objective},
        )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(model_sha[:24]))

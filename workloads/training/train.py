"""Training entry with SageMaker's file and environment layout: the subset streamed through a
``DataLoader`` (never held in memory), the model picked by ``arch``, the best epoch kept.

SageMaker (and the local trainer, which mimics it) provides:
  SM_INPUT_CONFIG_DIR/hyperparameters.json   values are strings, as SageMaker writes them
  SM_CHANNEL_SHARDS/index.json, <split>/...   the frozen subset's training shards (FastFile:
                                              streamed as read, nothing copied first)
  SM_CHANNEL_INIT/<init_weights>              the weights a fine-tune starts from, if any
  SM_MODEL_DIR, SM_OUTPUT_DATA_DIR            outputs; SageMaker uploads them
Checkpoints go to ``checkpoint_dir`` (SageMaker syncs /opt/ml/checkpoints with S3), and a
restarted job (spot reclaim) resumes from the last epoch saved there.

    python -m workloads.training.train
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import dagster_pipes as dp
import numpy as np
import torch
from torch import nn

from workloads.training.data import (
    SHUFFLE_BUFFER,
    Preprocess,
    ShardImages,
    channel_stats,
    loader,
)
from workloads.training.loop import (
    input_workers,
    kept_value,
    optimizer,
    resume,
    save_checkpoint,
)
from workloads.training.models import DEFAULT_WIDTH, build_model, head_of, load_record
from workloads.training.shards import STATS_IMAGES, first_images, split_shards
from workloads.training.spec import TRAIN_SPEC, channels, epochs_for, task_defaults
from workloads.versions import SPLITS

# What the entry takes besides the spec: where checkpoints go, input workers, where live
# metrics go (an MLflow run the trainer opened, when the job can reach its tracking server).
DEFAULTS = {
    **TRAIN_SPEC,
    "checkpoint_dir": "/opt/ml/checkpoints",
    "workers": -1,  # DataLoader workers; -1: none for a small split, else one per core
    "mlflow_tracking_uri": "",
    "mlflow_run_id": "",
    "mlflow_secret_arn": "",  # the tracking server's credentials (Secrets Manager), if it has any
    "init_weights": "",  # the init channel's file of the weights init_from names, and their sha256
    "init_sha256": "",
    # the SageMaker tuning job this training is a trial of: its trials share one CheckpointConfig,
    # so each keeps its checkpoints in a folder named after its own training job
    "tuning_job": "",
}


class ContinuingS3MessageWriter(dp.PipesS3MessageWriter):
    """SageMaker restarts a spot-interrupted job's container with the same hyperparameters, so
    the restarted process rejoins the same Pipes session. Its chunks continue after those already
    in the session's prefix: numbered from 1 again, they would overwrite chunks the orchestrator's
    reader has passed, and the reader would wait for a chunk that never comes."""

    def make_channel(self, params):
        bucket, prefix = params["bucket"], params.get("key_prefix")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", Delimiter="/"
        )
        names = (
            o["Key"].rsplit("/", 1)[-1].removesuffix(".json")
            for page in pages
            for o in page.get("Contents", [])
        )
        return ContinuingS3Channel(
            self._client,
            bucket,
            prefix,
            interval=self.interval,
            after=max((int(n) for n in names if n.isdigit()), default=0),
        )


class ContinuingS3Channel(dp.PipesS3MessageWriterChannel):
    def __init__(self, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._after = after

    def upload_messages_chunk(self, payload, index: int) -> None:
        super().upload_messages_chunk(payload, index + self._after)


@contextlib.contextmanager
def dagster_pipes(hp: dict):
    """The Dagster Pipes session the orchestrator opened, if any.

    Its bootstrap parameters come as hyperparameters: SageMaker caps environment values at
    512 characters, hyperparameters go everywhere the job does. S3 parameters (a bucket) mean
    the S3 context loader and message writer; otherwise the default file-based ones.
    """
    raw = {
        "DAGSTER_PIPES_CONTEXT": hp.get("dagster_pipes_context"),
        "DAGSTER_PIPES_MESSAGES": hp.get("dagster_pipes_messages"),
    }
    if not raw["DAGSTER_PIPES_CONTEXT"]:
        yield None
        return
    on_s3 = "bucket" in dp.decode_param(raw["DAGSTER_PIPES_CONTEXT"])
    if on_s3:
        import boto3

        s3 = boto3.client("s3")
        loader, writer = (
            dp.PipesS3ContextLoader(s3),
            ContinuingS3MessageWriter(s3, interval=float(hp.get("pipes_interval", 10))),
        )
    else:
        loader, writer = dp.PipesDefaultContextLoader(), dp.PipesDefaultMessageWriter()
    with dp.open_dagster_pipes(
        params_loader=dp.PipesMappingParamsLoader(raw), context_loader=loader, message_writer=writer
    ) as pipes:
        yield pipes


def hyperparameters() -> dict:
    path = (
        Path(os.environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
    )
    given = json.loads(path.read_text()) if path.exists() else {}
    hp = {**DEFAULTS, **task_defaults(given.get("task", DEFAULTS["task"]))}
    for k, v in given.items():
        default = DEFAULTS.get(k)
        hp[k] = (
            type(default)(v)
            if isinstance(default, (int, float)) and not isinstance(default, bool)
            else v
        )
    if hp["tuning_job"] and os.environ.get("TRAINING_JOB_NAME"):
        hp["checkpoint_dir"] = str(Path(hp["checkpoint_dir"]) / os.environ["TRAINING_JOB_NAME"])
    return hp


def evaluate(model: nn.Module, batches) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` over ``batches``; NaNs when there are none."""
    model.eval()
    loss, right, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            right += int((logits.argmax(1) == y).sum())
            n += len(y)
    return (loss / n, right / n) if n else (float("nan"), float("nan"))


def train() -> dict:
    hp = hyperparameters()
    with dagster_pipes(hp) as pipes:
        return _train(hp, pipes)


def _train(hp: dict, pipes) -> dict:
    started = time.perf_counter()
    live = _live_metrics(hp)

    def say(line: str) -> None:
        print(line, flush=True)  # stdout: SageMaker's metric definitions and CloudWatch
        if pipes is not None:
            pipes.log.info(line)  # Dagster: the run's log, live

    if hp["task"] == "detection":
        from workloads.training.train_detection import train_detection

        return train_detection(hp, say, live, started)
    torch.manual_seed(hp["seed"])
    np.random.seed(hp["seed"])
    shards_root = Path(os.environ["SM_CHANNEL_SHARDS"])
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    output_dir = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    ckpt_dir = Path(hp["checkpoint_dir"])
    for d in (model_dir, output_dir, ckpt_dir):
        d.mkdir(parents=True, exist_ok=True)

    size, variant, batch = hp["input_size"], hp["variant"], hp["batch_size"]
    index = json.loads((shards_root / "index.json").read_text())
    if index["variant"] != variant:
        raise SystemExit(f"the shards given hold the {index['variant']} variant, not {variant}")
    classes = train_classes(index)
    counts = {
        split: sum(n for label, n in index["splits"][split]["labels"].items() if label in classes)
        for split in SPLITS
    }
    shards = {split: split_shards(shards_root, index, split) for split in SPLITS}
    ch = channels(variant)
    mean, std = channel_stats(first_images(shards["train"][0], STATS_IMAGES), ch, size)
    pre = Preprocess(size=size, channels=ch, mean=mean, std=std)
    arch = {
        "name": hp["arch"],
        "in_channels": ch,
        "num_classes": len(classes),
        "input_size": size,
        "width": hp["width"] or DEFAULT_WIDTH[hp["arch"]],
    }
    init = _init_record(hp) if hp["init_weights"] else None
    if init is not None:
        arch["width"] = _check_init(init, arch, hp)
        pre = Preprocess(size=size, channels=ch, mean=init["mean"], std=init["std"])
    model = build_model(arch)
    if init is not None:
        say(_start_from(model, init, classes))
    epochs = epochs_for(hp, counts["train"])
    total = epochs * max(1, math.ceil(counts["train"] / batch))
    opt, sched = optimizer(model, hp, total)
    ckpt_path = ckpt_dir / "checkpoint.pt"
    state = resume(ckpt_path, model, opt, sched, say)
    say(
        f"train={counts['train']} val={counts['val']} test={counts['test']} classes={len(classes)} "
        f"variant={variant} arch={hp['arch']} epochs={epochs} steps={total}"
    )
    workers = input_workers(int(hp["workers"]), counts["train"])
    train_data = ShardImages(
        shards["train"][0],
        classes,
        pre,
        augment=hp["augment"],
        seed=hp["seed"],
        buffer=SHUFFLE_BUFFER,
        digests=shards["train"][1],
    )
    held_out = {
        s: loader(
            ShardImages(shards[s][0], classes, pre, shuffle=False, digests=shards[s][1]),
            batch,
            workers,
        )
        for s in ("val", "test")
    }
    smoothing = hp["label_smoothing"]
    resumed_at = state["epoch"]
    for epoch in range(resumed_at, epochs):
        if hp["patience"] and state["bad_epochs"] >= hp["patience"]:
            break
        train_data.set_epoch(epoch)
        began = time.perf_counter()
        rec = _run_epoch(model, opt, sched, loader(train_data, batch, workers), smoothing)
        first = rec.pop("first_step_s")
        if epoch == resumed_at and first is not None:  # this process's first optimizer step
            say(f"first_step_s={began - started + first:.3f}")
        rec["val_loss"], rec["val_accuracy"] = evaluate(model, held_out["val"])
        rec["epoch"], rec["lr"] = epoch + 1, sched.get_last_lr()[0]
        state["history"].append(rec)
        if not rec["val_loss"] >= state["best_val_loss"]:  # a NaN (no val split) counts as better
            state.update(best_val_loss=rec["val_loss"], best_epoch=epoch + 1, bad_epochs=0)
            state["best"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        save_checkpoint(ckpt_path, model, opt, sched, state)
        # SageMaker metric definitions parse these lines (printed once the epoch is checkpointed).
        say(
            f"epoch={rec['epoch']} train_loss={rec['train_loss']:.4f} val_loss={rec['val_loss']:.4f} val_accuracy={rec['val_accuracy']:.4f}"
        )
        live(rec)
    if hp["patience"] and state["epoch"] < epochs:
        say(f"early stop after epoch {state['epoch']}: no better val loss in {hp['patience']}")
    model.load_state_dict(state["best"])
    kept = kept_value(state["history"], state["best_epoch"], "val_accuracy")
    say(
        f"kept epoch {state['best_epoch']}'s weights (the best val loss, "
        f"{state['best_val_loss']:.4f}): val_accuracy={kept:.4f}"
    )
    test_loss, test_acc = evaluate(model, held_out["test"])
    say(f"test_loss={test_loss:.4f} test_accuracy={test_acc:.4f}")
    metrics = {
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "classes": classes,
        "counts": counts,
        "preprocess": json.loads(pre.to_json()),
        "hyperparameters": {
            k: v for k, v in hp.items() if not k.startswith(("dagster_pipes", "pipes_", "mlflow_"))
        },
    }
    _save_model(model_dir, model, arch, classes, variant, pre, metrics)
    return metrics


def _init_record(hp: dict) -> dict:
    """The saved model a training starts from (weights-only; the init channel's file
    ``init_weights``), checked against its sha256; with the normalisation it was trained with
    (kept: its first layers expect it)."""
    path = Path(os.environ["SM_CHANNEL_INIT"]) / hp["init_weights"]
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != hp["init_sha256"]:
        raise SystemExit(
            f"init weights {hp['init_weights']}: sha256 {got[:12]}, not {hp['init_sha256'][:12]}"
        )
    record = load_record(path)
    pre = record.get("preprocess") or {}
    channels = record["arch"].get("in_channels", 1)
    return {
        **record,
        "mean": tuple(pre.get("mean", (0.0,) * channels)),
        "std": tuple(pre.get("std", (1.0,) * channels)),
    }


def _check_init(init: dict, arch: dict, hp: dict) -> int:
    """The width the model takes from the weights it starts from; SystemExit (one line) when the
    spec asks for a net they cannot fill."""
    theirs = init["arch"]
    if theirs.get("task", "classification") != "classification":
        raise SystemExit("init_from is a detector: a classifier starts from a classifier")
    name = theirs.get("name") or "small_cnn"
    if name != arch["name"]:
        raise SystemExit(f"init_from is a {name} model: train it with --arch {name}")
    if theirs.get("in_channels", 1) != arch["in_channels"]:
        raise SystemExit(
            f"init_from takes {theirs.get('in_channels', 1)} channel(s), the variant "
            f"{hp['variant']} gives {arch['in_channels']}: train on its variant"
        )
    width = theirs.get("width") or DEFAULT_WIDTH[name]
    if hp["width"] and hp["width"] != width:
        raise SystemExit(f"init_from has width {width}, not {hp['width']}: leave --width unset")
    return width


def _start_from(model: nn.Module, init: dict, classes: list[str]) -> str:
    """Load ``init``'s weights into ``model``: all of them for the same classes, all but the head
    (a new one, initialised) for others. Returns the line that says which."""
    state = init["state_dict"]
    if init["classes"] == classes:
        model.load_state_dict(state)
        return f"started from the weights given (same {len(classes)} classes)"
    head = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if m is head_of(model)
        for p in ("weight", "bias")
    }
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    return f"started from the weights given with a new head: {len(init['classes'])} classes there, {len(classes)} here"


def tracking_credentials(secret_arn: str) -> dict[str, str]:
    """MLflow's credential variables from the tracking server's secret (JSON username, password),
    read with the job's own role."""
    import boto3

    secret = json.loads(
        boto3.client("secretsmanager").get_secret_value(SecretId=secret_arn)["SecretString"]
    )
    return {
        "MLFLOW_TRACKING_USERNAME": secret["username"],
        "MLFLOW_TRACKING_PASSWORD": secret["password"],
    }


def _live_metrics(hp: dict):
    """``log(epoch record)``: each epoch's metrics into the trainer's MLflow run as they are
    made, when it gave one; else nothing (the trainer logs the history when the job ends)."""
    if not hp["mlflow_run_id"]:
        return lambda rec: None
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    if hp["mlflow_secret_arn"]:
        os.environ.update(tracking_credentials(hp["mlflow_secret_arn"]))
    client = MlflowClient(hp["mlflow_tracking_uri"] or None)

    failed = []

    def log(rec: dict) -> None:
        """Best effort: a server the job cannot reach (no route from its network, no
        credentials) costs the live curve, not the training; the trainer logs what is missing
        when the job ends."""
        if failed:
            return
        now = int(time.time() * 1000)
        try:
            client.log_batch(
                hp["mlflow_run_id"],
                metrics=[
                    Metric(k, float(v), now, rec["epoch"])
                    for k, v in rec.items()
                    if k not in ("epoch", "seconds") and not math.isnan(v)
                ],
            )
        except Exception as e:  # MLflow's errors after its own retries
            failed.append(e)
            print(f"live metrics off: {hp['mlflow_tracking_uri']}: {type(e).__name__}: {e}"[:500])

    return log


def train_classes(index: dict) -> list[str]:
    """The labels of the shards' train split, sorted: the model's classes, in output order."""
    classes = sorted(index["splits"]["train"]["labels"])
    if len(classes) < 2:
        raise SystemExit(f"need at least 2 labelled classes in the train split, found {classes}")
    return classes


def _run_epoch(model: nn.Module, opt, sched, batches, label_smoothing: float) -> dict:
    """One pass over the train split's batches; the mean loss and the time it took."""
    t0 = time.perf_counter()
    model.train()
    total, n, first = 0.0, 0, None
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(y)
        n += len(y)
        first = time.perf_counter() - t0 if first is None else first
    return {
        "train_loss": total / max(n, 1),
        "seconds": time.perf_counter() - t0,
        "first_step_s": first,
    }


def _save_model(
    model_dir: Path,
    model: nn.Module,
    arch: dict,
    classes: list[str],
    variant: str,
    pre: Preprocess,
    metrics: dict,
) -> None:
    """What SageMaker uploads: the weights with what they need to be loaded and fed, the metrics."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "arch": arch,
            "classes": classes,
            "variant": variant,
            "preprocess": json.loads(pre.to_json()),
        },
        model_dir / "model.pt",
    )
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    train()
    sys.exit(0)

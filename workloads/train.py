"""Training entry with SageMaker's file and environment layout.

SageMaker (and the local trainer, which mimics it) provides:
  SM_INPUT_CONFIG_DIR/hyperparameters.json   values are strings, as SageMaker writes them
  SM_CHANNEL_MANIFEST/manifest.parquet        the frozen subset's manifest
  SM_CHANNEL_IMAGES/<lake key>                the subset's images at their lake keys
  SM_MODEL_DIR, SM_OUTPUT_DATA_DIR            outputs; SageMaker uploads them
Checkpoints go to ``checkpoint_dir`` (SageMaker syncs /opt/ml/checkpoints with S3), and a
restarted job (spot reclaim) resumes from the last epoch saved there.

    python -m workloads.train
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import cv2
import dagster_pipes as dp
import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from workloads.layout import VARIANT_COLUMNS
from workloads.model import build_model, load_record
from workloads.spec import TRAIN_SPEC

DEFAULTS = {**TRAIN_SPEC, "checkpoint_dir": "/opt/ml/checkpoints"}


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
    hp = dict(DEFAULTS)
    for k, v in given.items():
        default = DEFAULTS.get(k)
        hp[k] = (
            type(default)(v)
            if isinstance(default, (int, float)) and not isinstance(default, bool)
            else v
        )
    return hp


def load_images(rows: list[dict], images_root: Path, variant: str, input_size: int) -> np.ndarray:
    """Grayscale float32 array (N, 1, S, S) in [0, 1] of the rows' ``variant`` files."""
    col = VARIANT_COLUMNS[variant]
    out = np.empty((len(rows), 1, input_size, input_size), np.float32)
    for i, row in enumerate(rows):
        path = images_root / row[col]
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise FileNotFoundError(f"subset image {row['sha256']} not readable at {path}")
        if img.shape != (input_size, input_size):
            img = cv2.resize(img, (input_size, input_size), interpolation=cv2.INTER_AREA)
        out[i, 0] = img.astype(np.float32) / 255.0
    return out


def load_split(
    manifest_path: Path,
    images_root: Path,
    split: str,
    classes: list[str],
    variant: str,
    input_size: int,
):
    rows = [
        r
        for r in pq.read_table(manifest_path).to_pylist()
        if r["split"] == split and r["label"] in classes
    ]
    x = load_images(rows, images_root, variant, input_size)
    y = np.array([classes.index(r["label"]) for r in rows], np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x) if len(x) else torch.zeros((0, 1))
        if not len(x):
            return float("nan"), float("nan")
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


def train() -> dict:
    hp = hyperparameters()
    with dagster_pipes(hp) as pipes:
        return _train(hp, pipes)


def _train(hp: dict, pipes) -> dict:
    def say(line: str) -> None:
        print(line, flush=True)  # stdout: SageMaker's metric definitions and CloudWatch
        if pipes is not None:
            pipes.log.info(line)  # Dagster: the run's log, live

    torch.manual_seed(hp["seed"])
    np.random.seed(hp["seed"])
    manifest = Path(os.environ["SM_CHANNEL_MANIFEST"]) / "manifest.parquet"
    images_root = Path(os.environ["SM_CHANNEL_IMAGES"])
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    output_dir = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    ckpt_dir = Path(hp["checkpoint_dir"])
    for d in (model_dir, output_dir, ckpt_dir):
        d.mkdir(parents=True, exist_ok=True)

    classes = train_classes(manifest)
    size, variant = hp["input_size"], hp["variant"]
    data = {
        split: load_split(manifest, images_root, split, classes, variant, size)
        for split in ("train", "val", "test")
    }
    counts = {split: len(y) for split, (_, y) in data.items()}
    arch = {"in_channels": 1, "num_classes": len(classes), "input_size": size, "width": hp["width"]}
    model = build_model(arch)
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    ckpt_path = ckpt_dir / "checkpoint.pt"
    history, start_epoch = _resume(ckpt_path, model, opt, say)
    say(
        f"train={counts['train']} val={counts['val']} test={counts['test']} classes={len(classes)} variant={variant}"
    )

    for epoch in range(start_epoch, hp["epochs"]):
        rec = _run_epoch(model, opt, data, hp["batch_size"], epoch)
        history.append(rec)
        _save_checkpoint(ckpt_path, model, opt, history, epoch + 1)
        # SageMaker metric definitions parse these lines (printed once the epoch is checkpointed).
        say(
            f"epoch={rec['epoch']} train_loss={rec['train_loss']:.4f} val_loss={rec['val_loss']:.4f} val_accuracy={rec['val_accuracy']:.4f}"
        )

    test_loss, test_acc = evaluate(model, *data["test"])
    say(f"test_loss={test_loss:.4f} test_accuracy={test_acc:.4f}")
    metrics = {
        "history": history,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "classes": classes,
        "counts": counts,
        "hyperparameters": {
            k: v for k, v in hp.items() if not k.startswith(("dagster_pipes", "pipes_"))
        },
    }
    _save_model(model_dir, model, arch, classes, variant, metrics)
    return metrics


def train_classes(manifest: Path) -> list[str]:
    """The labels of the train split, sorted: the model's classes, in output order."""
    labels = pq.read_table(manifest, columns=["label", "split"]).to_pylist()
    classes = sorted(
        {r["label"] for r in labels if r["label"] is not None and r["split"] == "train"}
    )
    if len(classes) < 2:
        raise SystemExit(f"need at least 2 labelled classes in the train split, found {classes}")
    return classes


def _resume(ckpt_path: Path, model: nn.Module, opt, say) -> tuple[list[dict], int]:
    """(history, epochs done): from the checkpoint if a spot reclaim restarted the job."""
    if not ckpt_path.exists():
        return [], 0
    ckpt = load_record(ckpt_path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    say(f"resumed from checkpoint at epoch {ckpt['epoch']}")
    return ckpt["history"], ckpt["epoch"]


def _run_epoch(model: nn.Module, opt, data: dict, batch_size: int, epoch: int) -> dict:
    """One pass over the train split, then the val split's loss and accuracy."""
    t0 = time.perf_counter()
    xtr, ytr = data["train"]
    model.train()
    perm = torch.randperm(len(xtr))
    total, n = 0.0, 0
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        xb = xtr[idx]
        # light augmentation: random shifts of up to 2 px
        shift = tuple(int(s) for s in torch.randint(-2, 3, (2,)))
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), ytr[idx])
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        n += len(idx)
    val_loss, val_acc = evaluate(model, *data["val"])
    return {
        "epoch": epoch + 1,
        "train_loss": total / max(n, 1),
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "seconds": time.perf_counter() - t0,
    }


def _save_checkpoint(
    ckpt_path: Path, model: nn.Module, opt, history: list[dict], epoch: int
) -> None:
    tmp = ckpt_path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "history": history,
            "epoch": epoch,
            "rng": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, ckpt_path)  # atomic: a reclaim never leaves half a checkpoint


def _save_model(
    model_dir: Path, model: nn.Module, arch: dict, classes: list[str], variant: str, metrics: dict
) -> None:
    """What SageMaker uploads: the weights with what they need to be loaded, and the metrics."""
    torch.save(
        {"state_dict": model.state_dict(), "arch": arch, "classes": classes, "variant": variant},
        model_dir / "model.pt",
    )
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    train()
    sys.exit(0)

"""The training entry's detection loop (``task=detection``): the same SageMaker layout, shards,
checkpoints and resume as a classifier's (``workloads.training.train``), with a ``CenterNet``
on the chosen backbone, ``ShardDetections`` as its input, and the COCO mAP of the val split
(pycocotools) choosing the epoch kept."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from workloads.training.coco_eval import ImageBoxes, coco_scores, detections_of
from workloads.training.data import SHUFFLE_BUFFER, Preprocess, ShardDetections, loader
from workloads.training.detection import CenterNet, loss
from workloads.training.loop import (
    input_workers,
    kept_value,
    optimizer,
    resume,
    save_checkpoint,
)
from workloads.training.models import DEFAULT_WIDTH
from workloads.training.preprocess import channel_stats
from workloads.training.shards import STATS_IMAGES, first_images, split_shards
from workloads.training.spec import channels, epochs_for
from workloads.versions import SPLITS

MIN_SCORE = 0.001  # detections scored (COCO's evaluation keeps the best 100 per image anyway)


def detection_classes(index: dict) -> list[str]:
    """The box categories of the shards' train split, sorted: the detector's classes."""
    classes = sorted(index["splits"]["train"].get("categories", {}))
    if not classes:
        raise SystemExit(
            "the train split has no boxes: a detector needs a subset frozen with boxes "
            "(COCO, VOC or YOLO annotations in its packs)"
        )
    return classes


def predict_batches(model: CenterNet, batches) -> tuple[list[ImageBoxes], list[ImageBoxes], float]:
    """(ground truth, detections, mean loss) over ``batches`` of ``ShardDetections``."""
    from workloads.training.detection import decode

    model.eval()
    truth, found, total, n = [], [], 0.0, 0
    with torch.no_grad():
        for x, t in batches:
            out = model(x)
            value, _ = loss(out, t)
            total += value.item() * len(x)
            n += len(x)
            for det, boxes, labels, crowd, valid in zip(
                decode(*out).numpy(), t["boxes"], t["labels"], t["crowd"], t["valid"]
            ):
                v = valid.numpy()
                truth.append(
                    ImageBoxes(boxes.numpy()[v], labels.numpy()[v], crowd=crowd.numpy()[v])
                )
                found.append(detections_of(det, MIN_SCORE))
    return truth, found, (total / n if n else float("nan"))


def train_detection(hp: dict, say, live, started: float) -> dict:
    """Train a detector as ``hp`` says, from the shards at ``SM_CHANNEL_SHARDS``; the metrics
    (``test_map``, ``test_map50``, per class, history) it saves with ``model.pt``."""
    import os

    torch.manual_seed(hp["seed"])
    np.random.seed(hp["seed"])
    shards_root = Path(os.environ["SM_CHANNEL_SHARDS"])
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    ckpt_dir = Path(hp["checkpoint_dir"])
    for d in (model_dir, ckpt_dir):
        d.mkdir(parents=True, exist_ok=True)
    size, variant, batch = hp["input_size"], hp["variant"], hp["batch_size"]
    index = json.loads((shards_root / "index.json").read_text())
    if index["variant"] != variant:
        raise SystemExit(f"the shards given hold the {index['variant']} variant, not {variant}")
    if index.get("format", 1) < 2:
        raise SystemExit("the shards given carry no boxes: write them again (training_shards)")
    classes = detection_classes(index)
    counts = {s: index["splits"].get(s, {}).get("count", 0) for s in SPLITS}
    shards = {s: split_shards(shards_root, index, s) for s in SPLITS}
    ch = channels(variant)
    mean, std = channel_stats(first_images(shards["train"][0], STATS_IMAGES), ch, size)
    pre = Preprocess(size=size, channels=ch, mean=mean, std=std)
    arch = {
        "task": "detection",
        "name": hp["arch"],
        "in_channels": ch,
        "num_classes": len(classes),
        "input_size": size,
        "width": hp["width"] or DEFAULT_WIDTH[hp["arch"]],
    }
    model = CenterNet(arch)
    epochs = epochs_for(hp, counts["train"])
    total = epochs * max(1, math.ceil(counts["train"] / batch))
    opt, sched = optimizer(model, hp, total)
    ckpt_path = ckpt_dir / "checkpoint.pt"
    state = resume(ckpt_path, model, opt, sched, say)
    state.setdefault("best_val_map", -1.0)
    boxes = {s: sum(index["splits"].get(s, {}).get("categories", {}).values()) for s in SPLITS}
    say(
        f"task=detection train={counts['train']} val={counts['val']} test={counts['test']} "
        f"boxes={boxes['train']} classes={len(classes)} variant={variant} arch={hp['arch']} "
        f"input={size} epochs={epochs} steps={total}"
    )
    workers = input_workers(int(hp["workers"]), counts["train"])

    def data(split: str, **kw) -> ShardDetections:
        return ShardDetections(
            shards[split][0], classes, pre, variant=variant, digests=shards[split][1], **kw
        )

    train_data = data("train", augment=hp["augment"], seed=hp["seed"], buffer=SHUFFLE_BUFFER)
    held_out = {s: loader(data(s, shuffle=False), batch, workers) for s in ("val", "test")}
    resumed_at = state["epoch"]
    for epoch in range(resumed_at, epochs):
        if hp["patience"] and state["bad_epochs"] >= hp["patience"]:
            break
        train_data.set_epoch(epoch)
        began = time.perf_counter()
        rec = _run_epoch(model, opt, sched, loader(train_data, batch, workers))
        first = rec.pop("first_step_s")
        if epoch == resumed_at and first is not None:
            say(f"first_step_s={began - started + first:.3f}")
        truth, found, rec["val_loss"] = predict_batches(model, held_out["val"])
        val = coco_scores(truth, found, classes) if truth else {"map": float("nan"), "map50": 0.0}
        rec["val_map"], rec["val_map50"] = val["map"], val["map50"]
        rec["epoch"], rec["lr"] = epoch + 1, sched.get_last_lr()[0]
        state["history"].append(rec)
        if not rec["val_map"] <= state["best_val_map"]:  # a NaN (no val split) counts as better
            state.update(best_val_map=rec["val_map"], best_epoch=epoch + 1, bad_epochs=0)
            state["best_val_loss"] = rec["val_loss"]
            state["best"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        save_checkpoint(ckpt_path, model, opt, sched, state)
        say(
            f"epoch={rec['epoch']} train_loss={rec['train_loss']:.4f} val_loss={rec['val_loss']:.4f} "
            f"val_map={rec['val_map']:.4f} val_map50={rec['val_map50']:.4f}"
        )
        live(rec)
    if hp["patience"] and state["epoch"] < epochs:
        say(f"early stop after epoch {state['epoch']}: no better val mAP in {hp['patience']}")
    model.load_state_dict(state["best"])
    say(
        f"kept epoch {state['best_epoch']}'s weights (the best val mAP): "
        f"val_map={kept_value(state['history'], state['best_epoch'], 'val_map'):.4f}"
    )
    truth, found, test_loss = predict_batches(model, held_out["test"])
    test = coco_scores(truth, found, classes)
    say(
        f"test_loss={test_loss:.4f} test_map={test['map']:.4f} test_map50={test['map50']:.4f} "
        f"({test['boxes']} boxes, {test['images']} images)"
    )
    metrics = {
        "task": "detection",
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "test_loss": test_loss,
        "test_map": test["map"],
        "test_map50": test["map50"],
        "test_per_class": test["per_class"],
        "classes": classes,
        "counts": counts,
        "boxes": boxes,
        "preprocess": json.loads(pre.to_json()),
        "hyperparameters": {
            k: v for k, v in hp.items() if not k.startswith(("dagster_pipes", "pipes_", "mlflow_"))
        },
    }
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
    return metrics


def _run_epoch(model: CenterNet, opt, sched, batches) -> dict:
    t0 = time.perf_counter()
    model.train()
    total, n, first = 0.0, 0, None
    for x, targets in batches:
        opt.zero_grad()
        value, _ = loss(model(x), targets)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        total += value.item() * len(x)
        n += len(x)
        first = time.perf_counter() - t0 if first is None else first
    return {
        "train_loss": total / max(n, 1),
        "seconds": time.perf_counter() - t0,
        "first_step_s": first,
    }

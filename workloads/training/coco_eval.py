"""Detections scored as COCO scores them, by pycocotools' own ``COCOeval`` (the reference
implementation): mAP@[.5:.95], mAP@0.5, mAP@0.75, AP per class (over the IoUs, area all, 100
detections per image), and each class's precision-recall curve at IoU 0.5. Crowd boxes are
ground truth with ``iscrowd`` 1: a detection on one is neither a hit nor a false positive.
Free of torch."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageBoxes:
    """One image's ground truth (``scores`` None) or detections: xyxy boxes in any one pixel
    space per image (IoU is the same in all of them), class indexes, crowd flags."""

    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1
    labels: np.ndarray  # (N,) int
    scores: np.ndarray | None = None  # (N,) detections only
    crowd: np.ndarray | None = None  # (N,) bool, ground truth only


def coco_scores(
    truth: Sequence[ImageBoxes], found: Sequence[ImageBoxes], classes: Sequence[str]
) -> dict:
    """``{"map", "map50", "map75", "per_class": {class: AP}, "pr": {class: {"recall",
    "precision"}}, "images", "boxes"}`` of detections ``found`` against ``truth`` (image i of
    each is the same image). A class with no ground truth box has no AP (left out of the mean,
    as COCO does)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dt = _coco_json(truth, found, classes)
    empty = {
        "map": 0.0,
        "map50": 0.0,
        "map75": 0.0,
        "per_class": {},
        "pr": {},
        "images": len(truth),
        "boxes": len(gt["annotations"]),
    }
    if not gt["annotations"]:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not dt:
            return empty | {"per_class": {c: 0.0 for c in _present(gt, classes)}}
        coco_dt = coco_gt.loadRes(dt)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: (IoU thresholds, recall points, classes, areas, max dets); -1 where undefined
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class, pr = {}, {}
    for k, name in enumerate(classes):
        p = precision[:, :, k]
        if (p > -1).any():
            per_class[name] = float(np.mean(p[p > -1]))
            at50 = precision[0, :, k]
            pr[name] = {
                "recall": [float(r) for r in ev.params.recThrs],
                "precision": [float(max(v, 0.0)) for v in at50],
            }
    return {
        "map": max(float(ev.stats[0]), 0.0),
        "map50": max(float(ev.stats[1]), 0.0),
        "map75": max(float(ev.stats[2]), 0.0),
        "per_class": per_class,
        "pr": pr,
        "images": len(truth),
        "boxes": len(gt["annotations"]),
    }


def _present(gt: dict, classes: Sequence[str]) -> list[str]:
    ids = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    return [c for k, c in enumerate(classes) if k + 1 in ids]


def _coco_json(
    truth: Sequence[ImageBoxes], found: Sequence[ImageBoxes], classes: Sequence[str]
) -> tuple[dict, list[dict]]:
    """COCO's ground-truth dict and result list (xywh; category ids are class index + 1)."""
    if len(truth) != len(found):
        raise ValueError(f"{len(truth)} images of ground truth, {len(found)} of detections")
    images, annotations, results = [], [], []
    for i, (t, f) in enumerate(zip(truth, found), start=1):
        images.append({"id": i})
        crowd = t.crowd if t.crowd is not None else np.zeros(len(t.boxes), bool)
        for box, label, is_crowd in zip(np.asarray(t.boxes), t.labels, crowd):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(label) + 1,
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": int(bool(is_crowd)),
                }
            )
        for box, label, score in zip(np.asarray(f.boxes), f.labels, f.scores):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(label) + 1,
                    "bbox": [
                        float(box[0]),
                        float(box[1]),
                        float(box[2] - box[0]),
                        float(box[3] - box[1]),
                    ],
                    "score": float(score),
                }
            )
    gt = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
    }
    return gt, results


def detections_of(rows: np.ndarray, min_score: float = 0.0) -> ImageBoxes:
    """An image's ``(K, 6)`` decoded detections (``[x0, y0, x1, y1, score, class]``) as
    ``ImageBoxes``, those scoring at least ``min_score``."""
    rows = np.asarray(rows, np.float64).reshape(-1, 6)
    rows = rows[rows[:, 4] >= min_score]
    return ImageBoxes(rows[:, :4], rows[:, 5].astype(np.int64), scores=rows[:, 4])


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy ``box`` with each of ``boxes`` (N, 4)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)

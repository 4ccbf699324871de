"""A trained model scored on a subset's rows it never trained on, the pictures as PNG bytes.

A classifier: accuracy, per-class precision, recall and F1, the confusion matrix, and the worst
misclassified images (the wrong answers it was surest of). A detector: COCO mAP@[.5:.95],
mAP@0.5 and AP per class (``coco_eval``, pycocotools), each class's precision-recall curve, and
the images with the most misses and false detections, drawn against their ground truth."""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
import torch

from workloads.layout import VARIANT_COLUMNS
from workloads.training.checkpoint import load_checkpoint
from workloads.training.coco_eval import box_iou
from workloads.training.predict import MIN_SCORE as WORST_MIN_SCORE
from workloads.training.predict import draw_boxes
from workloads.training.preprocess import decode, model_preprocess

WORST = 16  # misclassified images in the grid


def per_class(confusion: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows: true label)."""
    out = {}
    for i, c in enumerate(classes):
        tp = int(confusion[i, i])
        predicted, support = int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def score(
    model_path: str, rows: list[dict], read: Callable[[str], bytes], batch: int = 256
) -> tuple[dict, list[tuple[bytes, str]]]:
    """(the scores of the model at ``model_path`` on ``rows`` — manifest rows, its variant's
    files read by ``read(key)`` — and the worst misclassified as (image bytes, caption)). Rows
    whose label the model does not know are counted, not scored."""
    model, saved = load_checkpoint(model_path)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(x)), 1).numpy()

    return _scores(
        classes=saved["classes"],
        pre=model_preprocess(saved),
        column=VARIANT_COLUMNS[saved["variant"]],
        rows=rows,
        read=read,
        forward=forward,
        batch=batch,
    )


def score_onnx(
    model_path: str, record: dict, rows: list[dict], read: Callable[[str], bytes], batch: int = 256
) -> tuple[dict, list[tuple[bytes, str]]]:
    """``score`` of an ONNX model (an entry point's, ``workloads.training.byo``), its classes and
    preprocessing as its model record says, run by onnxruntime; outputs softmaxed unless they
    are probabilities already."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: np.ndarray) -> np.ndarray:
        out = session.run(None, {name: x})[0].astype(np.float64)
        if np.all(out >= 0) and np.allclose(out.sum(1), 1, atol=1e-4):
            return out.astype(np.float32)
        e = np.exp(out - out.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    return _scores(
        classes=record["classes"],
        pre=model_preprocess(record),
        column=VARIANT_COLUMNS[record["spec"]["variant"]],
        rows=rows,
        read=read,
        forward=forward,
        batch=batch,
    )


def _scores(*, classes, pre, column, rows, read, forward, batch):
    known = [r for r in rows if r["label"] in classes]
    data = [read(r[column]) for r in known]
    x = np.stack([pre(decode(d, pre.channels)) for d in data]) if data else None
    y = np.array([classes.index(r["label"]) for r in known], np.int64)
    probs = np.zeros((0, len(classes)), np.float32)
    if x is not None:
        probs = np.concatenate([forward(x[i : i + batch]) for i in range(0, len(x), batch)])
    pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (y, pred), 1)
    classes_scores = per_class(confusion, classes)
    wrong = sorted(np.flatnonzero(pred != y), key=lambda i: -probs[i, pred[i]])[:WORST]
    worst = [
        (data[i], f"{known[i]['label']} → {classes[pred[i]]} ({probs[i, pred[i]]:.2f})")
        for i in wrong
    ]
    scores = {
        "rows": len(rows),
        "scored": len(known),
        "unknown_labels": len(rows) - len(known),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in classes_scores.values()])),
        "classes": classes,
        "per_class": classes_scores,
        "confusion": confusion.tolist(),
        "worst": [
            {
                "sha256": known[i]["sha256"],
                "label": known[i]["label"],
                "predicted": classes[pred[i]],
            }
            for i in wrong
        ],
    }
    return scores, worst


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def confusion_png(scores: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, classes = np.array(scores["confusion"]), scores["classes"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(classes), 1.2 + 0.45 * len(classes)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def worst_png(worst: list[tuple[bytes, str]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(worst))
    cols = min(4, n)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols,
        cols,
        figsize=(2 * cols, 2.2 * ((n + cols - 1) // cols)),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, (data, caption) in zip(axes.flat, worst):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        ax.imshow(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title if worst else f"{title}: none misclassified")
    fig.tight_layout()
    return _png(fig)


# -- detectors -----------------------------------------------------------------------------------


def _image_errors(truth, found) -> tuple[int, int]:
    """(ground-truth boxes missed, detections on nothing) of one image at IoU 0.5, detections
    scoring ``WORST_MIN_SCORE`` or more, each box matched once, by score (crowd boxes: neither)."""
    keep = found.scores >= WORST_MIN_SCORE
    order = np.argsort(-found.scores[keep], kind="stable")
    boxes, labels = found.boxes[keep][order], found.labels[keep][order]
    crowd = truth.crowd if truth.crowd is not None else np.zeros(len(truth.boxes), bool)
    used = np.zeros(len(truth.boxes), bool)
    false_positives = 0
    for box, label in zip(boxes, labels):
        ious = box_iou(box, truth.boxes)
        ious[(truth.labels != label) | used] = 0
        j = int(ious.argmax()) if len(ious) else -1
        if j >= 0 and ious[j] >= 0.5:
            used[j] = not crowd[j]  # a crowd box takes any number of detections
        else:
            false_positives += 1
    return int((~used & ~crowd).sum()), false_positives


def run_detector(model, pre, images: list[np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Each image's ``(TOP_K, 6)`` detections in its own pixels: stretched to the model's input,
    run, the boxes scaled back."""
    from workloads.training.detection import Detector

    detector = Detector(model).eval()
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        x = torch.from_numpy(np.stack([pre(img) for img in chunk]))
        with torch.no_grad():
            dets = detector(x).numpy().astype(np.float64)
        for img, d in zip(chunk, dets):
            h, w = img.shape[:2]
            d[:, [0, 2]] *= w / pre.size
            d[:, [1, 3]] *= h / pre.size
            out.append(d)
    return out


def score_detector(
    model_path: str, rows: list[dict], read: Callable[[str], bytes]
) -> tuple[dict, list[tuple[bytes, str]]]:
    """(the COCO scores of the detector at ``model_path`` on ``rows`` — manifest rows with
    ``objects``, ``width`` and ``height`` — and the worst images as (PNG bytes with the ground
    truth in green and the detections in red, caption)). Boxes of categories the detector does
    not know are counted, not scored."""
    from workloads.training.coco_eval import ImageBoxes, coco_scores, detections_of
    from workloads.training.preprocess import variant_boxes

    model, saved = load_checkpoint(model_path)
    classes, pre, variant = saved["classes"], model_preprocess(saved), saved["variant"]
    index = {c: i for i, c in enumerate(classes)}
    col = VARIANT_COLUMNS[variant]
    truth, images, unknown = [], [], 0
    for r in rows:
        img = decode(read(r[col]), pre.channels, r[col])
        boxes = r.get("objects") or []
        unknown += sum(b["category"] not in index for b in boxes)
        known = [b for b in boxes if b["category"] in index]
        xyxy, kept = variant_boxes(
            [(b["x"], b["y"], b["w"], b["h"]) for b in known],
            r["width"],
            r["height"],
            variant,
            img.shape[0],
        )
        truth.append(
            ImageBoxes(
                xyxy,
                np.array([index[known[i]["category"]] for i in kept], np.int64),
                crowd=np.array([bool(known[i].get("iscrowd")) for i in kept], bool),
            )
        )
        images.append(img)
    found = [detections_of(d, 0.001) for d in run_detector(model, pre, images)]
    coco = coco_scores(truth, found, classes)
    errors = [_image_errors(t, f) for t, f in zip(truth, found)]
    ranked = sorted(
        (i for i, e in enumerate(errors) if sum(e)), key=lambda i: (-sum(errors[i]), i)
    )[:WORST]
    worst = []
    for i in ranked:
        drawn = draw_boxes(images[i], found[i], classes, truth[i])
        ok, png = cv2.imencode(".png", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        missed, extra = errors[i]
        worst.append((png.tobytes(), f"{missed} missed, {extra} false"))
    scores = {
        "task": "detection",
        "rows": len(rows),
        "scored": len(rows),
        "boxes": coco["boxes"],
        "unknown_category_boxes": unknown,
        "map": coco["map"],
        "map50": coco["map50"],
        "map75": coco["map75"],
        "per_class": coco["per_class"],
        "pr": coco["pr"],
        "classes": classes,
        "worst": [
            {"sha256": rows[i]["sha256"], "missed": errors[i][0], "false_positives": errors[i][1]}
            for i in ranked
        ],
    }
    return scores, worst


def pr_png(scores: dict, title: str) -> bytes:
    """Each class's precision-recall curve at IoU 0.5, its AP@[.5:.95] in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for c, curve in scores["pr"].items():
        ax.plot(curve["recall"], curve["precision"], label=f"{c} (AP {scores['per_class'][c]:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{title}\nIoU 0.5; mAP@[.5:.95] {scores['map']:.3f}, mAP50 {scores['map50']:.3f}")
    if scores["pr"]:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _png(fig)

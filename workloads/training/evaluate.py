"""A trained model scored on a subset's rows it never trained on: accuracy, per-class precision,
recall and F1, the confusion matrix, and the worst misclassified images (the wrong answers it was
surest of), the pictures as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
import torch

from workloads.layout import VARIANT_COLUMNS
from workloads.training.models import load_checkpoint
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
    classes, pre = saved["classes"], model_preprocess(saved)
    col = VARIANT_COLUMNS[saved["variant"]]
    known = [r for r in rows if r["label"] in classes]
    data = [read(r[col]) for r in known]
    x = torch.from_numpy(np.stack([pre(decode(d, pre.channels)) for d in data])) if data else None
    y = np.array([classes.index(r["label"]) for r in known], np.int64)
    probs = np.zeros((0, len(classes)), np.float32)
    if x is not None:
        with torch.no_grad():
            probs = np.concatenate(
                [torch.softmax(model(x[i : i + batch]), 1).numpy() for i in range(0, len(x), batch)]
            )
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

"""An exported model on images: what ``preprocess.json`` says an input is, applied with the same
kernels that made the training images, then onnxruntime. Free of torch and dagster."""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np

from workloads.kernels import EdgeParams, ResizeParams, crop_geometry
from workloads.training.model_input import input_preprocess, model_input  # noqa: F401
from workloads.training.preprocess import decode, model_preprocess
from workloads.training.spec import TOP_K

MIN_SCORE = 0.3  # a detection reported (and drawn) scores at least this

STEPS = {
    "original": ["decode as displayed (EXIF orientation applied, alpha on white)"],
    "resized": [
        "decode as displayed (EXIF orientation applied, alpha on white)",
        "resize the short side to resize.size and centre-crop a square, stored as JPEG "
        "of resize.jpeg_quality (workloads.kernels.resize_bytes)",
    ],
}
STEPS["edges"] = [*STEPS["resized"], "Canny edges of that JPEG, edges.low/edges.high"]
TAIL = [
    "RGB (3 channels) or gray (1), as input.channels says",
    "resize to input_size x input_size (area)",
    "divide by 255, subtract mean and divide by std per channel: float32 CHW",
]


def preprocess_spec(model_record: dict, resize: ResizeParams, edges: EdgeParams) -> dict:
    """``preprocess.json`` of a model's exports: the input, the steps from an image file to it,
    the classes of the output."""
    spec = model_record["spec"]
    pre = model_preprocess({"arch": {"input_size": spec["input_size"]}, **model_record})
    return {
        "model": model_record["key"],
        "model_sha256": model_record["model_sha256"],
        "input": {
            "name": "image",
            "shape": ["batch", pre.channels, pre.size, pre.size],
            "dtype": "float32",
            "channels": pre.channels,
            "mean": list(pre.mean),
            "std": list(pre.std),
        },
        "input_size": pre.size,
        "variant": spec["variant"],
        "resize": dataclasses.asdict(resize),
        "edges": dataclasses.asdict(edges),
        "steps": [*STEPS[spec["variant"]], *TAIL],
        "output": output_spec(model_record),
    }


def output_spec(model_record: dict) -> dict:
    """What the exported model's output is: a classifier's logits, a detector's detections."""
    classes = model_record["classes"]
    if model_record["spec"].get("task") != "detection":
        return {"name": "logits", "classes": classes, "class": "argmax"}
    return {
        "name": "detections",
        "shape": ["batch", TOP_K, 6],
        "columns": ["x0", "y0", "x1", "y1", "score", "class"],
        "classes": classes,
        "boxes": "x0, y0, x1, y1 in the input's pixels (input_size square), best score first; "
        "in an image's own pixels: x * width / input_size, y * height / input_size (the "
        "original variant; the resized one: then undo its centre crop)",
        "class": "an index in classes",
    }


def image_boxes(dets: np.ndarray, pre: dict, width: int, height: int) -> np.ndarray:
    """A detector's ``(K, 6)`` detections (input pixels) in the pixels of the ``width`` x
    ``height`` image they were made from: the input's stretch undone, and for the resized and
    edges variants the resize and centre crop."""
    out = np.asarray(dets, np.float64).copy()
    size = pre["input_size"]
    if pre["variant"] == "original":
        out[:, [0, 2]] *= width / size
        out[:, [1, 3]] *= height / size
        return out
    side = pre["resize"]["size"]
    nw, nh, x0, y0 = crop_geometry(width, height, side)
    out[:, [0, 2]] = (out[:, [0, 2]] * side / size + x0) * width / nw
    out[:, [1, 3]] = (out[:, [1, 3]] * side / size + y0) * height / nh
    return out


def predict(
    model_path: str | os.PathLike,
    pre: dict,
    images: dict[str, bytes],
    min_score: float = MIN_SCORE,
) -> list[dict]:
    """A classifier's ``{"image", "class", "probability", "logits"}`` of each of ``{name:
    bytes}`` (its top class and softmax); a detector's ``{"image", "width", "height", "boxes":
    [{"class", "score", "x", "y", "w", "h"}]}``, boxes scoring ``min_score`` or more in the
    image's own pixels (x, y the top-left corner), best first. An image that cannot be read is
    a ValueError naming it."""
    import onnxruntime as ort

    inputs, sizes = [], []
    for name, data in images.items():
        try:
            x, wh = model_input(data, pre)
        except ValueError as e:  # BadMember too: the reason ingest would record
            raise ValueError(f"{name}: {e}") from None
        inputs.append(x)
        sizes.append(wh)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.stack(inputs)})[0]
    classes = pre["output"]["classes"]
    if pre["output"]["name"] == "detections":
        return [
            {
                "image": name,
                "width": w,
                "height": h,
                "boxes": [
                    {
                        "class": classes[int(d[5])],
                        "score": round(float(d[4]), 4),
                        "x": round(float(d[0]), 1),
                        "y": round(float(d[1]), 1),
                        "w": round(float(d[2] - d[0]), 1),
                        "h": round(float(d[3] - d[1]), 1),
                    }
                    for d in image_boxes(dets, pre, w, h)
                    if d[4] >= min_score
                ],
            }
            for name, dets, (w, h) in zip(images, out, sizes)
        ]
    z = np.exp(out - out.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return [
        {
            "image": name,
            "class": classes[int(row.argmax())],
            "probability": round(float(row.max()), 4),
            "logits": [round(float(v), 4) for v in lg],
        }
        for name, row, lg in zip(images, probs, out)
    ]


def draw_predictions(data: bytes, boxes: list[dict]) -> bytes:
    """PNG of the image ``data`` (as displayed) with ``predict``'s boxes drawn and labelled."""
    from workloads.training.coco_eval import ImageBoxes

    img = decode(data, 3)
    names = sorted({b["class"] for b in boxes})
    found = ImageBoxes(
        np.array([[b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]] for b in boxes]).reshape(
            -1, 4
        ),
        np.array([names.index(b["class"]) for b in boxes], np.int64),
        scores=np.array([b["score"] for b in boxes]),
    )
    ok, png = cv2.imencode(
        ".png", cv2.cvtColor(draw_boxes(img, found, names, min_score=0.0), cv2.COLOR_RGB2BGR)
    )
    return png.tobytes()


def draw_boxes(
    img: np.ndarray, found, classes: list[str], truth=None, min_score: float = MIN_SCORE
) -> np.ndarray:
    """RGB ``img`` with ``truth``'s boxes in green and ``found``'s (scoring ``MIN_SCORE``
    or more) in red, labelled ``class score``."""
    out = np.ascontiguousarray(img.copy())
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)
    scale = max(1, round(max(out.shape[:2]) / 320))
    if truth is not None:
        for box in truth.boxes:
            x0, y0, x1, y1 = (round(float(v)) for v in box)
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (0, 200, 0), scale)
    for box, label, s in zip(found.boxes, found.labels, found.scores):
        if s < min_score:
            continue
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (230, 20, 20), scale)
        cv2.putText(
            out,
            f"{classes[int(label)]} {s:.2f}",
            (x0, max(8, y0 - 2)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.3 * scale,
            (230, 20, 20),
            1,
            cv2.LINE_AA,
        )
    return out

"""An exported model on images: what ``preprocess.json`` says an input is, applied with the same
kernels that made the training images, then onnxruntime. Free of torch and dagster."""

from __future__ import annotations

import dataclasses
import io
import os

import cv2
import numpy as np

from workloads.kernels import EdgeParams, ResizeParams, edges_png, resize_bytes

STEPS = {
    "original": ["decode as displayed (EXIF orientation applied, alpha on white)"],
    "resized": [
        "decode as displayed (EXIF orientation applied, alpha on white)",
        "resize the short side to resize.size and centre-crop a square, stored as JPEG "
        "of resize.jpeg_quality (workloads.kernels.resize_bytes)",
    ],
}
STEPS["edges"] = [*STEPS["resized"], "Canny edges of that JPEG, edges.low/edges.high"]
TAIL = ["grayscale", "resize to input_size x input_size (area)", "divide by 255: float32 in [0, 1]"]


def preprocess_spec(model_record: dict, resize: ResizeParams, edges: EdgeParams) -> dict:
    """``preprocess.json`` of a model's exports: the input, the steps from an image file to it,
    the classes of the output."""
    spec, size = model_record["spec"], model_record["spec"]["input_size"]
    return {
        "model": model_record["key"],
        "model_sha256": model_record["model_sha256"],
        "input": {"name": "image", "shape": ["batch", 1, size, size], "dtype": "float32"},
        "input_size": size,
        "variant": spec["variant"],
        "resize": dataclasses.asdict(resize),
        "edges": dataclasses.asdict(edges),
        "steps": [*STEPS[spec["variant"]], *TAIL],
        "output": {"name": "logits", "classes": model_record["classes"], "class": "argmax"},
    }


def model_input(data: bytes, pre: dict) -> np.ndarray:
    """One image file's bytes as the model's (1, S, S) input, by ``pre``'s steps."""
    from workloads.ingest import inspect_image  # the format and the displayed size, as ingest

    fmt, width, height = inspect_image(io.BytesIO(data), max_pixels=1 << 28)
    if pre["variant"] != "original":
        data = resize_bytes(data, fmt, width, height, ResizeParams(**pre["resize"]))
        if pre["variant"] == "edges":
            data = edges_png(data, EdgeParams(**pre["edges"]))
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    size = pre["input_size"]
    if gray.shape != (size, size):
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    return (gray.astype(np.float32) / 255.0)[None]


def predict(model_path: str | os.PathLike, pre: dict, images: dict[str, bytes]) -> list[dict]:
    """``{"image", "class", "probability", "logits"}`` of each of ``{name: bytes}``: the model's
    top class and its softmax. An image that cannot be read is a ValueError naming it."""
    import onnxruntime as ort

    inputs = []
    for name, data in images.items():
        try:
            inputs.append(model_input(data, pre))
        except ValueError as e:  # BadMember too: the reason ingest would record
            raise ValueError(f"{name}: {e}") from None
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.stack(inputs)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    classes = pre["output"]["classes"]
    return [
        {
            "image": name,
            "class": classes[int(row.argmax())],
            "probability": round(float(row.max()), 4),
            "logits": [round(float(v), 4) for v in lg],
        }
        for name, row, lg in zip(images, probs, logits)
    ]

"""An exported model on images: what ``preprocess.json`` says an input is, applied with the same
kernels that made the training images, then onnxruntime. Free of torch and dagster."""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

from workloads.kernels import EdgeParams, ResizeParams, edges_png, resize_bytes
from workloads.training.preprocess import Preprocess, decode, model_preprocess

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
        "output": {"name": "logits", "classes": model_record["classes"], "class": "argmax"},
    }


def input_preprocess(pre: dict) -> Preprocess:
    """The normalisation ``preprocess.json`` states (gray in [0, 1] for exports made before it
    stated one)."""
    inp = pre["input"]
    channels = inp.get("channels", 1)
    return Preprocess(
        pre["input_size"],
        channels,
        tuple(inp.get("mean", (0.0,) * channels)),
        tuple(inp.get("std", (1.0,) * channels)),
    )


def model_input(data: bytes, pre: dict) -> np.ndarray:
    """One image file's bytes as the model's (C, S, S) input, by ``pre``'s steps."""
    from workloads.ingest import inspect_image  # the format and the displayed size, as ingest

    fmt, width, height = inspect_image(io.BytesIO(data), max_pixels=1 << 28)
    if pre["variant"] != "original":
        data = resize_bytes(data, fmt, width, height, ResizeParams(**pre["resize"]))
        if pre["variant"] == "edges":
            data = edges_png(data, EdgeParams(**pre["edges"]))
    norm = input_preprocess(pre)
    return norm(decode(data, norm.channels))


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

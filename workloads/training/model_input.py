"""An image file's bytes as an exported model's input, by its ``preprocess.json``: the same
kernels that made the training images, then the export's normalisation. Free of torch, dagster
and onnxruntime: what ``predict`` (the CLI's) and ``workloads.predictions`` (a Batch worker's)
both apply."""

from __future__ import annotations

import io

import numpy as np

from workloads.kernels import EdgeParams, ResizeParams, edges_png, resize_bytes
from workloads.training.preprocess import Preprocess, decode


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


def model_input(data: bytes, pre: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file's bytes as the model's (C, S, S) input, by ``pre``'s steps; and the
    image's displayed (width, height)."""
    from workloads.ingest import inspect_image  # the format and the displayed size, as ingest

    fmt, width, height = inspect_image(io.BytesIO(data), max_pixels=1 << 28)
    if pre["variant"] != "original":
        data = resize_bytes(data, fmt, width, height, ResizeParams(**pre["resize"]))
        if pre["variant"] == "edges":
            data = edges_png(data, EdgeParams(**pre["edges"]))
    norm = input_preprocess(pre)
    return norm(decode(data, norm.channels)), (width, height)

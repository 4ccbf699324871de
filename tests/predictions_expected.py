"""What the ``predictions`` table must hold, worked out apart from it: onnxruntime run directly on
an image's bytes (one image a call, a session of its own), the softmax's top class. Used by
tests/cvgraph/test_pack_predictions.py and tests/aws/test_predictions_aws.py."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np


def zip_members(data: bytes) -> dict[str, bytes]:
    """``{member: bytes}`` of a pack's zip (its files only)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def ort_rows(members: dict[str, bytes], onnx: bytes, preprocess: bytes | dict) -> dict[str, dict]:
    """``{sha256: {"class", "probability"}}`` of each distinct image of ``members``, scored by
    the ONNX model ``onnx`` as ``preprocess`` (its preprocess.json) says."""
    import onnxruntime as ort

    from workloads.training.model_input import model_input

    pre = preprocess if isinstance(preprocess, dict) else json.loads(preprocess)
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = {}
    for data in members.values():
        logits = session.run(None, {name: model_input(data, pre)[0][None]})[0][0]
        z = np.exp(logits.astype(np.float64) - logits.max())
        p = z / z.sum()
        out[hashlib.sha256(data).hexdigest()] = {
            "class": pre["output"]["classes"][int(p.argmax())],
            "probability": float(p.max()),
        }
    return out

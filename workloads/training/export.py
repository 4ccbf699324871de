"""Export a trained model to TorchScript, ONNX, ONNX int8 and ONNX float16, each checked for parity.

A classifier's parity = max |logit difference| against the trained PyTorch model on real
samples, and top-1 agreement (the int8 and float16 models are judged by agreement as well:
their logits move by design). A detector is exported with its decoding (``Detector``: input
``image``, output ``detections`` (batch, 100, 6) ``[x0, y0, x1, y1, score, class]`` in input
pixels, by score); its parity compares each of PyTorch's detections scoring
``PARITY_MIN_SCORE`` or more with the export's best match of its class: the lowest IoU
(``min_iou``), the largest score difference (``max_abs_error``), and the share matched at IoU
0.5 or more (``box_agreement``). The float16 model keeps float32 input and output, so
``preprocess.json`` applies to every ONNX file alike.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from workloads.layout import EXPORT_FILES
from workloads.training.checkpoint import load_checkpoint
from workloads.training.coco_eval import box_iou

FORMATS = ("torchscript", "onnx", "onnx_int8", "onnx_fp16")
PARITY_MIN_SCORE = 0.3  # a detector's detections compared (those it would report)
HEADS = ("heat", "size", "offset")  # a detector's heads (``detection.CenterNet``), by module name


def _onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def export_all(model_pt: Path, out_dir: Path, samples: np.ndarray) -> dict[str, dict]:
    """Write every format under ``out_dir``; returns ``{format: {file, bytes, max_abs_error, top1_agreement}}``."""
    model, record = load_checkpoint(model_pt)
    detector = record["arch"].get("task") == "detection"
    if detector:
        from workloads.training.detection import Detector

        model = Detector(model).eval()
    x = torch.from_numpy(samples.astype(np.float32))
    with torch.no_grad():
        reference = model(x).numpy()
    paths = {f: out_dir / EXPORT_FILES[f] for f in FORMATS}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)

    _export_torchscript(model, x, paths["torchscript"])
    _export_onnx(model, x, paths["onnx"], "detections" if detector else "logits")
    _quantize_int8(
        paths["onnx"],
        paths["onnx_int8"],
        out_dir / "onnx_int8" / "prepared.onnx",
        samples,
        detector=detector,
    )
    _float16(paths["onnx"], paths["onnx_fp16"])

    with torch.no_grad():
        outputs = {"torchscript": torch.jit.load(str(paths["torchscript"])).eval()(x).numpy()}
    outputs["onnx"] = _onnx_logits(paths["onnx"], samples.astype(np.float32))
    outputs["onnx_int8"] = _onnx_logits(paths["onnx_int8"], samples.astype(np.float32))
    outputs["onnx_fp16"] = _onnx_logits(paths["onnx_fp16"], samples.astype(np.float32))
    parity = _detection_parity if detector else _parity
    return {fmt: parity(fmt, paths[fmt], out, reference) for fmt, out in outputs.items()}


def _export_torchscript(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    scripted = torch.jit.trace(model, x[:1])
    scripted.save(str(path))


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, output: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x[:1],),
            str(path),
            input_names=["image"],
            output_names=[output],
            dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}},
            dynamo=False,
        )


def _float16(onnx_path: Path, fp16_path: Path) -> None:
    """The ONNX model with float16 weights and arithmetic (onnxruntime's converter), float32 at
    its input and output."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(model, str(fp16_path))


def _quantize_int8(
    onnx_path: Path, int8_path: Path, prepared: Path, samples: np.ndarray, detector: bool = False
) -> None:
    """Static int8 quantization of the ONNX model, calibrated on ``samples``. A detector's
    convolutions only, but for each head's last (its heat logits, log sizes and offsets stay
    float): quantized, the peak filter's max-pool and equality see ties everywhere, and the
    heads' outputs lose the precision a box's corners need."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        """Static int8 calibration on the same held-out samples (activation ranges only)."""

        def __init__(self) -> None:
            self.batches = iter(
                [
                    {"image": samples[i : i + 32].astype(np.float32)}
                    for i in range(0, len(samples), 32)
                ]
            )

        def get_next(self):
            return next(self.batches, None)

    # onnxruntime's recommended pre-processing: shape inference + graph optimisation.
    quant_pre_process(str(onnx_path), str(prepared))
    only = {}
    if detector:
        import onnx

        heads = [
            n.name
            for n in onnx.load(str(prepared)).graph.node
            if n.op_type == "Conv" and any(f"/{h}/{h}.2/" in n.name for h in HEADS)
        ]
        only = {"op_types_to_quantize": ["Conv"], "nodes_to_exclude": heads}
    # 7-bit weights (reduce_range): onnxruntime's advice for x86 CPUs without VNNI (AVX2 only),
    # whose u8s8 products saturate in 16 bits; it costs VNNI CPUs nothing, and the same model
    # quantizes to the same bytes wherever it is exported. Without it, on an AVX2-only EPYC, the
    # demo's int8 digits model agreed with PyTorch on under 95% of held-out images.
    quantize_static(
        str(prepared),
        str(int8_path),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        **only,
    )
    prepared.unlink()


def _parity(fmt: str, path: Path, logits: np.ndarray, reference: np.ndarray) -> dict:
    return {
        "file": EXPORT_FILES[fmt],
        "bytes": path.stat().st_size,
        "max_abs_error": float(np.max(np.abs(logits - reference))) if len(reference) else 0.0,
        "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1)))
        if len(reference)
        else 1.0,
        "samples": len(reference),
    }


def _detection_parity(fmt: str, path: Path, dets: np.ndarray, reference: np.ndarray) -> dict:
    """How the export's detections (B, K, 6) agree with PyTorch's ``reference``: for each of
    PyTorch's scoring ``PARITY_MIN_SCORE`` or more, the export's best IoU in its class and the
    score difference there."""
    ious, diffs = [], []
    for ref, got in zip(reference, dets):
        for row in ref[ref[:, 4] >= PARITY_MIN_SCORE]:
            same = got[got[:, 5] == row[5]]
            if not len(same):
                ious.append(0.0)
                continue
            overlap = box_iou(row[:4], same[:, :4])
            j = int(overlap.argmax())
            ious.append(float(overlap[j]))
            diffs.append(abs(float(same[j, 4] - row[4])))
    return {
        "file": EXPORT_FILES[fmt],
        "bytes": path.stat().st_size,
        "detections": len(ious),
        "min_iou": min(ious, default=1.0),
        "max_abs_error": max(diffs, default=0.0),
        "box_agreement": float(np.mean(np.array(ious) >= 0.5)) if ious else 1.0,
        "samples": len(reference),
    }

"""exported_models: TorchScript, ONNX and ONNX int8 of a trained model, parity-checked."""

import json
from pathlib import Path
from typing import Any  # the mlflow resource: dagster-mlflow's MlFlow, imported when it starts

import dagster as dg
import pyarrow.compute as pc

from assets.models import model_version, trained_models
from partitions import model_partitions_def
from resources.settings import ImageSettings
from resources.storage import LakeResource
from resources.tracking import discard_run, end_mlflow_on_run_finished, log_exports
from workloads.lake import read_parquet
from workloads.layout import EXPORT_FILES, VARIANT_COLUMNS, export_keys, model_keys, subset_keys
from workloads.staging import staging
from workloads.versions import sha256_hex

PARITY_SAMPLES = 256
MAX_FLOAT_ERROR = 1e-3  # TorchScript / ONNX float32 vs PyTorch logits
MIN_INT8_AGREEMENT = 0.95  # top-1 agreement of the int8 model
MIN_FP16_AGREEMENT = 0.99  # top-1 agreement of the float16 model
# A detector's (workloads.training.export: each of PyTorch's detections scoring 0.3 or more)
MIN_FLOAT_IOU = 0.99  # TorchScript / ONNX float32: the lowest IoU with their match
MIN_BOX_AGREEMENT = {"onnx_int8": 0.9, "onnx_fp16": 0.98}  # matched at IoU 0.5 or more


def parity_passed(formats: dict, detector: bool) -> bool:
    """Whether every format is close enough to the trained model (the ``parity`` check)."""
    floats = ("torchscript", "onnx")
    if set(formats) == {"onnx"}:  # an entry point's model: its own ONNX file
        return formats["onnx"]["max_abs_error"] <= MAX_FLOAT_ERROR
    if detector:
        return all(
            formats[f]["min_iou"] >= MIN_FLOAT_IOU
            and formats[f]["max_abs_error"] <= MAX_FLOAT_ERROR
            for f in floats
        ) and all(formats[f]["box_agreement"] >= m for f, m in MIN_BOX_AGREEMENT.items())
    return all(formats[f]["max_abs_error"] <= MAX_FLOAT_ERROR for f in floats) and (
        formats["onnx_int8"]["top1_agreement"] >= MIN_INT8_AGREEMENT
        and formats["onnx_fp16"]["top1_agreement"] >= MIN_FP16_AGREEMENT
    )


def _samples(store, model_record: dict, model_pt: Path | None = None):
    """Up to PARITY_SAMPLES held-out images of the model's subset, as the model sees them (the
    ``preprocess`` of ``model_pt``, else of the model's record)."""
    import numpy as np

    from workloads.training.models import load_record
    from workloads.training.preprocess import decode, model_preprocess

    manifest = read_parquet(store, subset_keys(model_record["subset"])["manifest"])
    for split in ("test", "val", "train"):  # held-out images first; a tiny subset may have none
        test = (
            manifest.filter(pc.equal(manifest["split"], split)).slice(0, PARITY_SAMPLES).to_pylist()
        )
        if test:
            break
    else:
        raise dg.Failure(
            description=f"model {model_record['key']}: its subset {model_record['subset']} has no images to check parity on"
        )
    pre = model_preprocess(load_record(model_pt) if model_pt else model_record)
    col = VARIANT_COLUMNS[model_record["spec"]["variant"]]
    return np.stack([pre(decode(store.get(r[col]), pre.channels, r[col])) for r in test])


def _export_onnx(store, model_record: dict, out: Path) -> dict:
    """An entry point's model exported: its ``model.onnx`` is the ``onnx`` export. Its parity is
    measured all the same: the file read back, run by onnxruntime on held-out images against
    the trained file."""
    import numpy as np
    import onnxruntime as ort

    data = store.get(model_record["weights"])
    path = out / EXPORT_FILES["onnx"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    x = _samples(store, model_record)
    runs = []
    for model in (data, path.read_bytes()):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        runs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    return {
        "onnx": {
            "bytes": len(data),
            "max_abs_error": float(np.abs(runs[0] - runs[1]).max()),
            "top1_agreement": float((runs[0].argmax(1) == runs[1].argmax(1)).mean()),
            "samples": len(x),
        }
    }


def preprocess_of(store, model_record: dict, image_settings: ImageSettings) -> dict:
    """``preprocess.json``: how an image becomes the model's input. The variant's parameters are
    the lake's settings, which must be those the model's subset was frozen with (the record
    keeps only their ids)."""
    from workloads.training.predict import preprocess_spec

    params = image_settings.params()
    frozen = json.loads(store.get(subset_keys(model_record["subset"])["record"]))["params"]
    if frozen != {"resize": params.resize_id, "edges": params.edges_id}:
        raise dg.Failure(
            description=f"model {model_record['key']}: the image settings changed since subset "
            f"{model_record['subset']} was frozen (params {frozen}); set them back to export it"
        )
    return preprocess_spec(model_record, params.resize, params.edges)


@dg.asset(
    partitions_def=model_partitions_def,
    deps=[trained_models],
    code_version="1",
    group_name="models",
    kinds={"onnx", "pytorch", "mlflow"},
    description="TorchScript, ONNX, ONNX int8 and ONNX float16 exports, each checked against the trained model on held-out images; logged with the model's registered version.",
    hooks={end_mlflow_on_run_finished},
    check_specs=[
        dg.AssetCheckSpec(
            "parity",
            asset="exported_models",
            description=f"float32 exports within {MAX_FLOAT_ERROR} of PyTorch logits; top-1 agreement of int8 ≥ {MIN_INT8_AGREEMENT}, of float16 ≥ {MIN_FP16_AGREEMENT}. A detector's: float32 boxes at IoU ≥ {MIN_FLOAT_IOU} with PyTorch's, scores within {MAX_FLOAT_ERROR}; int8 and float16 matching ≥ {MIN_BOX_AGREEMENT['onnx_int8']} and ≥ {MIN_BOX_AGREEMENT['onnx_fp16']} of its boxes at IoU 0.5",
        )
    ],
)
def exported_models(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    image_settings: ImageSettings,
    mlflow: dg.ResourceParam[Any],
):
    # torch and ONNX load when a step exports, not with the code location
    from workloads.training.export import export_all

    key = context.partition_key
    store = lake.lake()
    keys = export_keys(key)
    mkeys = model_keys(key)
    if not store.exists(mkeys["record"]):
        raise dg.Failure(description=f"model {key} has not been trained")
    model_record = json.loads(store.get(mkeys["record"]))
    prior = json.loads(store.get(keys["record"])) if store.exists(keys["record"]) else None
    byo = model_record.get("format") == "onnx"  # an entry point's (workloads.training.byo)
    made = ["onnx"] if byo else list(EXPORT_FILES)
    if (
        prior
        and prior["model_sha256"] == model_record["model_sha256"]
        and all(store.exists(keys[f]) for f in [*made, "preprocess"])
    ):
        record = prior
        context.log.info(f"exports of {key} are current for model {record['model_sha256'][:12]}")
        discard_run(mlflow)
    else:
        preprocess = preprocess_of(store, model_record, image_settings)  # before the work
        with staging(store, "export", on_sweep=lambda s: context.log.info(str(s))) as scratch:
            tmp = Path(scratch)
            if byo:
                report = _export_onnx(store, model_record, tmp / "out")
            else:
                (tmp / "model.pt").write_bytes(store.get(mkeys["model"]))
                samples = _samples(store, model_record, tmp / "model.pt")
                report = export_all(tmp / "model.pt", tmp / "out", samples)
            for fmt in made:
                store.put_file(keys[fmt], tmp / "out" / EXPORT_FILES[fmt])
                report[fmt]["key"] = keys[fmt]
                report[fmt]["sha256"] = sha256_hex((tmp / "out" / EXPORT_FILES[fmt]).read_bytes())
            version = model_version(mlflow, store, model_record)
            files = {fmt: str(tmp / "out" / EXPORT_FILES[fmt]) for fmt in made}
            run_id = log_exports(mlflow, key, version, files)
        store.put(keys["preprocess"], json.dumps(preprocess, indent=2, sort_keys=True).encode())
        record = {
            "key": key,
            "model_sha256": model_record["model_sha256"],
            "model_version": version,
            "mlflow_run_id": run_id,
            "formats": report,
            "preprocess": keys["preprocess"],
        }
        store.put(keys["record"], json.dumps(record, indent=2, sort_keys=True).encode())
    formats = record["formats"]
    detector = "box_agreement" in formats["onnx"]
    agreement = ("min_iou", "box_agreement") if detector else ("top1_agreement",)
    # The model exported and the ONNX files' bytes. Not the TorchScript file's: torch writes a
    # random serialization id into every save and numbers traced classes per process, so its
    # bytes differ between two exports of the same weights (its parity is checked instead).
    data_version = record["model_sha256"][:8] + "".join(
        formats[f]["sha256"][:8] for f in sorted(formats) if f != "torchscript"
    )
    yield dg.MaterializeResult(
        metadata={
            **{f"{f}_max_abs_error": formats[f]["max_abs_error"] for f in formats},
            **{f"{f}_{a}": formats[f][a] for f in formats for a in agreement},
            **{f"{f}_bytes": formats[f]["bytes"] for f in formats},
            "files": dg.MetadataValue.json({f: formats[f]["key"] for f in formats}),
            "model_sha256": record["model_sha256"],
            "model_version": record.get("model_version", ""),
        },
        data_version=dg.DataVersion(data_version),
    )
    yield dg.AssetCheckResult(
        check_name="parity",
        passed=parity_passed(formats, detector),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            f: {
                "max_abs_error": formats[f]["max_abs_error"],
                **{a: formats[f][a] for a in agreement},
            }
            for f in formats
        }
        | {"samples": formats["onnx"]["samples"]},
    )

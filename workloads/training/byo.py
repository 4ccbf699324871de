"""Bring your own trainer: the contract between cvgraph and a training script of yours.

A model whose spec names an ``entry_point`` (a Python file; its folder goes with it) is trained by
that script instead of ``workloads.training.train``, exactly where the built-in entry runs: a
local process, or a SageMaker job in script mode (the folder uploaded as
``sagemaker_submit_directory``, the file as ``sagemaker_program``, in ``training_image`` or
cvgraph's training image). It gets what the built-in entry gets:

- ``SM_CHANNEL_SHARDS``: the frozen subset's training shards (WebDataset-format tars per split,
  ``index.json`` listing them; each sample an image and a json with ``label``, ``split``,
  ``sha256``), streamed on SageMaker (FastFile);
- ``SM_CHANNEL_MANIFEST``: the folder holding the subset's ``manifest.parquet`` (every row of the
  frozen query, with the lake keys of each variant);
- ``SM_INPUT_CONFIG_DIR/hyperparameters.json``: the spec (``epochs``, ``lr``, ``input_size``,
  ``variant``, ``seed``, ...; values as strings, as SageMaker writes them) and Dagster Pipes'
  bootstrap parameters ``dagster_pipes_context`` / ``dagster_pipes_messages`` (dagster-pipes'
  ``PipesMappingParamsLoader``; on SageMaker the S3 context loader and message writer) for log
  lines and metadata in the Dagster run;
- ``SM_MODEL_DIR``: where it writes, before it exits 0,
  - ``model.onnx``: one float32 input ``(N, C, S, S)``, one output ``(N, classes)`` of logits or
    probabilities (argmax is the class);
  - ``metrics.json``: ``classes`` (the output's order), ``preprocess`` (``{"size", "channels",
    "mean", "std"}``: an image is resized to size x size (area), RGB or gray, scaled to [0, 1],
    then normalised per channel — ``workloads.training.preprocess.Preprocess``), ``counts``
    (``{"train", "val", "test"}`` images), ``test_accuracy`` on the shards' test split, and
    optionally ``history`` (``[{"epoch", "train_loss", "val_loss", "val_accuracy"}]``, drawn as
    the model's curves) and ``best_epoch``.

``check_outputs`` holds a training to that contract before anything is registered. The model is
then registered, evaluated (onnxruntime, the same rows and pictures as a built-in model), exported
(``onnx``: the file itself) and in lineage like a built-in one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

MODEL_FILE = "model.onnx"
REQUIRED = ("classes", "preprocess", "counts", "test_accuracy")


def source_archive(entry_point: str) -> tuple[bytes, str]:
    """The entry point's folder as a reproducible ``.tar.gz`` (sorted, no times or owners, no
    ``__pycache__``) and its sha256: the same sources make the same bytes, so a training is
    redone only when they change."""
    root = Path(entry_point).parent
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(root.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def check_outputs(onnx_bytes: bytes, metrics: dict) -> None:
    """ValueError naming the first way a script's outputs break the contract (module doc)."""
    from workloads.training.preprocess import Preprocess

    missing = [k for k in REQUIRED if k not in metrics]
    if missing:
        raise ValueError(f"metrics.json has no {', '.join(missing)}")
    classes = metrics["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or len(set(map(str, classes))) != len(classes)
    ):
        raise ValueError("metrics.json classes: a list of two or more distinct labels")
    try:
        pre = Preprocess.from_json(json.dumps(metrics["preprocess"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"metrics.json preprocess: {e}") from None
    if not 0 <= float(metrics["test_accuracy"]) <= 1:
        raise ValueError("metrics.json test_accuracy: a fraction in [0, 1]")
    if not all(isinstance(metrics["counts"].get(s), int) for s in ("train", "val", "test")):
        raise ValueError("metrics.json counts: {train, val, test} image counts")
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own errors for what is no model
        raise ValueError(f"{MODEL_FILE} does not load in onnxruntime: {e}") from None
    if len(session.get_inputs()) != 1:
        raise ValueError(f"{MODEL_FILE} takes {len(session.get_inputs())} inputs, not one")
    x = np.zeros((2, pre.channels, pre.size, pre.size), np.float32)
    try:
        out = session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as e:
        raise ValueError(
            f"{MODEL_FILE} does not run on a (2, {pre.channels}, {pre.size}, {pre.size}) batch: {e}"
        ) from None
    if out.shape != (2, len(classes)):
        raise ValueError(
            f"{MODEL_FILE} gives {tuple(out.shape)} for 2 images, not (2, {len(classes)}): one "
            "score per class"
        )

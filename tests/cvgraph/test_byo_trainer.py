"""Bring your own trainer (``workloads/training/byo.py``): `cvgraph train --entry-point SCRIPT`
runs a user's script in the built-in entry's place with the same channels, manifest,
hyperparameters and Pipes; its model.onnx is registered, evaluated, exported and predicted with
like a built-in model, and in lineage. The script here (``byo_trainer/centroids.py``) is a nearest
class centroid in numpy written as ONNX: nothing of cvgraph in it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.lake_state import SQL, cvgraph

SCRIPT = Path(__file__).parent / "byo_trainer" / "centroids.py"


@pytest.fixture(scope="module")
def home(tmp_path_factory, user_env):
    from cvgraph.demo_packs import digit_members, zip_bytes

    root = tmp_path_factory.mktemp("byo")
    (root / "digits.zip").write_bytes(
        zip_bytes(digit_members(size=32, limit=180, classes=(0, 1, 2)))
    )
    env = user_env(root / "home")
    cvgraph(env, "upload", str(root / "digits.zip"))
    cvgraph(env, "sync")
    cvgraph(env, "freeze", "s", SQL)
    return root, env


def _onnx_accuracy(lake: Path, onnx_bytes: bytes, rows: list[dict]) -> tuple[float, list[str]]:
    """The model run by onnxruntime here, on the rows' resized images through cvgraph's own
    preprocessing (what evaluate and predict promise to do)."""
    import onnxruntime as ort

    from workloads.training.preprocess import Preprocess, decode

    pre = Preprocess(16, 1, (0.0,), (1.0,))
    x = np.stack([pre(decode((lake / r["resized_key"]).read_bytes(), 1)) for r in rows])
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": x})[0]
    classes = ["0", "1", "2"]
    predicted = [classes[i] for i in out.argmax(1)]
    return float(
        np.mean([p == r["label"] for p, r in zip(predicted, rows, strict=True)])
    ), predicted


def test_a_users_entry_point_is_trained_registered_evaluated_exported_and_predicted_with(
    home, tmp_path
):
    import mlflow
    import pyarrow.parquet as pq

    root, env = home
    script = tmp_path / "mine" / "centroids.py"
    script.parent.mkdir()
    shutil.copy(SCRIPT, script)
    train = ["train", "m", "--subset", "s", "--entry-point", str(script), "--input-size", "16"]
    rec = json.loads(cvgraph(env, *train, "--json").stdout)
    lake = root / "home" / "lake"
    weights = (lake / "models/m/model.onnx").read_bytes()
    assert rec["format"] == "onnx" and rec["weights"] == "models/m/model.onnx"
    assert rec["model_sha256"] == hashlib.sha256(weights).hexdigest()
    assert rec["mlflow_model_version"] == "1" and rec["classes"] == ["0", "1", "2"]
    assert not (lake / "models/m/model.pt").exists()
    # it read the manifest channel: every row of the frozen subset
    metrics = json.loads((lake / "models/m/metrics.json").read_text())
    manifest = pq.read_table(lake / "subsets/s/manifest.parquet").to_pylist()
    assert metrics["manifest_rows"] == len(manifest) == 180
    test_rows = [r for r in manifest if r["split"] == "test"]
    accuracy, predicted = _onnx_accuracy(lake, weights, test_rows)
    assert accuracy >= 0.6  # three digits apart by their centroids (chance: 1/3)
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=0.12)  # its own decode
    # evaluate scores it with onnxruntime on the same rows: the accuracy computed here
    ev = json.loads(cvgraph(env, "evaluate", "m", "s", "--json").stdout)
    assert ev["scores"]["scored"] == len(test_rows)
    assert ev["scores"]["accuracy"] == pytest.approx(accuracy)
    assert ev["champion"]["after"] == "1"
    # the export is the file itself, checked by running both
    ex = json.loads(cvgraph(env, "export", "m", "--json").stdout)
    assert set(ex["formats"]) == {"onnx"}
    assert ex["formats"]["onnx"]["sha256"] == rec["model_sha256"]
    assert ex["formats"]["onnx"]["max_abs_error"] == 0.0
    assert ex["formats"]["onnx"]["top1_agreement"] == 1.0
    # predict runs the export on image files as preprocess.json says
    images = tmp_path / "images"
    images.mkdir()
    for r in test_rows[:6]:
        (images / f"{r['sha256'][:8]}.jpg").write_bytes((lake / r["resized_key"]).read_bytes())
    got = json.loads(cvgraph(env, "predict", "m", str(images), "--json").stdout)
    want = {f"{r['sha256'][:8]}.jpg": p for r, p in zip(test_rows[:6], predicted, strict=False)}
    assert {Path(g["image"]).name: g["class"] for g in got} == want
    # registered with its ONNX file; in lineage
    client = mlflow.MlflowClient(f"sqlite:///{root}/home/mlflow/mlflow.db")
    version = client.get_model_version("m", "1")
    assert "model.onnx" in {a.path for a in client.list_artifacts(version.run_id)}
    assert "└─ model m v1" in cvgraph(env, "lineage", "m").stdout

    # the same sources again: nothing to do; changed sources: a new training, the next version
    assert json.loads(cvgraph(env, *train, "--json").stdout)["mlflow_model_version"] == "1"
    script.write_text(script.read_text() + "\n# tuned\n")
    again = json.loads(cvgraph(env, *train, "--json").stdout)
    assert again["mlflow_model_version"] == "2"
    assert again["source_sha256"] != rec["source_sha256"]
    assert again["model_sha256"] == rec["model_sha256"]  # a comment changes no weight


def test_an_entry_point_that_breaks_the_contract_is_named_in_one_line(home, tmp_path):
    root, env = home
    script = tmp_path / "broken" / "centroids.py"
    script.parent.mkdir()
    script.write_text(SCRIPT.read_text().replace('"classes": classes,', '"labels": classes,', 1))
    out = cvgraph(
        env, "train", "b", "--subset", "s", "--entry-point", str(script), "--input-size", "16",
        check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "centroids.py: metrics.json has no classes" in out.stderr
    assert not (root / "home/lake/models/b/model.json").exists()
    quiet = cvgraph(env, "train", "b", "--subset", "s", "--training-image", "x", check=False)
    assert quiet.returncode == 1
    assert "training_image is the image of an entry_point" in quiet.stderr

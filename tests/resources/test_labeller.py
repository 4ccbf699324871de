"""The labeller resource: which export scores packs, and the one line that says why none can."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from resources.labeller import NO_LABELLER, Labeller, LabellerRefused
from workloads.training.predict import output_spec

CLASSES = ["0", "1", "2"]


def exported(lake, key: str = "m", task: str = "classification", version: str = "1") -> None:
    """The records an export of ``key`` leaves (``assets.exports``): model.json, exports.json
    and preprocess.json, whose output is the model's (``output_spec``)."""
    record = {"key": key, "classes": CLASSES, "spec": {"task": task}}
    lake.put(f"models/{key}/model.json", json.dumps(record).encode())
    lake.put(
        f"exports/{key}/exports.json",
        json.dumps({"model_version": version, "formats": {"onnx": {"sha256": "ab" * 32}}}).encode(),
    )
    lake.put(
        f"exports/{key}/preprocess.json",
        json.dumps({"output": output_spec(record)}).encode(),
    )


def refusal(lake, model: str | None) -> str:
    labeller = Labeller(model=model, tracking_uri=f"sqlite:///{lake.root}/no-registry.db")
    with pytest.raises(LabellerRefused) as e:
        labeller.export(lake)
    return str(e.value)


def test_each_labeller_that_cannot_score_is_one_line(lake):
    assert refusal(lake, None) == NO_LABELLER
    assert refusal(lake, "m") == (
        "labeller 'm' (CVGRAPH_LABELLER) is no trained model (exported models: none yet)"
    )
    lake.put("models/m/model.json", b"{}")
    assert refusal(lake, "m") == "labeller 'm' has no export: `cvgraph export m` first"
    exported(lake, "d", task="detection")
    assert refusal(lake, "d") == (
        "labeller 'd' is a detector: pack predictions are a classifier's classes (set "
        "CVGRAPH_LABELLER to an exported classifier)"
    )
    assert refusal(lake, "zzz") == (
        "labeller 'zzz' (CVGRAPH_LABELLER) is no trained model (exported models: d)"
    )


def test_with_no_registry_the_latest_export_scores_and_says_so(lake):
    """No MLflow store at all (nothing was registered): no champion, the latest export."""
    exported(lake, "m", version="3")
    export = Labeller(model="m", tracking_uri=f"sqlite:///{lake.root}/none.db").export(lake)
    assert (export.model, export.version, export.champion) == ("m", 3, False)
    assert export.note == "m v3 (no champion yet: its latest export)"
    assert export.onnx_key == "exports/m/onnx/model.onnx" and export.onnx_sha256 == "ab" * 32
    job = export.scoring("u")
    assert (job.pack, job.model, job.version, job.preprocess_key) == (
        "u",
        "m",
        3,
        "exports/m/preprocess.json",
    )
    assert not (lake.root / "none.db").exists()  # the lookup made no store


def test_the_labeller_sensor_is_there_only_with_a_labeller(monkeypatch, tmp_path):
    from orchestration.definitions import build_defs
    from orchestration.settings import SettingError

    monkeypatch.setenv("CVGRAPH_HOME", str(tmp_path))
    monkeypatch.delenv("CVGRAPH_LABELLER", raising=False)
    assert "pack_predictions" not in {s.name for s in build_defs("local").sensors}
    monkeypatch.setenv("CVGRAPH_LABELLER", "m")
    defs = build_defs("local")
    assert "pack_predictions" in {s.name for s in defs.sensors}
    dg.Definitions.validate_loadable(defs)
    assert defs.resources["labeller"].model == "m"
    monkeypatch.setenv("CVGRAPH_LABELLER", "a b")
    with pytest.raises(SettingError, match="^CVGRAPH_LABELLER: model key 'a b' is not allowed"):
        build_defs("local")

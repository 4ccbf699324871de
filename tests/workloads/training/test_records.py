"""Model records are loaded weights-only: what training saves loads, a planted pickle is refused
before it can run anything (the exporter, the evaluator and a resumed training all load them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workloads.training.checkpoint import load_checkpoint
from workloads.training.data import Preprocess
from workloads.training.export import export_all
from workloads.training.loop import resume, save_checkpoint
from workloads.training.models import UnsafeRecord, build_model
from workloads.training.train import _save_model

ARCH = {"in_channels": 1, "num_classes": 3, "input_size": 32, "width": 4}


class Planted:
    """Unpickling this calls ``open(marker, "w")``: code run by whoever wrote the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker) -> None:
    """A ``.pt`` in torch's own format, as an attacker would write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "arch": ARCH, "payload": Planted(marker)}, path)


def test_a_trained_record_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build_model(ARCH)
    pre = Preprocess(size=32, channels=1, mean=(0.5,), std=(0.25,))
    _save_model(tmp_path, model, ARCH, ["a", "b", "c"], "edges", pre, {"test_accuracy": 0.5})
    loaded, record = load_checkpoint(tmp_path / "model.pt")
    assert record["classes"] == ["a", "b", "c"] and record["variant"] == "edges"
    assert Preprocess.from_json(record["preprocess"]) == pre
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_an_injected_pickle_as_model_pt_is_refused_by_the_load_and_the_exporter(tmp_path):
    model_pt = tmp_path / "models" / "faces_cnn" / "model.pt"
    marker = tmp_path / "ran"
    plant(model_pt, marker)

    with pytest.raises(UnsafeRecord, match=r"models/faces_cnn/model.pt: refused"):
        load_checkpoint(model_pt)
    with pytest.raises(UnsafeRecord, match="not a weights-only record"):
        export_all(model_pt, tmp_path / "out", np.zeros((2, 1, 32, 32), np.float32))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    # The plant is real: an unrestricted load runs its code.
    torch.load(model_pt, weights_only=False)
    assert marker.exists()


def test_an_injected_checkpoint_is_refused_when_training_resumes(tmp_path):
    model = build_model(ARCH)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ckpt = tmp_path / "checkpoint.pt"
    state = {"history": [{"epoch": 1, "train_loss": 1.0}], "epoch": 1, "best_epoch": 1}
    save_checkpoint(ckpt, model, opt, sched, state)
    said: list[str] = []
    assert resume(ckpt, build_model(ARCH), opt, sched, said.append) == state
    assert said == ["resumed from checkpoint at epoch 1"]

    marker = tmp_path / "ran"
    plant(ckpt, marker)
    with pytest.raises(UnsafeRecord, match="checkpoint.pt: refused"):
        resume(ckpt, build_model(ARCH), opt, sched, said.append)
    assert not marker.exists()

"""A saved model back as a network: a classifier (``models``) or a detector (``detection``), by
its record's ``arch``."""

from __future__ import annotations

from torch import nn

from workloads.training.detection import CenterNet
from workloads.training.models import build_model, load_record


def build(arch: dict) -> nn.Module:
    """The network a record's ``arch`` describes: a ``CenterNet`` when its ``task`` is
    detection, else ``models.build_model``'s classifier."""
    return CenterNet(arch) if arch.get("task") == "detection" else build_model(arch)


def load_checkpoint(path) -> tuple[nn.Module, dict]:
    """(model in eval mode, saved record) from a ``model.pt`` written by the training entry."""
    record = load_record(path)
    model = build(record["arch"])
    model.load_state_dict(record["state_dict"])
    model.eval()
    return model, record

"""A small CNN classifier (no torchvision here: the model code is ours)."""

from __future__ import annotations

import pickle

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32, width: int = 16
    ):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width * 2, width * 4, 3, padding=1),
            nn.BatchNorm2d(width * 4),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(width * 4 * 16, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(arch: dict) -> SmallCNN:
    return SmallCNN(
        arch["in_channels"], arch["num_classes"], arch["input_size"], arch.get("width", 16)
    )


class UnsafeRecord(ValueError):
    """A ``.pt`` file that holds more than tensors and plain types: refused, never run."""


def load_record(path) -> dict:
    """A record the training entry saved (tensors, dicts, lists, numbers, strings). Loaded with
    ``weights_only=True``: a pickle planted in the lake that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeRecord(f"{path}: refused, not a weights-only record ({first})") from None


def load_checkpoint(path) -> tuple[SmallCNN, dict]:
    """(model in eval mode, saved record) from a ``model.pt`` written by the training entry."""
    record = load_record(path)
    model = build_model(record["arch"])
    model.load_state_dict(record["state_dict"])
    model.eval()
    return model, record

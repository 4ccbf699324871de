"""The classifiers a training run can build, in plain torch (no torchvision here).

Three architectures, chosen by name in a record's ``arch`` dict (see :func:`build_model`):

- ``small_cnn``: the original three-conv CNN; its parameter names are unchanged, so every
  checkpoint written before this module existed still loads (``strict=True``).
- ``resnet18``: ResNet-18 (BasicBlock, layers [2, 2, 2, 2]) with a base width.
- ``mobilenet_v3_small``: MobileNetV3-Small (the paper's table 2) with a width multiplier.

Small inputs (``input_size <= 64`` px) get a CIFAR-style stem: ResNet-18 uses a 3x3 stride-1
conv and no max-pool, MobileNetV3-Small a stride-1 stem and a stride-1 first block. Both then
downsample 8x in all, so a 32 px image still has 4x4 cells before the global pool (the
ImageNet stems downsample 32x: 1x1 at 32 px). Larger inputs get the ImageNet stems.

Every model ends in an ``nn.Linear`` head (:func:`head_of`) that a fine-tune can swap for one of
another class count (:func:`replace_head`). All three trace with ``torch.jit.trace`` and export
to ONNX (TorchScript-based exporter, dynamic batch) with ops onnxruntime can quantize.
"""

from __future__ import annotations

import pickle

import torch
from torch import nn

ARCHS = ("small_cnn", "resnet18", "mobilenet_v3_small")

# Used when a record's arch has no "width". What width means differs per arch:
#   small_cnn           channels of the first conv (16, 32, 64 after it);
#   resnet18            base channels (the paper's 64; 32 here, ~4x cheaper on a CPU);
#   mobilenet_v3_small  width multiplier in percent (100 = the paper's 1.0, 75 = 0.75).
DEFAULT_WIDTH = {"small_cnn": 16, "resnet18": 32, "mobilenet_v3_small": 100}

# Inputs this size or smaller get the low-stride (CIFAR-style) stems.
SMALL_INPUT = 64


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


# --- ResNet-18 -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (a strided 1x1 conv + BN where the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 with ``width`` base channels (stages width, 2w, 4w, 8w).

    ``input_size <= 64``: 3x3 stride-1 stem, no max-pool (8x downsampling in all); larger: the
    7x7 stride-2 stem and 3x3 stride-2 max-pool (32x). Kaiming-initialised convs; the last BN of
    every block starts at gamma 0, so each block starts as the identity.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        width: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        if input_size <= SMALL_INPUT:
            stem: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False)]
        else:
            stem = [nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=False)]
        stem += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if input_size > SMALL_INPUT:
            stem.append(nn.MaxPool2d(3, 2, padding=1))
        self.stem = nn.Sequential(*stem)
        self.layer1 = self._stage(width, width, 1)
        self.layer2 = self._stage(width, width * 2, 2)
        self.layer3 = self._stage(width * 2, width * 4, 2)
        self.layer4 = self._stage(width * 4, width * 8, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(width * 8, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    @staticmethod
    def _stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.dropout(x))


# --- MobileNetV3-Small -----------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never more than 10% down (as the paper's code)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """Channel gates: global pool, 1x1 conv down, ReLU, 1x1 conv up, hard sigmoid."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


def _conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when it would not widen), depthwise kxk, optional SE, 1x1 project;
    a residual add when the shape is kept."""

    def __init__(
        self,
        in_channels: int,
        kernel: int,
        expanded: int,
        out_channels: int,
        use_se: bool,
        act: type[nn.Module],
        stride: int,
    ):
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(_conv_bn_act(in_channels, expanded, 1, act=act))
        layers.append(_conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if use_se:
            layers.append(SqueezeExcite(expanded, _make_divisible(expanded // 4)))
        layers.append(_conv_bn_act(expanded, out_channels, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


# The paper's table 2 (MobileNetV3-Small): kernel, expansion, out, SE, activation, stride.
_RE, _HS = nn.ReLU, nn.Hardswish
MOBILENET_V3_SMALL = (
    (3, 16, 16, True, _RE, 2),
    (3, 72, 24, False, _RE, 2),
    (3, 88, 24, False, _RE, 1),
    (5, 96, 40, True, _HS, 2),
    (5, 240, 40, True, _HS, 1),
    (5, 240, 40, True, _HS, 1),
    (5, 120, 48, True, _HS, 1),
    (5, 144, 48, True, _HS, 1),
    (5, 288, 96, True, _HS, 2),
    (5, 576, 96, True, _HS, 1),
    (5, 576, 96, True, _HS, 1),
)


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small; ``width`` is the width multiplier in percent (100 = the paper's 1.0).

    Channels (the 1024-wide pre-head layer too) scale by ``width / 100``, rounded to multiples of
    8. ``input_size <= 64``: the stem and the first block run at stride 1 (8x downsampling in
    all, 4x4 cells at 32 px); larger inputs the paper's strides (32x). After the blocks: a 1x1
    conv to 6x the last block's channels, global pool, linear to 1024, hardswish, dropout,
    ``head`` (linear). BatchNorm keeps torch's defaults (momentum 0.1, not torchvision's 0.01):
    short CPU runs need running statistics that catch up quickly.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 224,
        width: int = 100,
        dropout: float = 0.2,
    ):
        super().__init__()
        mult = width / 100
        small = input_size <= SMALL_INPUT
        stem_channels = _make_divisible(16 * mult)
        layers: list[nn.Module] = [
            _conv_bn_act(in_channels, stem_channels, 3, 1 if small else 2, act=nn.Hardswish)
        ]
        channels = stem_channels
        for i, (kernel, expansion, out, use_se, act, stride) in enumerate(MOBILENET_V3_SMALL):
            out_channels = _make_divisible(out * mult)
            layers.append(
                InvertedResidual(
                    channels,
                    kernel,
                    _make_divisible(expansion * mult),
                    out_channels,
                    use_se,
                    act,
                    1 if small and i == 0 else stride,
                )
            )
            channels = out_channels
        last_conv = 6 * channels
        layers.append(_conv_bn_act(channels, last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        last_channel = _make_divisible(1024 * mult)
        self.pre_head = nn.Sequential(
            nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True), nn.Dropout(dropout)
        )
        self.head = nn.Linear(last_channel, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.head(self.pre_head(x))


# --- building, heads, checkpoints ------------------------------------------------------------

_CLASSES: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "mobilenet_v3_small": MobileNetV3Small,
}


def build_model(arch: dict) -> nn.Module:
    """The model a record's ``arch`` describes: ``{"name", "in_channels", "num_classes",
    "input_size", "width"}`` (a detector's: ``workloads.training.checkpoint.build``). No ``name`` (a record written before there was a choice) means
    ``small_cnn``; no ``width`` (or None) means ``DEFAULT_WIDTH[name]``."""
    name = arch.get("name") or "small_cnn"
    if name not in _CLASSES:
        raise ValueError(f"unknown model arch {name!r}: choose one of {', '.join(ARCHS)}")
    width = arch.get("width")
    if width is None:
        width = DEFAULT_WIDTH[name]
    if int(width) != width or width <= 0:
        raise ValueError(f"arch {name!r}: width must be a positive integer, got {width!r}")
    return _CLASSES[name](
        in_channels=arch["in_channels"],
        num_classes=arch["num_classes"],
        input_size=arch["input_size"],
        width=int(width),
    )


def head_of(model: nn.Module) -> nn.Linear:
    """The final linear layer: ``model.head``, or ``classifier[-1]`` for SmallCNN."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
        return classifier[-1]
    raise TypeError(f"{type(model).__name__} has no linear head (model.head or classifier[-1])")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the head, in place, for a freshly initialised one with ``num_classes`` outputs (on
    the old head's device and dtype); every other weight is kept. Returns ``model``. A record
    saved afterwards needs its ``arch["num_classes"]`` updated to match."""
    old = head_of(model)
    new = nn.Linear(
        old.in_features,
        num_classes,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    if isinstance(getattr(model, "head", None), nn.Linear):
        model.head = new
    else:
        model.classifier[-1] = new
    return model


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

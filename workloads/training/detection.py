"""The detector a ``--task detection`` training builds: CenterNet ("Objects as Points", Zhou et
al. 2019) on the classification side's backbones, in plain torch.

    image (B, C, S, S) → backbone stages → FPN-style neck (top-down, ``NECK`` channels) at
    stride 4 → three heads per cell: a heat map per class (sigmoid: "an object's centre is
    here"), the box's log width and height (in cells), the centre's sub-cell offset.

Decoding needs no NMS: a 3x3 max-pool keeps each heat map's local peaks, the top ``TOP_K``
become boxes. It is part of the exported graph (``Detector``: MaxPool, Equal, TopK, Gather),
so a TorchScript or ONNX file maps an image straight to ``(B, TOP_K, 6)`` detections
``[x0, y0, x1, y1, score, class]`` in the input's pixels, best first.

Training targets (``encode``) are made per image in the input pipeline: a Gaussian at each box's
centre cell (TTFNet's elliptical radii: sigma = 0.54 * side / 6), and, at that cell, its size
and offset. The loss (``loss``) is CenterNet's: the penalty-reduced focal loss on the heat map
and L1 on the size (log) and offset, each over the number of objects. Crowd boxes are left out
of the targets (as COCO's evaluation ignores them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workloads.training.spec import DETECTION_ARCHS, TOP_K

STRIDE = 4  # the heat map's cell, in input pixels
NECK = 64  # channels of the neck and the heads
MAX_OBJECTS = 128  # boxes an image's targets hold (the rest are dropped, largest first kept)
GAUSSIAN_ALPHA = 0.54  # TTFNet: sigma = alpha * side / 6
HEAT_PRIOR = 0.01  # the heat map's initial probability (its bias: -log((1 - p) / p))


def _stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's feature stages in order (no pool, no head)."""
    from workloads.training.models import MobileNetV3Small, ResNet18

    if isinstance(backbone, ResNet18):
        return [backbone.stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    if isinstance(backbone, MobileNetV3Small):
        return list(backbone.features)
    raise ValueError(
        f"a detector is built on {' or '.join(DETECTION_ARCHS)}, not {type(backbone).__name__}"
    )


class CenterNet(nn.Module):
    """``forward(x)`` → (heat logits (B, K, S/4, S/4), log size (B, 2, ...), offset (B, 2, ...))."""

    def __init__(self, arch: dict):
        from workloads.training.models import build_model

        super().__init__()
        if arch.get("name") not in DETECTION_ARCHS:
            raise ValueError(
                f"a detector is built on {' or '.join(DETECTION_ARCHS)}, not {arch.get('name')!r}"
            )
        size = arch["input_size"]
        if size % 32:
            raise ValueError(f"a detector's input_size is a multiple of 32, not {size}")
        backbone = build_model({**arch, "task": "classification", "num_classes": 1})
        self.stages = nn.ModuleList(_stages(backbone))
        # Where each stride's last feature comes out: probe once with a blank image.
        taps: dict[int, tuple[int, int]] = {}
        with torch.no_grad():
            x = torch.zeros(1, arch["in_channels"], size, size)
            for i, stage in enumerate(self.stages):
                x = stage.eval()(x)
                taps[size // x.shape[-1]] = (i, x.shape[1])
        self.train()
        wanted = [s for s in sorted(taps) if s >= STRIDE]
        if STRIDE not in wanted:
            raise ValueError(f"the {arch['name']} backbone has no stride-{STRIDE} feature")
        self.taps = [taps[s][0] for s in wanted]  # stage indexes, shallow to deep
        self.lateral = nn.ModuleList(nn.Conv2d(taps[s][1], NECK, 1) for s in wanted)
        self.smooth = nn.Sequential(
            nn.Conv2d(NECK, NECK, 3, padding=1, bias=False),
            nn.BatchNorm2d(NECK),
            nn.ReLU(inplace=True),
        )
        classes = arch["num_classes"]
        self.heat, self.size, self.offset = (_head(n) for n in (classes, 2, 2))
        nn.init.constant_(self.heat[-1].bias, -math.log((1 - HEAT_PRIOR) / HEAT_PRIOR))

    def forward(self, x: torch.Tensor):
        feats = []
        last = self.taps[-1]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                feats.append(x)
            if i == last:
                break
        y = self.lateral[-1](feats[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            y = F.interpolate(y, size=f.shape[-2:], mode="nearest") + lateral(f)
        y = self.smooth(y)
        return self.heat(y), self.size(y), self.offset(y)


def _head(out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(NECK, NECK, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(NECK, out, 1)
    )


class Detector(nn.Module):
    """A trained ``CenterNet`` with its decoding: ``forward(x)`` → (B, ``k``, 6) float
    ``[x0, y0, x1, y1, score, class]`` in the input's pixels, by score (what is exported)."""

    def __init__(self, net: CenterNet, k: int = TOP_K):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode(*self.net(x), k=self.k)


def decode(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, k: int = TOP_K):
    """(B, k, 6) detections of the heads' outputs: the heat maps' local peaks (3x3), the best k."""
    b, c, h, w = heat.shape
    p = torch.sigmoid(heat)
    peaks = p * (F.max_pool2d(p, 3, stride=1, padding=1) == p).to(p.dtype)
    scores, where = torch.topk(peaks.reshape(b, -1), min(k, c * h * w))
    cls = torch.div(where, h * w, rounding_mode="floor")
    cell = where - cls * (h * w)
    ys = torch.div(cell, w, rounding_mode="floor")
    xs = cell - ys * w
    size = torch.gather(size.reshape(b, 2, h * w), 2, cell.unsqueeze(1).expand(b, 2, -1))
    off = torch.gather(offset.reshape(b, 2, h * w), 2, cell.unsqueeze(1).expand(b, 2, -1))
    cx = (xs.to(p.dtype) + off[:, 0]) * STRIDE
    cy = (ys.to(p.dtype) + off[:, 1]) * STRIDE
    half_w = torch.exp(size[:, 0]) * (STRIDE / 2)
    half_h = torch.exp(size[:, 1]) * (STRIDE / 2)
    return torch.stack(
        [cx - half_w, cy - half_h, cx + half_w, cy + half_h, scores, cls.to(p.dtype)], dim=2
    )


# -- targets and loss --------------------------------------------------------------------------
def encode(boxes: np.ndarray, labels: np.ndarray, classes: int, size: int) -> dict[str, np.ndarray]:
    """Training targets of one ``size`` x ``size`` image's boxes (xyxy in its pixels, non-crowd)
    and their class indexes: ``heat`` (classes, S/4, S/4), and per object slot (``MAX_OBJECTS``)
    ``index`` (its cell), ``wh`` (log size in cells), ``offset``, ``mask``."""
    cells = size // STRIDE
    heat = np.zeros((classes, cells, cells), np.float32)
    index = np.zeros(MAX_OBJECTS, np.int64)
    wh = np.zeros((MAX_OBJECTS, 2), np.float32)
    offset = np.zeros((MAX_OBJECTS, 2), np.float32)
    mask = np.zeros(MAX_OBJECTS, np.float32)
    if len(boxes):
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-areas, kind="stable")[:MAX_OBJECTS]  # small ones drawn last, on top
        ys, xs = np.arange(cells, dtype=np.float32)[:, None], np.arange(cells, dtype=np.float32)
        for slot, i in enumerate(order):
            x0, y0, x1, y1 = boxes[i] / STRIDE
            bw, bh = x1 - x0, y1 - y0
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ix, iy = min(int(cx), cells - 1), min(int(cy), cells - 1)
            sx = max(GAUSSIAN_ALPHA * bw / 6, 0.3)
            sy = max(GAUSSIAN_ALPHA * bh / 6, 0.3)
            g = np.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
            np.maximum(heat[labels[i]], g, out=heat[labels[i]])
            heat[labels[i], iy, ix] = 1.0
            index[slot] = iy * cells + ix
            wh[slot] = np.log(max(bw, 1e-3)), np.log(max(bh, 1e-3))
            offset[slot] = cx - ix, cy - iy
            mask[slot] = 1.0
    return {"heat": heat, "index": index, "wh": wh, "offset": offset, "mask": mask}


def loss(outputs, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """CenterNet's loss of a batch: focal (heat) + L1 (log size) + L1 (offset), per object."""
    heat, size, offset = outputs
    objects = targets["mask"].sum().clamp(min=1.0)
    focal = _focal(heat, targets["heat"]) / objects
    b = heat.shape[0]

    def at_centres(t: torch.Tensor) -> torch.Tensor:  # (B, 2, H, W) → (B, MAX_OBJECTS, 2)
        index = targets["index"].unsqueeze(1).expand(b, 2, -1)
        return torch.gather(t.reshape(b, 2, -1), 2, index).transpose(1, 2)

    m = targets["mask"].unsqueeze(2)
    size_l1 = (F.l1_loss(at_centres(size), targets["wh"], reduction="none") * m).sum() / objects
    off_l1 = (
        F.l1_loss(at_centres(offset), targets["offset"], reduction="none") * m
    ).sum() / objects
    total = focal + size_l1 + off_l1
    return total, {"heat": focal.item(), "size": size_l1.item(), "offset": off_l1.item()}


def _focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The penalty-reduced focal loss (alpha 2, beta 4), summed; computed from logits (stable)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).to(p.dtype)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos_loss = -(log_p * (1 - p) ** 2 * pos)
    neg_loss = -(log_not_p * p**2 * (1 - target) ** 4 * (1 - pos))
    return pos_loss.sum() + neg_loss.sum()

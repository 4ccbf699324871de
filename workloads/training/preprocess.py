"""How an image becomes a model's input — decode, augment (training only), resize, channels,
normalise — with NumPy and OpenCV only: training, evaluation, the export's parity samples and
``cvgraph predict`` (torch-free) apply the same code. ``Preprocess.to_json`` is the export's
``preprocess.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from workloads.kernels import crop_geometry
from workloads.kernels import decode as decode_as_displayed
from workloads.training.spec import AUGMENT_LEVELS

PREPROCESS_FORMAT = "cvgraph.preprocess"
PREPROCESS_VERSION = 1


CROP_SCALE = {"light": (0.7, 1.0), "standard": (0.35, 1.0)}
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.3  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
HUE = 0.05  # hue shift, a fraction of the colour circle (18 degrees)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, what cv2's RGB2GRAY weighs


# -- preprocessing: what training, evaluation and the export apply -----------------------------
@dataclass(frozen=True)
class Preprocess:
    """uint8 image → float32 (channels, size, size): resized (area) to ``size`` x ``size`` if it
    is not, converted to ``channels`` (3: RGB, 1: gray), scaled to [0, 1], then ``(x - mean) /
    std`` per channel."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (RGB), not {self.channels}")
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"size must be a positive integer, not {self.size}")
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(
                f"mean and std need {self.channels} values each, got {len(mean)} and {len(std)}"
            )
        if not all(s > 0 for s in std) or not all(map(math.isfinite, mean + std)):
            raise ValueError(f"std must be positive and finite and mean finite: {mean}, {std}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        # (x / 255 - m) / s == x * (1 / (255 s)) - m / s: one multiply-add per pixel
        object.__setattr__(self, "_scale", (1.0 / (255.0 * np.array(std))).astype(np.float32))
        object.__setattr__(self, "_offset", (-np.array(mean) / np.array(std)).astype(np.float32))

    def __call__(self, img: np.ndarray) -> np.ndarray:
        img = to_channels(img, self.channels)
        if img.shape[:2] != (self.size, self.size):
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = img.reshape(self.size, self.size, self.channels).astype(np.float32)
        x *= self._scale
        x += self._offset
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def to_json(self) -> str:
        """The export's ``preprocess.json``: the four fields, and how they are applied."""
        return (
            json.dumps(
                {
                    "format": PREPROCESS_FORMAT,
                    "version": PREPROCESS_VERSION,
                    "size": self.size,
                    "channels": self.channels,
                    "color": "RGB" if self.channels == 3 else "GRAY",
                    "layout": "CHW",
                    "resize": "area (cv2.INTER_AREA) to size x size",
                    "normalise": "(uint8 / 255 - mean) / std, per channel",
                    "mean": list(self.mean),
                    "std": list(self.std),
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str | bytes | dict) -> Preprocess:
        spec = text if isinstance(text, dict) else json.loads(text)
        if spec.get("version", PREPROCESS_VERSION) != PREPROCESS_VERSION:
            raise ValueError(
                f"preprocess version {spec['version']!r}: this build reads {PREPROCESS_VERSION}"
            )
        missing = [k for k in ("size", "channels", "mean", "std") if k not in spec]
        if missing:
            raise ValueError(f"preprocess spec lacks {', '.join(missing)}")
        return cls(spec["size"], spec["channels"], tuple(spec["mean"]), tuple(spec["std"]))


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) or gray (H, W) from an RGB, RGBA (alpha dropped) or gray image."""
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.ndim != 2 and not (img.ndim == 3 and img.shape[2] == 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {img.shape}")
    if channels == 1:
        return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img


def decode(data: bytes, channels: int, name: str = "image") -> np.ndarray:
    """uint8 RGB (H, W, 3) or gray (H, W) of encoded ``data``, as displayed: the decode the lake's
    variants were made with (``workloads.kernels.decode``: PNG, WebP and BMP unchanged, alpha on
    white, 16 bits scaled; JPEG with its EXIF orientation; the rest through Pillow)."""
    try:
        bgr = decode_as_displayed(data, _format(data), 0, 0, 0, fast=False)
    except Exception as e:  # Pillow's own errors for what is no image at all
        raise ValueError(f"{name} is not a decodable image ({type(e).__name__}: {e})") from None
    if bgr is None:
        raise ValueError(f"{name} is not a decodable image")
    code = cv2.COLOR_BGR2GRAY if channels == 1 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(bgr, code)


def _format(data: bytes) -> str:
    """Pillow's name of the format ``data`` starts like (what ``kernels.decode`` dispatches on)."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return "OTHER"


def channel_stats(
    images: Sequence[str | Path | bytes | np.ndarray],
    channels: int,
    size: int,
    limit: int = 512,
    reader: Callable[[str], bytes] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, in [0, 1], of up to ``limit`` of ``images`` (evenly spaced over
    the sequence, so the same sequence gives the same answer) at the model's resolution
    (``size`` x ``size``, area resize). Items are decoded arrays, encoded bytes, or names:
    ``reader(name)`` gives their bytes (default: the file at that path). One image at a time."""
    n = len(images)
    if n == 0:
        raise ValueError("channel_stats needs at least one image")
    picks = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(np.int64))
    total = np.zeros(channels, np.float64)
    squares = np.zeros(channels, np.float64)
    pixels = 0
    for i in picks:
        item = images[int(i)]
        if isinstance(item, np.ndarray):
            img = to_channels(item, channels)
        else:
            data = item if isinstance(item, bytes) else (reader or _read_path)(item)
            img = decode(data, channels, str(item) if not isinstance(item, bytes) else f"image {i}")
        if img.shape[:2] != (size, size):
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        x = img.reshape(-1, channels).astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
        pixels += len(x)
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean * mean, 0.0))
    # a constant channel (all-black edge maps of one class...) must not divide by zero
    return tuple(round(float(m), 6) for m in mean), tuple(
        round(max(float(s), 1e-3), 6) for s in std
    )


def _read_path(path) -> bytes:
    return Path(path).read_bytes()


# -- augmentation -------------------------------------------------------------------------------
def augment(img: np.ndarray, level: str, rng: np.random.Generator | None, size: int) -> np.ndarray:
    """uint8 ``size`` x ``size`` image (as many channels as ``img``: HxW, HxWx1 or HxWx3) from
    uint8 ``img``. ``none``: resized (area), no randomness (``rng`` may be None). ``light``: a
    random resized crop (area 0.7-1 of the image, aspect 3/4-4/3) and a horizontal flip half the
    time. ``standard``: crops from 0.35 of the area, the flip, and colour jitter (brightness,
    contrast and saturation x0.7-1.3, hue +-18 degrees; gray images get brightness and contrast
    only). The same ``rng`` state gives the same image."""
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augment {level!r}: expected one of {', '.join(AUGMENT_LEVELS)}")
    if img.dtype != np.uint8:
        raise ValueError(f"augment expects a uint8 image, got {img.dtype}")
    single = img.ndim == 3 and img.shape[2] == 1
    if single:
        img = img[:, :, 0]
    if level == "none":
        out = img
        if img.shape[:2] != (size, size):
            out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    else:
        if rng is None:
            raise ValueError(f"augment {level!r} needs an rng")
        y, x, h, w = _crop_box(img.shape[0], img.shape[1], CROP_SCALE[level], rng)
        crop = img[y : y + h, x : x + w]
        interp = cv2.INTER_AREA if h > size and w > size else cv2.INTER_LINEAR
        out = cv2.resize(crop, (size, size), interpolation=interp)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        if level == "standard":
            out = _jitter(out, rng)
        out = np.ascontiguousarray(out)
    return out[:, :, None] if single else out


def _crop_box(
    height: int, width: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(y, x, h, w) of a random resized crop, as torchvision draws it: ten tries at an area and
    an aspect, then the centre crop at the nearest allowed aspect."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return y, x, h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation then hue, with factors drawn whatever the channels (so a
    gray and an RGB image consume the rng alike)."""
    brightness, contrast, saturation = rng.uniform(1 - JITTER, 1 + JITTER, 3)
    hue = rng.uniform(-HUE, HUE)
    rgb = img.ndim == 3
    x = img.astype(np.float32) * np.float32(brightness)
    gray = x @ LUMA if rgb else x
    mean = np.float32(gray.mean())
    x = (x - mean) * np.float32(contrast) + mean
    if rgb:
        gray = (x @ LUMA)[:, :, None]
        x = gray + (x - gray) * np.float32(saturation)
    out = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    if rgb:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL)  # hue in 0-255 for the whole circle
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int16) + round(hue * 256)) % 256
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    return out


# -- boxes ---------------------------------------------------------------------------------------
MIN_VISIBLE = 0.4  # of a box's area a crop must keep for the box to stay a training target


def variant_boxes(
    boxes: Sequence[Sequence[float]], width: int, height: int, variant: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(xyxy, which of ``boxes`` they are): ``boxes`` (x, y, w, h in the original's ``width`` x
    ``height`` pixels) in the pixels of ``variant``. As they are for ``original``; for
    ``resized`` and ``edges`` (the short side resized to ``size``, then a centre crop to ``size``
    x ``size``) scaled, shifted, clipped to the crop, and left out when nothing of them is in it."""
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float64).reshape(-1, 4)
    if variant == "original":
        return xyxy, np.arange(len(xyxy))
    nw, nh, x0, y0 = crop_geometry(width, height, size)
    scale, shift = np.array([nw / width, nh / height] * 2), np.array([x0, y0] * 2)
    xyxy = np.clip(xyxy * scale - shift, 0, size)
    kept = np.flatnonzero((xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1]))
    return xyxy[kept], kept


def augment_detection(
    img: np.ndarray,
    boxes: np.ndarray,
    level: str,
    rng: np.random.Generator | None,
    size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 ``size`` x ``size`` image, its boxes xyxy, which of ``boxes`` they are) from ``img``
    and ``boxes`` (xyxy in its pixels): ``augment``'s geometry, the boxes moved with the image.
    ``none``: stretched to the square. ``light``/``standard``: the random resized crop (a box
    stays when ``MIN_VISIBLE`` of its area is in the crop, clipped to it), the flip, and for
    ``standard`` the colour jitter."""
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augment {level!r}: expected one of {', '.join(AUGMENT_LEVELS)}")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    height, width = img.shape[:2]
    kept = np.arange(len(boxes))
    if level == "none":
        y, x, h, w = 0, 0, height, width
    else:
        if rng is None:
            raise ValueError(f"augment {level!r} needs an rng")
        y, x, h, w = _crop_box(height, width, CROP_SCALE[level], rng)
        clipped = np.clip(boxes - [x, y, x, y], 0, [w, h, w, h])
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        seen = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        kept = np.flatnonzero((seen > 0) & (seen >= MIN_VISIBLE * area))
        boxes = clipped[kept] + [x, y, x, y]
    crop = img[y : y + h, x : x + w]
    interp = cv2.INTER_AREA if h > size and w > size else cv2.INTER_LINEAR
    out = crop if (h, w) == (size, size) else cv2.resize(crop, (size, size), interpolation=interp)
    scaled = (boxes - [x, y, x, y]) * [size / w, size / h, size / w, size / h]
    if level != "none":
        if rng.random() < 0.5:
            out = out[:, ::-1]
            scaled = np.stack(
                [size - scaled[:, 2], scaled[:, 1], size - scaled[:, 0], scaled[:, 3]], axis=1
            ).reshape(-1, 4)
        if level == "standard":
            out = _jitter(out, rng)
    return np.ascontiguousarray(out), scaled, kept


def model_preprocess(record: dict) -> Preprocess:
    """The input a saved model (``model.pt``'s record) was trained on: its ``preprocess``, or,
    for a model saved before there was one, gray at its input size in [0, 1]."""
    if record.get("preprocess"):
        return Preprocess.from_json(record["preprocess"])
    channels = record["arch"].get("in_channels", 1)
    return Preprocess(record["arch"]["input_size"], channels, (0.0,) * channels, (1.0,) * channels)

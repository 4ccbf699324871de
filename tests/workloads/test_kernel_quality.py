"""The fast image path does not buy speed with worse images.

Reference: full decode + area resize + centre crop. Fast: the DCT-scaled decode the kernel
picks, then the same. Inputs are real photos — every colour photo scikit-learn and
scikit-image ship, as JPEG q92 at native size, and three 6 MP mosaics of them (camera-sized,
photo detail per pixel) — at the sizes models are trained on.
"""

import cv2
import numpy as np
import pytest

from cvgraph.demo_packs import mosaic, photos
from workloads.kernels import EdgeParams, decode, reduction_factor, resize_center_crop

SIZES = (64, 128, 224, 256)


@pytest.fixture(scope="module")
def jpegs() -> list[tuple[bytes, int, int]]:
    imgs = list(photos()) + [mosaic(seed) for seed in range(3)]
    return [
        (
            cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes(),
            img.shape[1],
            img.shape[0],
        )
        for img in imgs
    ]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def edges(img: np.ndarray) -> np.ndarray:
    p = EdgeParams()
    return cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), p.low, p.high)


@pytest.mark.parametrize("size", SIZES)
def test_fast_path_matches_the_full_decode_reference(jpegs, size):
    assert len(jpegs) >= 12
    scores, agreement, reduced = [], [], 0
    for data, w, h in jpegs:
        fast = resize_center_crop(decode(data, "JPEG", w, h, size, fast=True), size)
        ref = resize_center_crop(decode(data, "JPEG", w, h, size, fast=False), size)
        assert fast.shape == ref.shape == (size, size, 3)
        scores.append(psnr(fast, ref))
        agreement.append(float(np.mean(edges(fast) == edges(ref))))
        reduced += reduction_factor(w, h, size) > 1
    assert reduced >= 3, "the fast path must actually take reduced decodes here"
    assert np.median(scores) >= 35, sorted(scores)
    assert min(scores) >= 30, sorted(scores)
    assert np.median(agreement) >= 0.95, sorted(agreement)

"""Benchmark inputs built from the photos that scikit-learn and scikit-image ship.

* 6 MP JPEGs (3000x2000, quality 92): mosaics of the photos at about their native scale
  (x1.0-1.3, random flips), so the detail per pixel is that of a real photo, not of an
  upscaled thumbnail; and a few 6 MP PNG mosaics.
* small distinct JPEGs (320x240 crops at random positions, scales and flips).
* a large pack: 6 MP JPEGs made distinct by a unique JPEG comment segment, and noise PNGs.

Nothing is downloaded; everything is deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from cvgraph.demo_packs import mosaic, photos


def encode(img: np.ndarray, fmt: str, quality: int = 92, png_level: int = 1) -> bytes:
    if fmt == "JPEG":
        ok, out = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        ok, out = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, png_level])
    assert ok
    return out.tobytes()


def big_images(
    n_jpeg: int, n_png: int, width: int = 3000, height: int = 2000, seed: int = 0
) -> list[dict]:
    """``[{"name", "format", "width", "height", "bytes"}]``: 6 MP mosaics as JPEG q92 and PNG."""
    out = []
    for i in range(n_jpeg + n_png):
        fmt = "JPEG" if i < n_jpeg else "PNG"
        data = encode(mosaic(seed + i, width, height), fmt)
        out.append(
            {
                "name": f"mosaic_{i:02d}.{'jpg' if fmt == 'JPEG' else 'png'}",
                "format": fmt,
                "width": width,
                "height": height,
                "bytes": data,
            }
        )
    return out


def small_crops(
    n: int, width: int = 320, height: int = 240, seed: int = 1, quality: int = 90
) -> Iterator[bytes]:
    """``n`` distinct small JPEGs: crops of the photos at random positions, scales and flips."""
    rng = np.random.default_rng(seed)
    ims = photos()
    seen: set[bytes] = set()
    while len(seen) < n:
        src = ims[int(rng.integers(len(ims)))]
        h0, w0 = src.shape[:2]
        s_min = max(width / w0, height / h0)
        s = float(rng.uniform(s_min, max(s_min * 1.05, 1.2)))
        img = cv2.resize(
            src,
            (max(width, round(w0 * s)), max(height, round(h0 * s))),
            interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
        )
        y = int(rng.integers(img.shape[0] - height + 1))
        x = int(rng.integers(img.shape[1] - width + 1))
        crop = img[y : y + height, x : x + width]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        data = encode(np.ascontiguousarray(crop), "JPEG", quality)
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield data


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """The same JPEG with a COM segment right after SOI: distinct bytes, identical pixels."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def noise_png(seed: int, width: int, height: int) -> bytes:
    """A random RGB PNG whose IDAT is zlib "stored" (no compression): large, valid, and fast to
    make and to inflate. Written directly (signature, IHDR, IDAT, IEND): PNG encoders spend
    their time choosing row filters, which incompressible noise does not need."""
    rows = (
        np.frombuffer(np.random.default_rng(seed).bytes(height * (1 + 3 * width)), np.uint8)
        .reshape(height, -1)
        .copy()
    )
    rows[:, 0] = 0  # filter type None on every row
    idat = zlib.compress(rows.tobytes(), 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def write_pack(path: Path, members: Iterator[tuple[str, bytes]]) -> dict:
    """Stream members into a ZIP_STORED zip (one member in memory at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = total = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data in members:
            _member(zf, name, data)
            n += 1
            total += len(data)
    return {"members": n, "member_bytes": total, "zip_bytes": path.stat().st_size}


def big_pack_members(
    target_bytes: int,
    jpeg_share: float = 0.3,
    png_side: tuple[int, int] = (3000, 2000),
    seed: int = 7,
) -> Iterator[tuple[str, bytes]]:
    """Members until ``target_bytes``: 6 MP JPEGs made distinct by a comment, and noise PNGs."""
    bases = [encode(mosaic(seed + i), "JPEG") for i in range(4)]
    total = jpeg_bytes = 0
    i = 0
    while total < target_bytes:
        if jpeg_bytes < jpeg_share * max(total, 1):
            data = with_comment(bases[i % len(bases)], f"cvgraph bench member {i}".encode())
            name = f"photos/mosaic_{i:05d}.jpg"
            jpeg_bytes += len(data)
        else:
            data = noise_png(seed * 1000 + i, *png_side)
            name = f"noise/noise_{i:05d}.png"
        total += len(data)
        i += 1
        yield name, data

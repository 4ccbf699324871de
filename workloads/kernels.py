"""Image kernels: decode (DCT-scaled for JPEG), normalise, resize + centre crop, edges.

OpenCV releases the GIL in decode/resize/encode, so callers overlap I/O with threads.
"""

from __future__ import annotations

import cv2
import numpy as np

# the parameters live where the orchestrator reads them without OpenCV; the kernels' callers
# import them from either module
from workloads.image_params import KERNEL_VERSION, EdgeParams, ResizeParams  # noqa: F401

# IMREAD_REDUCED_COLOR_k decodes a JPEG at 1/k scale straight from the DCT coefficients.
# 1/8 keeps only each block's DC term, nearly the 8x8 mean an area resize takes, so it only
# has to cover the target. 1/2 (and 1/4) run a truncated IDCT, sharper than an area filter:
# on detailed photos that costs up to ~8 dB of PSNR against the full decode unless the area
# resize that follows spans >= 2 pixels (tests/workloads/test_kernel_quality.py). With that
# margin 1/4 is never the pick (>= 8x the target already allows 1/8), so it is left out.
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8, 1), (2, cv2.IMREAD_REDUCED_COLOR_2, 2))
_FLAG = {k: flag for k, flag, _ in _REDUCED}


def reduction_factor(width: int, height: int, target: int) -> int:
    """The largest DCT scale factor whose decoded short side covers ``target`` by its margin."""
    short = min(width, height)
    for k, _, margin in _REDUCED:
        if short // k >= target * margin:
            return k
    return 1


def _to_bgr8(img: np.ndarray) -> np.ndarray:
    """Any decoded array (gray, alpha, 16-bit) → 8-bit BGR; alpha composited on white."""
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        rgb = img[:, :, :3].astype(np.float32)
        return (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    if img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img


# Formats OpenCV decodes unchanged (alpha and 16 bits kept), unless the file carries what
# IMREAD_UNCHANGED ignores: EXIF orientation (PNG eXIf, ImageMagick's text chunk, WebP EXIF)
# or the tRNS colour key of a gray/RGB PNG. A byte scan is cheap next to a decode; a false
# hit only costs the slower, equally correct Pillow path.
_UNCHANGED_UNLESS = {
    "PNG": (b"eXIf", b"Raw profile type exif", b"tRNS"),
    "WEBP": (b"EXIF",),
    "BMP": (),
}


def exif_orientation(im) -> int:
    """The EXIF orientation (1-8) of a loaded Pillow image; 1 if none or unreadable.

    EXIF only: Pillow also honours an XMP ``tiff:Orientation``, which browsers and OpenCV
    ignore, so "as displayed" would differ between decoders.
    """
    for key in ("XML:com.adobe.xmp", "xmp"):
        im.info.pop(key, None)
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block does not make the pixels undecodable
        return 1


def _decode_with_pillow(buf: bytes) -> np.ndarray:
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(buf)) as opened:
        opened.load()  # a PNG's eXIf may follow the pixels
        im = ImageOps.exif_transpose(opened) if exif_orientation(opened) != 1 else opened
        if im.mode.startswith(
            "I"
        ):  # I;16* (16-bit) or I (32-bit holding 16-bit samples): scale, don't clip
            return _to_bgr8(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
        if im.mode == "F":
            return _to_bgr8(np.asarray(im))
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"))
            return _to_bgr8(cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)


def decode(
    buf: bytes, fmt: str, width: int, height: int, target: int, fast: bool = True
) -> np.ndarray:
    """Decode to 8-bit BGR, as displayed (EXIF orientation applied, alpha on white).

    JPEG takes the DCT-scaled path when ``fast``; PNG has no scaled decode, and formats with
    alpha, 16-bit or palettes need the unchanged decode to be normalised correctly. TIFF
    (16-bit, palettes, orientation) and GIF go to Pillow.
    """
    arr = np.frombuffer(buf, np.uint8)
    if fmt in ("JPEG", "MPO"):  # MPO: a JPEG followed by more views; the first is the image
        flag = cv2.IMREAD_COLOR
        if fast:
            k = reduction_factor(width, height, target)
            flag = _FLAG.get(k, cv2.IMREAD_COLOR)
        img = cv2.imdecode(arr, flag)  # applies EXIF orientation; handles gray and CMYK
        if img is not None:
            return img
    elif fmt in _UNCHANGED_UNLESS and not any(m in buf for m in _UNCHANGED_UNLESS[fmt]):
        img = cv2.imdecode(
            arr, cv2.IMREAD_UNCHANGED
        )  # keeps alpha and 16 bits, ignores orientation
        if img is not None:
            return _to_bgr8(img)
    return _decode_with_pillow(buf)


def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop x0, crop y0) of ``resize_center_crop`` for an image
    of ``width`` x ``height``: what maps a box of the original into the crop."""
    scale = size / min(height, width)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    nw, nh, x0, y0 = crop_geometry(w, h, size)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    resized = cv2.resize(img, (nw, nh), interpolation=interp)
    return np.ascontiguousarray(resized[y0 : y0 + size, x0 : x0 + size])


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, out = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encode failed")
    return out.tobytes()


def edges_png(resized_jpeg: bytes, params: EdgeParams) -> bytes:
    """Canny edges of the *stored* resized image, so fused and separate runs agree byte for byte."""
    gray = cv2.imdecode(np.frombuffer(resized_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError("resized image is not decodable")
    edges = cv2.Canny(gray, params.low, params.high)
    # Canny gives 0/255 only: a 1-bit PNG decodes to the same array, ~4x faster to encode, smaller.
    ok, out = cv2.imencode(".png", edges, [cv2.IMWRITE_PNG_BILEVEL, 1])
    if not ok:
        raise ValueError("PNG encode failed")
    return out.tobytes()


def resize_bytes(
    buf: bytes, fmt: str, width: int, height: int, params: ResizeParams, fast: bool = True
) -> bytes:
    img = decode(buf, fmt, width, height, params.size, fast=fast)
    if img is None:
        raise ValueError("undecodable image")
    return encode_jpeg(resize_center_crop(img, params.size), params.jpeg_quality)

"""Demo packs built from images that installed packages ship (nothing is downloaded).

* ``digits.zip``: scikit-learn's 1,797 handwritten digits, upscaled to 96 px PNG, one
  folder per class (the folder is the label).
* ``mosaic()``: camera-sized (6 MP) images tiled from those photos at native scale, for
  benchmarks and the kernel quality test.
* ``photo_class_members()``: a user's own colour photos in class folders (crops of one photo
  per class), for training with the defaults.
* ``shapes.zip``: a detection pack (``shape_members``): 160 px crops of those photos with
  circles, squares and triangles drawn on them, their boxes exact, in COCO instances.
* ``photos.zip``: the sample photos of scikit-learn and scikit-image (JPEG, PNG, gray,
  RGBA, GIF) with COCO-style boxes, plus what real packs carry: OS junk, a text file, a
  duplicate photo.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np

# (file, package, category, box as x, y, w, h) — hand-drawn boxes around the main subject.
PHOTOS = [
    ("china.jpg", "sklearn", "building", (140, 40, 360, 300)),
    ("flower.jpg", "sklearn", "flower", (60, 20, 460, 400)),
    ("rocket.jpg", "skimage", "rocket", (290, 40, 70, 380)),
    ("hubble_deep_field.jpg", "skimage", "galaxy", (380, 320, 220, 200)),
    ("retina.jpg", "skimage", "retina", (80, 80, 1250, 1250)),
    ("astronaut.png", "skimage", "person", (120, 0, 330, 512)),
    ("chelsea.png", "skimage", "cat", (60, 10, 300, 290)),
    ("coffee.png", "skimage", "cup", (80, 20, 460, 360)),
    ("motorcycle_left.png", "skimage", "motorcycle", (60, 60, 640, 430)),
    ("horse.png", "skimage", "horse", (20, 20, 360, 300)),
    ("logo.png", "skimage", "logo", (20, 20, 460, 460)),
    ("camera.png", "skimage", "person", (140, 40, 240, 420)),
    ("coins.png", "skimage", "coin", (10, 10, 360, 280)),
    ("no_time_for_that_tiny.gif", "skimage", "animation", (0, 0, 14, 25)),
]


def _add(zf: zipfile.ZipFile, name: str, data: bytes | str) -> None:
    """Add a member with a fixed timestamp, so the same inputs make the same zip bytes."""
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zf.compression
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _package_file(package: str, name: str) -> Path:
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / name
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def sample_image(name: str) -> bytes:
    """Bytes of a sample image that scikit-learn (china.jpg, flower.jpg) or scikit-image ships."""
    return _package_file(
        "sklearn" if name in ("china.jpg", "flower.jpg") else "skimage", name
    ).read_bytes()


COLOR_PHOTOS = (
    "china.jpg",
    "flower.jpg",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "ihc.png",
)


@functools.lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """Every colour photo the two packages ship, decoded (BGR)."""
    out = []
    for name in COLOR_PHOTOS:
        img = cv2.imdecode(np.frombuffer(sample_image(name), np.uint8), cv2.IMREAD_COLOR)
        if img is not None:
            out.append(img)
    return tuple(out)


def mosaic(seed: int, width: int = 3000, height: int = 2000) -> np.ndarray:
    """Rows of photo tiles at x1.0-1.3 of their native size, randomly flipped."""
    rng = np.random.default_rng(seed)
    ims = photos()
    canvas = np.zeros((height, width, 3), np.uint8)
    y = 0
    while y < height:
        x, row_h = 0, 0
        while x < width:
            tile = ims[int(rng.integers(len(ims)))]
            s = float(rng.uniform(1.0, 1.3))
            tile = cv2.resize(tile, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            h, w = min(tile.shape[0], height - y), min(tile.shape[1], width - x)
            canvas[y : y + h, x : x + w] = tile[:h, :w]
            x += w
            row_h = max(row_h, h)
        y += row_h
    return canvas


def digit_members(
    size: int = 96, limit: int | None = None, classes: tuple[int, ...] | None = None
) -> dict[str, bytes]:
    """scikit-learn's digits as ``{"<label>/digit_<i>.png": png}``: upscaled, dark ink on white."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    members: dict[str, bytes] = {}
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        if classes is not None and label not in classes:
            continue
        if limit is not None and len(members) >= limit:
            break
        big = cv2.resize(
            (img * (255.0 / 16.0)).astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC
        )
        ok, png = cv2.imencode(".png", 255 - big)
        assert ok
        members[f"{label}/digit_{i:04d}.png"] = png.tobytes()
    return members


# The colour-photo class pack: a class per photo, the folder is the label.
PHOTO_CLASSES = {
    "cat": "chelsea.png",
    "cup": "coffee.png",
    "person": "astronaut.png",
    "flower": "flower.jpg",
}


def photo_class_members(
    per_class: int = 60, size: int = 128, seed: int = 0, classes: dict[str, str] = PHOTO_CLASSES
) -> dict[str, bytes]:
    """A user's own colour photos in class folders, ``{"<class>/<i>.jpg": jpeg}``: random crops
    (a third to all of the short side, anywhere, flipped or not) of one photo per class,
    ``size`` px, JPEG quality 90. As a phone's shots of four things would be: each class one
    scene's colours, no two crops alike."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    for label, name in classes.items():
        img = cv2.imdecode(np.frombuffer(sample_image(name), np.uint8), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        for i in range(per_class):
            side = int(rng.uniform(0.33, 1.0) * min(h, w))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = cv2.resize(
                img[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA
            )
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            ok, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            members[f"{label}/{label}_{i:03d}.jpg"] = jpg.tobytes()
    return members


def build_digits_pack(path: Path, size: int = 96) -> int:
    members = digit_members(size)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            _add(zf, name, data)
    return len(members)


def build_photos_pack(path: Path) -> int:
    coco = {"images": [], "annotations": [], "categories": []}
    cats: dict[str, int] = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, (name, package, category, box) in enumerate(PHOTOS, start=1):
            data = _package_file(package, name).read_bytes()
            member = f"{package}/{name}"
            _add(zf, member, data)
            cid = cats.setdefault(category, len(cats) + 1)
            coco["images"].append({"id": i, "file_name": member})
            coco["annotations"].append(
                {"id": i, "image_id": i, "category_id": cid, "bbox": list(box)}
            )
        coco["categories"] = [{"id": v, "name": k} for k, v in cats.items()]
        _add(zf, "annotations.json", json.dumps(coco, indent=1))
        _add(zf, "copies/china (1).jpg", _package_file("sklearn", "china.jpg").read_bytes())
        _add(zf, "__MACOSX/sklearn/._china.jpg", b"\x00\x05\x16\x07")
        _add(zf, "notes.txt", "photos from the scikit-learn and scikit-image sample data\n")
    return len(PHOTOS)


SHAPES = ("circle", "square", "triangle")


def _draw_shape(img: np.ndarray, kind: str, rng: np.random.Generator, box) -> None:
    """Draw a filled ``kind`` inside ``box`` (x, y, w, h; pixels x..x+w-1)."""
    x, y, w, h = box
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    if kind == "circle":
        cv2.ellipse(img, ((x + (w - 1) / 2, y + (h - 1) / 2), (w - 1, h - 1), 0), color, -1)
    elif kind == "square":
        cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, -1)
    else:
        pts = np.array([[x + (w - 1) // 2, y], [x, y + h - 1], [x + w - 1, y + h - 1]], np.int32)
        cv2.fillPoly(img, [pts], color)


def _iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def shape_members(n: int = 300, size: int = 160, seed: int = 0) -> tuple[dict[str, bytes], dict]:
    """A detection pack's members: ``n`` ``size`` px JPEG crops of the bundled photos
    (``images/shapes_<i>.jpg``), each with 1-4 shapes (``SHAPES``, 14-56 px, random colours,
    overlapping little) drawn on it, and ``annotations/instances_default.json`` (COCO, as CVAT
    exports) with each shape's box: exactly the pixels drawn. Same arguments, same bytes."""
    rng = np.random.default_rng(seed)
    ims = photos()
    members: dict[str, bytes] = {}
    coco: dict = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i + 1, "name": k} for i, k in enumerate(SHAPES)]
    for i in range(n):
        photo = ims[int(rng.integers(len(ims)))]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        y0 = int(rng.integers(0, photo.shape[0] - side + 1))
        x0 = int(rng.integers(0, photo.shape[1] - side + 1))
        img = cv2.resize(photo[y0 : y0 + side, x0 : x0 + side], (size, size), cv2.INTER_AREA)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, 5))):
            for _try in range(20):
                w = int(rng.integers(14, 57))
                h = int(np.clip(w * rng.uniform(0.75, 1.33), 14, 56))
                box = (int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)), w, h)
                if all(_iou(box, b) < 0.2 for b in boxes):
                    break
            else:
                continue
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            before = img.copy()
            _draw_shape(img, kind, rng, box)
            ys, xs = np.nonzero((img != before).any(axis=2))
            if len(xs) == 0:
                continue
            drawn = (
                int(xs.min()),
                int(ys.min()),
                int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1),
            )
            boxes.append(drawn)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": SHAPES.index(kind) + 1,
                    "bbox": list(drawn),
                    "area": drawn[2] * drawn[3],
                    "iscrowd": 0,
                }
            )
        name = f"images/shapes_{i:04d}.jpg"
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        members[name] = jpg.tobytes()
        coco["images"].append(
            {"id": i + 1, "file_name": name.split("/")[-1], "width": size, "height": size}
        )
    members["annotations/instances_default.json"] = json.dumps(coco).encode()
    return members, coco


def build_shapes_pack(path: Path, n: int = 300, seed: int = 0) -> int:
    members, _ = shape_members(n, seed=seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            _add(zf, name, data)
    return n


def build_demo_packs(out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    packs = {
        "digits": out_dir / "digits.zip",
        "photos": out_dir / "photos.zip",
        "shapes": out_dir / "shapes.zip",
    }
    build_digits_pack(packs["digits"])
    build_photos_pack(packs["photos"])
    build_shapes_pack(packs["shapes"])
    return packs


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip of ``members`` in memory (tests and examples)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            _add(zf, name, data)
    return buf.getvalue()

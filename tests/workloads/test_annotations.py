"""Labels and boxes as real exports lay them out (CVAT and Roboflow COCO, Ultralytics YOLO,
Pascal VOC, labels.csv written by hand), built from bundled photos: exact boxes in the
original's pixels, labels, and a recorded reason for everything dropped."""

import json

import cv2
import numpy as np
import pytest

from cvgraph.demo_packs import sample_image
from workloads.ingest import ingest_pack
from workloads.lake import read_parquet
from workloads.layout import pack_keys


def size(data: bytes) -> tuple[int, int]:
    h, w = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
    return w, h


def ingest(lake, put_pack, name: str, members: dict[str, bytes]):
    result = ingest_pack(lake, name, put_pack(name, members))
    rows = {r["member"]: r for r in read_parquet(lake, pack_keys(name)["manifest"]).to_pylist()}
    rejects = {(r["member"], r["reason"]) for r in result.rejected}
    return result, rows, rejects


def box(category: str, x, y, w, h, iscrowd: bool = False) -> dict:
    return {
        "category": category,
        "x": float(x),
        "y": float(y),
        "w": float(w),
        "h": float(h),
        "iscrowd": iscrowd,
    }


def test_coco_where_cvat_and_roboflow_write_it(lake, put_pack):
    cat, cup = sample_image("chelsea.png"), sample_image("coffee.png")
    cvat = {  # annotations/instances_default.json; file_name relative to images/
        "images": [
            {"id": 1, "file_name": "chelsea.png", "width": 451, "height": 300},
            {"id": 2, "file_name": "gone.png"},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "ear"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [60, 10, 300, 290]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [80.5, 20.25, 40, 30]},
            {"id": 12, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]},
            {"id": 13, "image_id": 1, "category_id": 2, "bbox": [400, 250, 90, 90]},
            {"id": 14, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},
        ],
    }
    roboflow = {  # train/_annotations.coco.json beside the images
        "images": [{"id": 0, "file_name": "coffee.png"}],
        "categories": [{"id": 0, "name": "cup"}],
        "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "bbox": [80, 20, 460, 360]}],
    }
    result, rows, rejects = ingest(
        lake,
        put_pack,
        "coco",
        {
            "images/chelsea.png": cat,
            "annotations/instances_default.json": json.dumps(cvat).encode(),
            "train/coffee.png": cup,
            "train/_annotations.coco.json": json.dumps(roboflow).encode(),
            "notes.json": b'{"not": "coco"}',
        },
    )
    w, h = size(cat)
    assert rows["images/chelsea.png"]["boxes"] == [
        box("cat", 60, 10, 300, 290),
        box("ear", 80.5, 20.25, 40, 30),
    ]
    assert rows["images/chelsea.png"]["label"] == "cat"  # most frequent (tie: alphabetical)
    assert rows["train/coffee.png"]["boxes"] == [box("cup", 80, 20, 460, 360)]
    assert rows["train/coffee.png"]["label"] == "cup"  # not the layout folder `train`
    src = "annotations/instances_default.json"
    assert rejects == {
        (src, "annotation id 12: unknown category_id 9"),
        (
            src,
            f"image 'images/chelsea.png': annotation id 13: ear box [400, 250, 90, 90] (x, y, w, h) is outside the {w}x{h} image",
        ),
        (src, "image 'gone.png' is not in the pack: its 1 box(es) dropped"),
        ("notes.json", "not an image: extension .json"),
    }
    assert result.boxes == {"accepted": 3, "rejected": 3}
    # through the index to the `objects` table: one row per box, in the original's pixels
    assert objects_rows(lake) == [
        ("cat", 60.0, 10.0, 300.0, 290.0, "cat"),
        ("ear", 80.5, 20.25, 40.0, 30.0, "cat"),
        ("cup", 80.0, 20.0, 460.0, 360.0, "cup"),
    ]


def objects_rows(lake) -> list[tuple]:
    """The `objects` table's rows (category, x, y, w, h, image label), by image then box."""
    from workloads.image_params import ImageParams
    from workloads.index import build_raw_index
    from workloads.kernels import EdgeParams, ResizeParams
    from workloads.tables import read_prefix_table, write_prefix_tables
    from workloads.versions import HASH_PREFIXES

    params = ImageParams(ResizeParams(size=16), EdgeParams())
    build_raw_index(lake, list(HASH_PREFIXES))
    rows = []
    for p in HASH_PREFIXES:
        write_prefix_tables(lake, p, params)
        rows += read_prefix_table(lake, "objects", p).to_pylist()
    key = lambda r: (r["label"] != "cat", r["box"])  # chelsea's boxes first
    return [
        (r["category"], r["x"], r["y"], r["w"], r["h"], r["label"]) for r in sorted(rows, key=key)
    ]


def yolo_line(cls: int, b: tuple, w: int, h: int) -> str:
    x, y, bw, bh = b
    return f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"


def test_ultralytics_yolo_with_data_yaml(lake, put_pack):
    cat, cup = sample_image("chelsea.png"), sample_image("coffee.png")
    (cw, ch), (uw, uh) = size(cat), size(cup)
    cat_box, cup_box = (60, 10, 300, 290), (80, 20, 460, 360)
    result, rows, rejects = ingest(
        lake,
        put_pack,
        "yolo",
        {
            "data.yaml": b"path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: cup\n",
            "images/train/chelsea.png": cat,
            "labels/train/chelsea.txt": (yolo_line(0, cat_box, cw, ch) + "\n").encode(),
            "images/val/coffee.png": cup,
            "labels/val/coffee.txt": (
                yolo_line(1, cup_box, uw, uh) + "\n5 0.5 0.5 0.1 0.1\n"
            ).encode(),
            "labels/val/ghost.txt": b"0 0.5 0.5 0.2 0.2\n",
            "README.txt": b"exported by hand",
        },
    )
    for member, b, name in (
        ("images/train/chelsea.png", cat_box, "cat"),
        ("images/val/coffee.png", cup_box, "cup"),
    ):
        (got,) = rows[member]["boxes"]
        assert got["category"] == name == rows[member]["label"]  # never `images` or `train`
        assert [got[k] for k in "xywh"] == pytest.approx(b, abs=0.01)
    assert rejects == {
        ("labels/val/coffee.txt", "line 2: unknown class id 5 (names has 2)"),
        ("labels/val/ghost.txt", "YOLO labels of an image that is not in the pack"),
        ("README.txt", "not an image: extension .txt"),
    }
    assert result.boxes == {"accepted": 2, "rejected": 1}


def voc_xml(filename: str, objects: list[tuple]) -> bytes:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for n, x0, y0, x1, y1 in objects
    )
    return f"<annotation><folder>VOC2012</folder><filename>{filename}</filename>{objs}</annotation>".encode()


def test_pascal_voc(lake, put_pack):
    result, rows, rejects = ingest(
        lake,
        put_pack,
        "voc",
        {
            "VOC2012/JPEGImages/china.jpg": sample_image("china.jpg"),
            "VOC2012/Annotations/china.xml": voc_xml(
                "china.jpg",
                [
                    ("building", 140, 40, 500, 340),
                    ("tree", 0, 200, 90, 420),
                    ("tree", 500, 250, 640, 420),
                ],
            ),
            "VOC2012/Annotations/broken.xml": b"<annotation><filename>x.jpg",
        },
    )
    row = rows["VOC2012/JPEGImages/china.jpg"]
    assert row["boxes"] == [
        box("building", 140, 40, 360, 300),
        box("tree", 0, 200, 90, 220),
        box("tree", 500, 250, 140, 170),
    ]
    assert row["label"] == "tree"  # the most frequent category; VOC2012/JPEGImages are no class
    ((member, reason),) = rejects
    assert member == "VOC2012/Annotations/broken.xml"
    assert reason.startswith("unreadable labels/annotations: ParseError: ")
    assert result.boxes == {"accepted": 3, "rejected": 0}


def test_class_labels_as_packs_carry_them(lake, put_pack):
    png = sample_image("chelsea.png")
    other = sample_image("coffee.png")
    third = sample_image("astronaut.png")
    result, rows, rejects = ingest(
        lake,
        put_pack,
        "textures",
        {  # zip -r textures.zip textures/: the wrapper is no class, the folder below it is
            "textures/scene/a.png": png,
            "textures/scene/img/0001.PNG": other,
            "textures/wood/b.png": third,
            "textures/labels.csv": b"member,label\r\n./scene/img/0001.png,mug\r\nscene\\missing.png,ghost\r\n",
        },
    )
    assert {m: r["label"] for m, r in rows.items()} == {
        "textures/scene/a.png": "scene",
        "textures/scene/img/0001.PNG": "mug",  # ./ and the extension's case do not hide it
        "textures/wood/b.png": "wood",
    }
    assert rejects == {
        ("textures/labels.csv", "a row names no image in the pack: 'scene\\\\missing.png'")
    }
    assert result.labels == {"mug": 1, "scene": 1, "wood": 1}
    # a layout folder is never a class; one folder alone holding every image is the class
    _, rows, _ = ingest(lake, put_pack, "split", {"train/cat/a.png": png, "valid/cup/b.png": other})
    assert {m: r["label"] for m, r in rows.items()} == {
        "train/cat/a.png": "cat",
        "valid/cup/b.png": "cup",
    }
    _, rows, _ = ingest(lake, put_pack, "single", {"cats/a.png": png, "cats/b.png": other})
    assert {r["label"] for r in rows.values()} == {"cats"}


def test_an_image_two_packs_label_differently_keeps_one_label_and_says_so(lake, put_pack):
    from workloads.index import build_raw_index, read_index
    from workloads.versions import HASH_PREFIXES, sha256_hex

    cat = sample_image("chelsea.png")
    sha = sha256_hex(cat)
    ingest(
        lake,
        put_pack,
        "first",
        {"cat/chelsea.png": cat, "cup/coffee.png": sample_image("coffee.png")},
    )
    # while "first" waits for its index, and after: the same conflict, the same label kept
    second, _, _ = ingest(
        lake,
        put_pack,
        "second",
        {
            "x/chelsea.png": cat,
            "y/coffee.png": sample_image("coffee.png"),
            "labels.csv": b"member,label\nx/chelsea.png,kitten\n",
        },
    )
    conflict = {
        "sha256": sha,
        "member": "x/chelsea.png",
        "labels": {"first/cat/chelsea.png": "cat", "second/x/chelsea.png": "kitten"},
        "kept": "kitten",  # an explicit label beats a folder name
    }
    assert second.label_conflicts == [
        conflict,
        {
            "sha256": sha256_hex(sample_image("coffee.png")),
            "member": "y/coffee.png",
            "labels": {"first/cup/coffee.png": "cup", "second/y/coffee.png": "y"},
            "kept": "cup",  # two folder names: the first pack's
        },
    ]
    build_raw_index(lake, list(HASH_PREFIXES))
    row = read_index(lake, sha[:2]).to_pylist()
    assert {r["sha256"]: r["label"] for r in row}[sha] == "kitten"
    third, _, _ = ingest(lake, put_pack, "third", {"dog/chelsea.png": cat})
    assert third.label_conflicts == [
        {
            "sha256": sha,
            "member": "dog/chelsea.png",
            "labels": {"second/x/chelsea.png": "kitten", "third/dog/chelsea.png": "dog"},
            "kept": "kitten",
        }
    ]

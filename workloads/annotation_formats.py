"""What each annotation format says, parsed from one file's text: COCO json (instances; its
keypoints, captions, stuff and panoptic files told apart), Pascal VOC xml, YOLO label txt (with
its class names from ``data.yaml``, ``classes.txt`` or Darknet's ``obj.names``; Darknet's
``obj.data`` and its ``train.txt`` image lists), and ``labels.csv``. Which member names an image,
and whether a box fits it, is decided by ``workloads.annotations``; here a format is told by its
content, and each piece that cannot be used is a problem with its place in the file, the rest of
the file still counts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import yaml


class NotThisFormat(Exception):
    """The file parses, but is not an annotation file of this format (kept for the image loop to
    reject as any other non-image member)."""


@dataclass(frozen=True)
class Box:
    """A box as the file gives it: pixels (x, y, w, h from the top-left corner) or, for YOLO,
    fractions of the image (``normalised``: x, y the centre)."""

    category: str
    x: float
    y: float
    w: float
    h: float
    normalised: bool = False
    where: str = ""  # its place in the file, for a reason ("annotation id 7", "line 3")
    iscrowd: bool = False  # COCO ``iscrowd: 1``: a crowd's region, which COCO's evaluation ignores


@dataclass
class Parsed:
    """One file's boxes per image name (as the file writes it), explicit labels, and problems;
    ``kind``: what the file is (COCO: instances, keypoints, captions, stuff, panoptic), and
    ``skipped``: why it gives no boxes at all, when it is an annotation file of another kind."""

    boxes: dict[str, list[Box]]
    labels: dict[str, str]
    problems: list[str]  # each a box dropped, unless ``labels_only``
    labels_only: bool = False
    kind: str = ""
    skipped: str | None = None
    masks: list[str] = field(default_factory=list)  # mask PNGs it names (COCO panoptic)


def _numbers(values, n: int, where: str) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{where}: expected {n} finite numbers, got {list(values)!r}")
    return out


# COCO's annotation files that give no object boxes: recorded with why, their data not read.
COCO_SKIPPED = {
    "captions": "COCO captions: no boxes; skipped",
    "stuff": "COCO stuff segmentation: regions, not object boxes; skipped",
    "panoptic": "COCO panoptic segmentation: skipped",
}
# COCO-Stuff's categories: ids 92..182 and 183 "other" (its files carry the instances' fields)
COCO_STUFF_IDS = range(92, 184)


def coco_kind(coco: dict, filename: str) -> str:
    """Which of COCO's annotation files ``coco`` is (``filename``: its member name): ``panoptic``
    (segments_info per image), ``captions`` (captions, no boxes), ``keypoints`` (the instances'
    person boxes again, with keypoints), ``stuff`` (``stuff_*.json``, or COCO-Stuff's categories
    only: regions of grass or sky, which have the instances' fields), else ``instances``."""
    anns = [a for a in coco.get("annotations") or [] if isinstance(a, dict)]
    cats = [c for c in coco.get("categories") or [] if isinstance(c, dict)]
    if any("segments_info" in a for a in anns) or any("isthing" in c for c in cats):
        return "panoptic"
    if any("caption" in a for a in anns) and not any("bbox" in a for a in anns):
        return "captions"
    if any("keypoints" in a for a in anns) or any("keypoints" in c for c in cats):
        return "keypoints"
    stuff_cats = (
        bool(cats)
        and all(c.get("id") in COCO_STUFF_IDS for c in cats)
        and any(c.get("id") == 183 and c.get("name") == "other" for c in cats)
    )
    if posixpath.basename(filename.lower()).startswith("stuff_") or stuff_cats:
        return "stuff"
    return "instances"


def parse_coco(text: str, filename: str = "") -> Parsed:
    """COCO instances: ``images`` (id, file_name), ``categories`` (id, name), ``annotations``
    (image_id, category_id, bbox [x, y, w, h] in pixels, iscrowd). Keypoints files give the same
    boxes (``kind`` says so); captions, stuff and panoptic files give none (``skipped``)."""
    coco = json.loads(text)
    if not (
        isinstance(coco, dict)
        and isinstance(coco.get("images"), list)
        and isinstance(coco.get("annotations", []), list)
    ):
        raise NotThisFormat("a JSON without COCO images and annotations")
    kind = coco_kind(coco, filename)
    if kind in COCO_SKIPPED:
        masks = [
            str(a["file_name"])
            for a in coco.get("annotations", [])
            if kind == "panoptic" and isinstance(a, dict) and a.get("file_name")
        ]
        return Parsed({}, {}, [], kind=kind, skipped=COCO_SKIPPED[kind], masks=masks)
    cats = {c["id"]: str(c["name"]) for c in coco.get("categories", [])}
    files = {im["id"]: str(im["file_name"]) for im in coco["images"]}
    out = Parsed({name: [] for name in files.values()}, {}, [], kind=kind)
    for ann in coco.get("annotations", []):
        where = f"annotation id {ann.get('id')}"
        if ann.get("image_id") not in files:
            out.problems.append(f"{where}: unknown image_id {ann.get('image_id')!r}")
        elif ann.get("category_id") not in cats:
            out.problems.append(f"{where}: unknown category_id {ann.get('category_id')!r}")
        else:
            try:
                x, y, w, h = _numbers(ann.get("bbox") or [], 4, where)
            except (TypeError, ValueError) as e:
                out.problems.append(f"{where}: bad bbox ({e})")
                continue
            crowd = ann.get("iscrowd", 0) in (1, True)
            box = Box(cats[ann["category_id"]], x, y, w, h, where=where, iscrowd=crowd)
            out.boxes[files[ann["image_id"]]].append(box)
    return out


def parse_voc(text: str) -> Parsed:
    """Pascal VOC: ``<annotation><filename>`` with ``<object><name>`` and ``<bndbox>`` (xmin,
    ymin, xmax, ymax in pixels; x = xmin, w = xmax - xmin, as torchvision reads them)."""
    root = ET.fromstring(text)  # expat: entity expansion is bounded; the file's size is limited
    if root.tag != "annotation" or root.find("filename") is None:
        raise NotThisFormat("an XML that is not a Pascal VOC annotation")
    name = (root.findtext("filename") or "").strip()
    out = Parsed({name: []}, {}, [])
    for i, obj in enumerate(root.iter("object"), start=1):
        where = f"object {i}"
        bb = obj.find("bndbox")
        category = (obj.findtext("name") or "").strip()
        try:
            if bb is None or not category:
                raise ValueError("no name or bndbox")
            x0, y0, x1, y1 = _numbers(
                [bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")], 4, where
            )
        except (TypeError, ValueError) as e:
            out.problems.append(f"{where}: {e}")
            continue
        out.boxes[name].append(Box(category, x0, y0, x1 - x0, y1 - y0, where=where))
    return out


def parse_yolo_names(text: str, yaml_file: bool) -> list[str]:
    """Class names by id: ``names`` of a ``data.yaml`` (a list, or a map of id to name), or the
    lines of a ``classes.txt`` or Darknet's ``obj.names``."""
    if not yaml_file:
        return [line.strip() for line in text.splitlines() if line.strip()]
    doc = yaml.safe_load(text)
    names = doc.get("names") if isinstance(doc, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"names ids are not 0..{len(names) - 1}: {sorted(names)}")
        return [str(names[i]) for i in range(len(names))]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise NotThisFormat("a YAML without YOLO class names")


def parse_darknet_data(text: str) -> dict[str, str]:
    """Darknet's ``obj.data``: ``key = value`` lines (``classes``, ``train``, ``valid``, ``names``,
    ``backup``), as CVAT's YOLO 1.1 export writes it."""
    conf = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip():
            conf[key.strip().lower()] = value.strip()
        elif line.strip() and not line.strip().startswith("#"):
            raise NotThisFormat("not Darknet's key = value lines")
    if not {"classes", "names"} & set(conf):
        raise NotThisFormat("a .data file without Darknet's classes or names")
    return conf


def parse_image_list(text: str, image_exts) -> list[str]:
    """Darknet's ``train.txt``: one image path a line (``data/obj_train_data/a.jpg``)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not all(posixpath.splitext(n.lower())[1] in image_exts for n in lines):
        raise NotThisFormat("not a list of image paths")
    return lines


def parse_yolo_labels(text: str, image: str, names: list[str]) -> Parsed:
    """One image's YOLO label file: ``class cx cy w h`` per line, fractions of the image."""
    out = Parsed({image: []}, {}, [])
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {n}"
        fields = line.split()
        try:
            cls = int(fields[0])
            cx, cy, w, h = _numbers(fields[1:], 4, where)
        except (IndexError, ValueError) as e:
            out.problems.append(f"{where}: expected `class cx cy w h` ({e})")
            continue
        if not 0 <= cls < len(names):
            out.problems.append(f"{where}: unknown class id {cls} (names has {len(names)})")
            continue
        out.boxes[image].append(Box(names[cls], cx, cy, w, h, normalised=True, where=where))
    return out


def parse_labels_csv(text: str) -> Parsed:
    """``member,label`` rows; ``member`` as the file writes it (normalised when matched)."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"member", "label"} <= set(reader.fieldnames):
        raise ValueError(f"labels.csv needs a header `member,label`, not {reader.fieldnames!r}")
    out = Parsed({}, {}, [], labels_only=True)
    for n, row in enumerate(reader, start=2):
        member, label = (row.get("member") or "").strip(), (row.get("label") or "").strip()
        if not member or not label:
            out.problems.append(f"row {n}: empty member or label")
        else:
            out.labels[member] = label
    return out

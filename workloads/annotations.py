"""What labels and boxes a pack carries, as users' exports lay them out.

Annotation files are told by content, wherever they are in the zip: any ``*.json`` that is COCO
instances (CVAT's ``annotations/instances_default.json``, Roboflow's ``_annotations.coco.json``),
Pascal VOC ``*.xml``, Ultralytics YOLO ``labels/**/*.txt`` with ``data.yaml`` or ``classes.txt``
naming the classes, and ``labels.csv`` (member,label). A file names its images relative to
itself, to the images folder beside it, or by a basename unique in the pack. Otherwise an
image's label is its folder's name, where a layout folder (``images/``, ``train/``,
``JPEGImages/``, ...) and a single folder wrapping the whole pack are not classes.

Boxes are kept in the original's pixels (x, y, w, h). Nothing is dropped without a reason in the
pack's rejects: an annotation naming an image not in the pack, an unknown class, a box outside
its image, a file that does not parse. An annotation file is read under the same limits as an
image (a json can be a bomb too), and a bad one loses its labels, not the images.
"""

from __future__ import annotations

import io
import posixpath
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable

import pyarrow as pa

from workloads.annotation_formats import (
    Box,
    NotThisFormat,
    Parsed,
    parse_coco,
    parse_labels_csv,
    parse_voc,
    parse_yolo_labels,
    parse_yolo_names,
)
from workloads.member_names import IMAGE_EXTS, is_junk, name_parts, unsafe_reason
from workloads.pack_zip import BadMember, IngestLimits, copy_member, data_reason, file_type_reason

LABELS_FILE = "labels.csv"
YOLO_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "classes.txt", "obj.names")
# Folders an export's layout makes, never a class (compared lower-cased)
LAYOUT_DIRS = frozenset(
    {"images", "imgs", "jpegimages", "train", "val", "valid", "validation", "test"}
    | {"voc2007", "voc2012", "vocdevkit"}
)
BOX_TYPE = pa.struct(
    [
        ("category", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("w", pa.float64()),
        ("h", pa.float64()),
    ]
)
Reject = Callable[[str, str], None]
EDGE_TOLERANCE = 1.0  # pixels a box may cross the image's edge by (exporters round); clipped


def _norm(name: str) -> str:
    """A member path as matched: '/' separators, no './', the extension lower-cased."""
    path = "/".join(name_parts(name))
    stem, ext = posixpath.splitext(path)
    return stem + ext.lower()


class Members:
    """The pack's image members, found by the paths annotation files write."""

    def __init__(self, images: list[str]):
        self.exact = {_norm(m): m for m in images}
        self.by_base: dict[str, list[str]] = defaultdict(list)
        self.by_stem: dict[str, str] = {}
        for m in images:
            self.by_base[posixpath.basename(_norm(m))].append(m)
            self.by_stem[posixpath.splitext(_norm(m))[0]] = m

    def find(self, name: str, bases: list[str]) -> str | None:
        """The member ``name`` means, written in a file whose relative bases are ``bases``: the
        first base it is under, else the pack root, else a basename no other image has."""
        name = _norm(name)
        for base in bases:
            joined = posixpath.normpath(posixpath.join(base, name)) if base else name
            if joined in self.exact:
                return self.exact[joined]
        if name in self.exact:
            return self.exact[name]
        same = self.by_base.get(posixpath.basename(name), [])
        return same[0] if len(same) == 1 else None


def _bases(member: str, *beside: str) -> list[str]:
    """The folder of an annotation file, then each ``beside`` folder in it and next to it."""
    d = posixpath.dirname(_norm(member))
    up = posixpath.dirname(d)
    return [
        d,
        *(posixpath.join(d, b) for b in beside),
        *(posixpath.join(up, b) for b in beside),
        up,
    ]


class Annotations:
    """What the pack's annotation files say, per image member; ``consumed``: the members that
    are annotation files (not images, not rejected as non-images)."""

    def __init__(self, images: list[str]):
        self.members = Members(images)
        self.labels: dict[str, str] = {}
        self.boxes: dict[str, list[tuple[Box, str]]] = defaultdict(list)
        self.consumed: set[str] = set()
        self.accepted = self.rejected = 0
        # One top folder holding every image, with class folders below it, is the pack's
        # wrapper (``zip -r textures.zip textures/``), not a class; alone, it is the class.
        depths = [len(name_parts(m)) for m in images]
        tops = {name_parts(m)[0] for m in images if len(name_parts(m)) > 1}
        wrapped = images and min(depths) > 1 and len(tops) == 1 and max(depths) > 2
        self.wrapper = next(iter(tops)) if wrapped else None

    def add(self, source: str, parsed: Parsed, bases: list[str], reject: Reject) -> None:
        """Merge one file's boxes and labels, rejecting what names no image of the pack."""
        for problem in parsed.problems:
            reject(source, problem)
        self.rejected += 0 if parsed.labels_only else len(parsed.problems)
        for name, boxes in parsed.boxes.items():
            member = self.members.find(name, bases)
            if member is None:
                if boxes:
                    reject(
                        source,
                        f"image {name!r} is not in the pack: its {len(boxes)} box(es) dropped",
                    )
                    self.rejected += len(boxes)
                continue
            self.boxes[member].extend((b, source) for b in boxes)
        for name, label in parsed.labels.items():
            member = self.members.find(name, bases)
            if member is None:
                reject(source, f"a row names no image in the pack: {name!r}")
            else:
                self.labels[member] = label

    def image(
        self, member: str, width: int, height: int, reject: Reject
    ) -> tuple[str | None, str | None, list[dict]]:
        """(label, its source, boxes in pixels) of an image member of ``width`` x ``height``.
        The label: labels.csv's, else the most frequent category of its boxes (ties:
        alphabetical), else its folder's."""
        boxes, formats = [], []
        for box, source in self.boxes.get(member, []):
            fitted = _fit(box, width, height)
            if isinstance(fitted, str):
                reject(source, f"image {member!r}: {box.where}: {box.category} box {fitted}")
                self.rejected += 1
                continue
            boxes.append(fitted)
            formats.append(_format_of(box, source))
        self.accepted += len(boxes)
        if member in self.labels:
            return self.labels[member], LABELS_FILE, boxes
        if boxes:
            counts = Counter(b["category"] for b in boxes)
            return min(counts, key=lambda c: (-counts[c], c)), formats[0], boxes
        return (*self.folder_label(member), boxes)

    def folder_label(self, member: str) -> tuple[str | None, str | None]:
        folders = name_parts(member)[:-1]
        if self.wrapper and folders and folders[0] == self.wrapper:
            folders = folders[1:]
        folders = [f for f in folders if f.lower() not in LAYOUT_DIRS]
        # NFC: the same folder zipped on macOS (NFD names) and elsewhere (NFC) is one label.
        return (unicodedata.normalize("NFC", folders[0]), "folder") if folders else (None, None)


def _format_of(box: Box, source: str) -> str:
    if box.normalised:
        return "yolo"
    return "voc" if source.lower().endswith(".xml") else "coco"


def _fit(box: Box, width: int, height: int) -> dict | str:
    """The box in pixels (x, y, w, h), clipped to the image by at most ``EDGE_TOLERANCE``; or
    why it is not a box of this image."""
    x, y, w, h = box.x, box.y, box.w, box.h
    if box.normalised:
        x, y, w, h = (x - w / 2) * width, (y - h / 2) * height, w * width, h * height
    if w <= 0 or h <= 0:
        return f"[{box.x:g}, {box.y:g}, {box.w:g}, {box.h:g}] has no area"
    t = EDGE_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"[{x:g}, {y:g}, {w:g}, {h:g}] (x, y, w, h) is outside the {width}x{height} image"
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    return {"category": box.category, "x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0}


def read_annotations(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: IngestLimits, reject: Reject
) -> Annotations:
    """Every annotation file of the pack, told by content; a file that cannot be read is
    ``reject``-ed with its reason (and still consumed: it is no image)."""
    usable = [
        i
        for i in infos
        if not i.is_dir() and not is_junk(i.filename) and not unsafe_reason(i.filename)
    ]
    by_ext: dict[str, list[zipfile.ZipInfo]] = defaultdict(list)
    for i in usable:
        by_ext[posixpath.splitext(i.filename.lower())[1]].append(i)
    ann = Annotations([i.filename for e in IMAGE_EXTS for i in by_ext[e]])

    def read(info: zipfile.ZipInfo, parse: Callable[[str], Parsed], bases: list[str]) -> None:
        try:
            parsed = parse(_read_text(zf, info, limits))
        except NotThisFormat:
            return
        except BadMember as e:
            reject(info.filename, f"unreadable labels/annotations: {e}")
        except Exception as e:  # any parse error is the file's reason
            reject(info.filename, f"unreadable labels/annotations: {type(e).__name__}: {e}")
        else:
            ann.add(info.filename, parsed, bases, reject)
        ann.consumed.add(info.filename)

    for info in by_ext[".csv"]:
        if posixpath.basename(info.filename.lower()) == LABELS_FILE:
            read(info, parse_labels_csv, _bases(info.filename))
    for info in by_ext[".json"]:
        read(info, parse_coco, _bases(info.filename, "images"))
    for info in by_ext[".xml"]:
        read(info, parse_voc, _bases(info.filename, "JPEGImages", "images"))
    _read_yolo(zf, ann, [*by_ext[".txt"], *by_ext[".yaml"], *by_ext[".yml"]], limits, read, reject)
    return ann


def _read_yolo(zf, ann: Annotations, infos, limits: IngestLimits, read, reject: Reject) -> None:
    """YOLO label files: each ``labels/.../<stem>.txt`` (or a txt beside its image) is one image's
    boxes, once a names file (``data.yaml``, ``classes.txt``) gives the classes."""
    names: list[str] | None = None
    for info in sorted(infos, key=lambda i: len(name_parts(i.filename))):  # the shallowest
        base = posixpath.basename(info.filename.lower())
        if base not in YOLO_NAMES or names is not None:
            continue
        try:
            text = _read_text(zf, info, limits)
            names = parse_yolo_names(text, yaml_file=base.endswith((".yaml", ".yml")))
        except NotThisFormat:
            continue
        except Exception as e:  # any parse error is the file's reason
            reject(info.filename, f"unreadable labels/annotations: {type(e).__name__}: {e}")
        ann.consumed.add(info.filename)
    if names is None:
        return
    for info in infos:
        if info.filename in ann.consumed or not info.filename.lower().endswith(".txt"):
            continue
        parts = name_parts(_norm(info.filename))
        stem = posixpath.splitext("/".join(parts))[0]
        in_labels = "labels" in parts[:-1]
        swapped = stem
        if in_labels:  # Ultralytics: the last labels/ of the path is images/ for the image
            i = len(parts) - 2 - parts[:-1][::-1].index("labels")
            swapped = "/".join([*parts[:i], "images", *parts[i + 1 :]])
            swapped = posixpath.splitext(swapped)[0]
        image = ann.members.by_stem.get(swapped) or ann.members.by_stem.get(stem)
        if image is None:
            if in_labels:
                reject(info.filename, "YOLO labels of an image that is not in the pack")
                ann.consumed.add(info.filename)
            continue
        read(info, lambda text, image=image: parse_yolo_labels(text, image, names), [""])


def _read_text(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IngestLimits) -> str:
    if reason := file_type_reason(info) or data_reason(info, limits):
        raise BadMember(reason)
    buf = io.BytesIO()
    copy_member(zf, info, buf)
    return buf.getvalue().decode("utf-8-sig")  # Excel writes a BOM

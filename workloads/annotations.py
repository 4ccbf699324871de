"""What labels and boxes a pack carries, as users' exports lay them out.

Annotation files are told by content, wherever they are in the zip:

- COCO json: instances boxes (CVAT's ``annotations/instances_default.json``, Roboflow's
  ``_annotations.coco.json``, the COCO download's ``annotations/instances_val2017.json``), with
  ``iscrowd: 1`` boxes marked as crowd. The rest of a COCO ``annotations/`` folder is told apart
  and gives no boxes: ``person_keypoints_*`` repeats the instances' person boxes (read once: a box
  the instances file gave is not added again), ``captions_*``, ``stuff_*`` (regions of grass or
  sky) and ``panoptic_*`` are skipped with their reason, and the panoptic mask PNGs are no images.
- Pascal VOC ``*.xml``; one whose ``<filename>`` is not in the pack is paired, as torchvision and
  mmdetection do, with the image of the xml's stem (its folder, then ``JPEGImages/`` or
  ``images/`` beside it, then the one image of the pack with that stem), and the pairing noted.
- YOLO label ``*.txt`` (``labels/**`` for ``images/**``, or beside its image), once a names file
  gives the classes: Ultralytics' ``data.yaml``, ``classes.txt``, or Darknet's ``obj.names``
  (CVAT's YOLO 1.1: ``obj.names``, ``obj.data``, ``obj_train_data/`` with each image beside its
  txt, ``train.txt`` listing the images); ``obj.data`` and the image lists are read, not images.
- ``labels.csv`` (member,label).

A file names its images relative to itself, to the images folder beside it, or by a basename
unique in the pack. PNGs under an ``annotations`` folder (or VOC's ``SegmentationClass`` /
``SegmentationObject``) are segmentation masks, not images. Otherwise an image's label is its
folder's name, where a layout folder (``images/``, ``train/``, ``val2017/``, ``JPEGImages/``,
``obj_train_data/``, ...) and a single folder wrapping the whole pack are not classes.

Boxes are kept in the original's pixels (x, y, w, h) with ``iscrowd``. An image's label from its
boxes is their most frequent category, counting only non-crowd boxes (a crowd region does not
decide it) unless it has crowd boxes alone. Nothing is dropped without a reason in the pack's
rejects: an annotation naming an image not in the pack, an unknown class, a box outside its
image, a file that does not parse, a file of a kind that gives no boxes. An annotation file is
read under the same limits as an image (a json can be a bomb too), and a bad one loses its
labels, not the images.
"""

from __future__ import annotations

import functools
import io
import posixpath
import re
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
    parse_darknet_data,
    parse_image_list,
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
# ...and by pattern: COCO's train2017/, val2014/; CVAT YOLO 1.1's obj_train_data/
LAYOUT_PATTERN = re.compile(r"(train|val|test)20\d\d|obj_\w*_data", re.IGNORECASE)
# PNGs under these folders (compared lower-cased) are segmentation masks, not images
MASK_DIRS = frozenset({"annotations", "segmentationclass", "segmentationobject"})
BOX_TYPE = pa.struct(
    [
        ("category", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("w", pa.float64()),
        ("h", pa.float64()),
        ("iscrowd", pa.bool_()),  # COCO iscrowd=1; False for every other format
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
        self.by_base_stem: dict[str, list[str]] = defaultdict(list)
        self.by_stem: dict[str, str] = {}
        for m in images:
            stem = posixpath.splitext(_norm(m))[0]
            self.by_base[posixpath.basename(_norm(m))].append(m)
            self.by_base_stem[posixpath.basename(stem)].append(m)
            self.by_stem[stem] = m

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

    def find_stem(self, stem: str, folders: list[str]) -> str | None:
        """The image named ``stem`` (any extension) in the first of ``folders`` that has one, else
        the one image of the pack with that stem."""
        for folder in folders:
            if found := self.by_stem.get(posixpath.join(folder, stem) if folder else stem):
                return found
        same = self.by_base_stem.get(stem, [])
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


def _stem(member: str) -> str:
    return posixpath.splitext(posixpath.basename(_norm(member)))[0]


class Annotations:
    """What the pack's annotation files say, per image member; ``consumed``: the members that
    are annotation files (not images, not rejected as non-images)."""

    def __init__(self, images: list[str], consumed: set[str] | None = None):
        self.members = Members(images)
        self.labels: dict[str, str] = {}
        self.boxes: dict[str, list[tuple[Box, str]]] = defaultdict(list)
        self.consumed: set[str] = set() if consumed is None else consumed
        self.accepted = self.rejected = 0
        # The COCO instances' boxes as (member, box) -> the file: a keypoints file repeats them
        self.instances: dict[tuple, str] = {}
        # One top folder holding every image, with class folders below it, is the pack's
        # wrapper (``zip -r textures.zip textures/``), not a class; alone, it is the class.
        depths = [len(name_parts(m)) for m in images]
        tops = {name_parts(m)[0] for m in images if len(name_parts(m)) > 1}
        wrapped = images and min(depths) > 1 and len(tops) == 1 and max(depths) > 2
        self.wrapper = next(iter(tops)) if wrapped else None

    def add(
        self,
        source: str,
        parsed: Parsed,
        bases: list[str],
        reject: Reject,
        stem_folders: list[str] | None = None,
    ) -> None:
        """Merge one file's boxes and labels, rejecting what names no image of the pack.
        ``stem_folders``: where an image not in the pack is looked for by the file's stem (VOC)."""
        for problem in parsed.problems:
            reject(source, problem)
        self.rejected += 0 if parsed.labels_only else len(parsed.problems)
        repeated: Counter[str] = Counter()
        for name, boxes in parsed.boxes.items():
            member = self.members.find(name, bases)
            if member is None and boxes and stem_folders is not None:
                member = self.members.find_stem(_stem(source), stem_folders)
                if member is not None:
                    reject(
                        source,
                        f"<filename> {name!r} is not in the pack; paired with {member!r} by its stem",
                    )
            if member is None:
                if boxes:
                    reject(
                        source,
                        f"image {name!r} is not in the pack: its {len(boxes)} box(es) dropped",
                    )
                    self.rejected += len(boxes)
                continue
            for box in boxes:
                key = (member, box.category, box.x, box.y, box.w, box.h, box.iscrowd)
                if parsed.kind == "keypoints" and key in self.instances:
                    repeated[self.instances.pop(key)] += 1  # each instances box matched once
                    continue
                if parsed.kind == "instances":
                    self.instances.setdefault(key, source)
                self.boxes[member].append((box, source))
        for instances, n in sorted(repeated.items()):
            reject(source, f"COCO keypoints: {n} box(es) are also in {instances!r}; read once")
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
        The label: labels.csv's, else the most frequent category of its boxes that are not crowd
        (ties: alphabetical; only crowd boxes: the most frequent of them), else its folder's."""
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
            counts = Counter(b["category"] for b in [b for b in boxes if not b["iscrowd"]] or boxes)
            return min(counts, key=lambda c: (-counts[c], c)), formats[0], boxes
        return (*self.folder_label(member), boxes)

    def folder_label(self, member: str) -> tuple[str | None, str | None]:
        folders = name_parts(member)[:-1]
        if self.wrapper and folders and folders[0] == self.wrapper:
            folders = folders[1:]
        folders = [
            f for f in folders if f.lower() not in LAYOUT_DIRS and not LAYOUT_PATTERN.fullmatch(f)
        ]
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
    return {
        "category": box.category,
        "x": x0,
        "y": y0,
        "w": x1 - x0,
        "h": y1 - y0,
        "iscrowd": box.iscrowd,
    }


def _masks(images: list[str], cocos: list[tuple[str, Parsed]]) -> tuple[set[str], dict, dict]:
    """The segmentation mask PNGs among ``images``: (all of them, ``{panoptic json: the masks it
    names}``, ``{folder: the other masks in it}``). A panoptic json's ``file_name`` is looked for
    in the folder named after the json (``annotations/panoptic_val2017/``, beside it or beside
    its folder), then beside it; any other PNG under an ``annotations`` folder (or VOC's
    ``SegmentationClass``) is a mask too."""
    pngs = {_norm(m): m for m in images if _norm(m).endswith(".png")}
    named: dict[str, set[str]] = {}
    for source, parsed in cocos:
        d = posixpath.dirname(_norm(source))
        folders = [
            posixpath.join(d, _stem(source)),
            posixpath.join(posixpath.dirname(d), _stem(source)),
            d,
        ]
        for name in parsed.masks:
            hits = (posixpath.normpath(posixpath.join(f, _norm(name))) for f in folders)
            if found := next((pngs[h] for h in hits if h in pngs), None):
                named.setdefault(source, set()).add(found)
    masks = {m for ms in named.values() for m in ms}
    others: dict[str, set[str]] = defaultdict(set)
    for m in pngs.values():
        if m not in masks and any(f.lower() in MASK_DIRS for f in name_parts(m)[:-1]):
            others["/".join(name_parts(m)[:-1])].add(m)
    return masks | {m for ms in others.values() for m in ms}, named, others


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
    images = [i.filename for e in IMAGE_EXTS for i in by_ext[e]]
    consumed: set[str] = set()

    def parse(
        info: zipfile.ZipInfo,
        parser: Callable[[str], object],
        text_only: bool = False,
        empty_ok: bool = False,
    ):
        """What ``parser`` makes of the member's text, consumed; None if it is not of this format
        (or, ``text_only``, no text at all), or if it cannot be read (consumed, rejected).
        ``empty_ok``: an empty file is empty text (a YOLO txt of an image without objects)."""
        try:
            parsed = parser(_read_text(zf, info, limits, empty_ok))
        except NotThisFormat:
            return None
        except UnicodeDecodeError as e:
            if text_only:
                return None
            reject(info.filename, f"unreadable labels/annotations: {type(e).__name__}: {e}")
            parsed = None
        except BadMember as e:
            reject(info.filename, f"unreadable labels/annotations: {e}")
            parsed = None
        except Exception as e:  # any parse error is the file's reason
            reject(info.filename, f"unreadable labels/annotations: {type(e).__name__}: {e}")
            parsed = None
        consumed.add(info.filename)
        return parsed

    # COCO first: a panoptic json names its mask PNGs, which are no images (nor in ``Members``)
    cocos = []
    for info in by_ext[".json"]:
        parsed = parse(info, functools.partial(parse_coco, filename=info.filename))
        if parsed is not None:
            cocos.append((info.filename, parsed))
    masks, named, others = _masks(images, cocos)
    ann = Annotations([m for m in images if m not in masks], consumed)
    consumed |= masks
    for folder, pngs in sorted(others.items()):
        under = next(f for f in name_parts(folder) if f.lower() in MASK_DIRS)
        reject(f"{folder}/", f"{len(pngs)} PNG(s) under {under}/: segmentation masks, not images")
    for info in by_ext[".csv"]:
        if posixpath.basename(info.filename.lower()) == LABELS_FILE:
            parsed = parse(info, parse_labels_csv)
            if parsed is not None:
                ann.add(info.filename, parsed, _bases(info.filename), reject)
    # instances before keypoints: a keypoints file repeats the instances' person boxes
    for source, parsed in sorted(cocos, key=lambda c: c[1].kind == "keypoints"):
        if parsed.skipped:
            n = len(named.get(source, ()))
            mask_note = f" (its {n} mask PNG(s) are annotations, not images)" if n else ""
            reject(source, parsed.skipped + mask_note)
        else:
            ann.add(source, parsed, _bases(source, "images"), reject)
    for info in by_ext[".xml"]:
        parsed = parse(info, parse_voc)
        if parsed is not None:
            bases = _bases(info.filename, "JPEGImages", "images")
            ann.add(info.filename, parsed, bases, reject, stem_folders=bases[:-1])
    yolo = [by_ext[e] for e in (".txt", ".yaml", ".yml", ".names", ".data")]
    _read_yolo(ann, [i for infos in yolo for i in infos], parse, reject)
    return ann


NAMES_SAID = "data.yaml, classes.txt or obj.names"
YOLO_LINE = re.compile(r"\s*\d+(\s+[-+0-9.eE]+){4,}\s*")


def _read_yolo(ann: Annotations, infos, parse, reject: Reject) -> None:
    """YOLO label files: each ``labels/.../<stem>.txt`` (or a txt beside its image) is one image's
    boxes, once a names file (``data.yaml``, ``classes.txt``, Darknet's ``obj.names`` or the names
    file its ``obj.data`` names) gives the classes. Darknet's ``obj.data`` and its image lists
    (``train.txt``: one image path a line) are read too; they are no images."""
    datas = []  # (member, Darknet config)
    for info in infos:
        if info.filename.lower().endswith(".data"):
            conf = parse(info, parse_darknet_data, text_only=True)
            if conf is not None:
                datas.append((info.filename, conf))
    named = {
        posixpath.basename(c["names"].replace("\\", "/").lower())
        for _, c in datas
        if c.get("names")
    }

    def is_names(info) -> bool:
        base = posixpath.basename(info.filename.lower())
        return base in YOLO_NAMES or base in named or base.endswith(".names")

    names, names_file = None, None
    # the one obj.data names first, then the shallowest
    for info in sorted(
        filter(is_names, infos),
        key=lambda i: (
            posixpath.basename(i.filename.lower()) not in named,
            len(name_parts(i.filename)),
        ),
    ):
        base = posixpath.basename(info.filename.lower())
        found = parse(
            info,
            lambda t, base=base: parse_yolo_names(t, yaml_file=base.endswith((".yaml", ".yml"))),
        )
        if found is None:
            continue
        if names is None:
            names, names_file = found, info.filename
        elif found != names:
            reject(info.filename, f"YOLO class names other than {names_file!r}'s; not used")
    for data, conf in datas:
        classes = conf.get("classes", "")
        if names is not None and classes.isdigit() and int(classes) != len(names):
            reject(data, f"classes = {classes}, but {names_file!r} names {len(names)}")
        elif names is None:
            said = f"its names file {conf['names']!r}" if conf.get("names") else "a names file"
            reject(data, f"Darknet config: {said} is not in the pack; its labels are not read")
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
        if image is not None and names is not None:
            labels = functools.partial(parse_yolo_labels, image=image, names=names)
            parsed = parse(info, labels, empty_ok=True)
            if parsed is not None:
                ann.add(info.filename, parsed, [""], reject)
        elif in_labels and image is None:  # a YOLO label file by its place, whatever it says
            reject(info.filename, "YOLO labels of an image that is not in the pack")
            ann.consumed.add(info.filename)
        elif image is not None:  # beside or for an image, but no names file
            if parse(info, _yolo_lines, text_only=True, empty_ok=True) is not None:
                reject(
                    info.filename,
                    "YOLO labels, but no class names in the pack (" + NAMES_SAID + ")",
                )
        elif names is not None or datas:  # a YOLO pack's other txt: an image list, or labels
            listed = parse(info, _list_or_labels, text_only=True, empty_ok=True)
            if isinstance(listed, list):
                _check_image_list(ann, info.filename, listed, reject)
            elif listed is not None:
                reject(info.filename, "YOLO labels of an image that is not in the pack")


def _yolo_lines(text: str) -> str:
    if not all(YOLO_LINE.fullmatch(line) for line in text.splitlines() if line.strip()):
        raise NotThisFormat("not YOLO label lines")
    return text


def _list_or_labels(text: str) -> list[str] | str:
    """Darknet's image list (its paths), else YOLO label lines (the text), else NotThisFormat."""
    try:
        return parse_image_list(text, IMAGE_EXTS)
    except NotThisFormat:
        return _yolo_lines(text)


def _check_image_list(ann: Annotations, source: str, listed: list[str], reject: Reject) -> None:
    """A Darknet image list (``train.txt``): its paths are Darknet's (``data/obj_train_data/
    a.jpg``, ``data/`` being the pack); those naming no image of the pack are noted."""
    bases = _bases(source)
    missing = [
        p
        for p in listed
        if ann.members.find(p, bases) is None
        and not (p.startswith("data/") and ann.members.find(p[len("data/") :], bases))
    ]
    if missing:
        reject(
            source,
            f"{len(missing)} of its {len(listed)} image path(s) name no image in the pack, "
            f"e.g. {missing[0]!r}",
        )


def _read_text(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IngestLimits, empty_ok: bool = False
) -> str:
    if reason := file_type_reason(info):
        raise BadMember(reason)
    if empty_ok and info.file_size == 0:
        return ""
    if reason := data_reason(info, limits):
        raise BadMember(reason)
    buf = io.BytesIO()
    copy_member(zf, info, buf)
    return buf.getvalue().decode("utf-8-sig")  # Excel writes a BOM

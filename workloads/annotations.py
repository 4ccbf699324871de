"""What labels and boxes a pack carries: ``labels.csv`` (member,label), a COCO json, and
otherwise the name of an image's top folder.

An annotation file is read under the same limits as an image (a json can be a bomb too), and
a bad one loses its labels, not the images.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable

import pyarrow as pa

from workloads.member_names import name_parts
from workloads.pack_zip import BadMember, IngestLimits, copy_member, data_reason, file_type_reason

LABELS_FILE = "labels.csv"
COCO_FILES = ("annotations.json", "coco.json")
ANNOTATION_FILES = (LABELS_FILE, *COCO_FILES)  # read in this order

BOX_TYPE = pa.struct(
    [
        ("category", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("w", pa.float64()),
        ("h", pa.float64()),
    ]
)


def read_annotations(
    zf: zipfile.ZipFile,
    infos: list[zipfile.ZipInfo],
    limits: IngestLimits,
    reject: Callable[[str, str], None],
) -> tuple[dict[str, tuple[str, str]], dict[str, list[dict]]]:
    """``({member: (label, source)}, {member: boxes})`` from the pack's annotation files; a
    file that cannot be read is ``reject``-ed with its reason."""
    labels: dict[str, tuple[str, str]] = {}
    boxes: dict[str, list[dict]] = {}
    present = {i.filename: i for i in infos if i.filename in ANNOTATION_FILES}
    for name in ANNOTATION_FILES:
        if name not in present:
            continue
        try:
            text = _read_text(zf, present[name], limits)
            if name == LABELS_FILE:
                labels.update(
                    {
                        r["member"]: (r["label"], LABELS_FILE)
                        for r in csv.DictReader(io.StringIO(text))
                    }
                )
            else:
                _merge_coco(json.loads(text), labels, boxes)
        except BadMember as e:
            reject(name, f"unreadable labels/annotations: {e}")
        except Exception as e:
            reject(name, f"unreadable labels/annotations: {type(e).__name__}: {e}")
    return labels, boxes


def _read_text(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IngestLimits) -> str:
    if reason := file_type_reason(info) or data_reason(info, limits):
        raise BadMember(reason)
    buf = io.BytesIO()
    copy_member(zf, info, buf)
    return buf.getvalue().decode("utf-8-sig")  # Excel writes a BOM


def _merge_coco(coco: dict, labels: dict, boxes: dict) -> None:
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    files = {im["id"]: im["file_name"] for im in coco.get("images", [])}
    found: dict[str, list[dict]] = {}
    for ann in coco.get("annotations", []):
        x, y, w, h = (float(v) for v in ann["bbox"])
        found.setdefault(files[ann["image_id"]], []).append(
            {"category": cats[ann["category_id"]], "x": x, "y": y, "w": w, "h": h}
        )
    for member, bs in found.items():  # merged only when the whole file parsed
        boxes.setdefault(member, []).extend(bs)
        if member not in labels:
            # An image's label is its most frequent box category (ties: alphabetical).
            counts = Counter(b["category"] for b in bs)
            labels[member] = (min(counts, key=lambda c: (-counts[c], c)), "coco")


def label_for(member: str, labels: dict[str, tuple[str, str]]) -> tuple[str | None, str | None]:
    """(label, source): an explicit labels.csv / COCO label, else the top folder's name."""
    if member in labels:
        return labels[member]
    parts = name_parts(member)
    # NFC: the same folder zipped on macOS (NFD names) and elsewhere (NFC) is one label.
    return (unicodedata.normalize("NFC", parts[0]), "folder") if len(parts) > 1 else (None, None)

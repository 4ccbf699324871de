"""Pack ingest: one zip in ``incoming/`` → content-addressed originals, a manifest, rejects.

Members are streamed one at a time (never the whole pack in memory), hashed while
copied, validated as images, and stored at ``raw/<pp>/<sha256>.<ext>``. Every member that
is not kept gets a recorded reason; good members of a bad pack are kept. ``pack.json`` is
written last: it is the commit marker, so a killed ingest leaves no pack a reader could
take as done.

    python -m workloads.ingest --lake DIR_OR_S3_URL --pack-id digits --key incoming/digits.zip
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import stat
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from workloads.lake import open_lake, write_parquet

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
ARCHIVE_EXTS = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}
JUNK_NAMES = {"thumbs.db", ".ds_store", "desktop.ini"}
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "GIF": "gif", "MPO": "jpg"}
LABELS_FILE = "labels.csv"
COCO_FILES = ("annotations.json", "coco.json")
CHUNK = 1 << 20

BOX_TYPE = pa.struct([("category", pa.string()), ("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()), ("h", pa.float64())])
MANIFEST_SCHEMA = pa.schema(
    [
        ("member", pa.string()),
        ("sha256", pa.string()),
        ("prefix", pa.string()),
        ("format", pa.string()),
        ("ext", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.string()),
        ("label_source", pa.string()),  # labels.csv | coco | folder | null
        ("status", pa.string()),  # new | duplicate
        ("boxes", pa.list_(BOX_TYPE)),
    ]
)
REJECTS_SCHEMA = pa.schema([("member", pa.string()), ("reason", pa.string())])


class PackUnreadable(Exception):
    """The pack as a whole cannot be read (not a zip, truncated central directory, ...)."""


@dataclass(frozen=True)
class IngestLimits:
    max_member_bytes: int = 512 << 20
    max_total_bytes: int = 16 << 30
    max_ratio: float = 200.0
    max_members: int = 200_000
    max_pixels: int = 178_956_970  # Pillow's own decompression-bomb limit, made explicit

    @classmethod
    def from_env(cls) -> IngestLimits:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        kw = {}
        for name in fields:
            raw = os.environ.get(f"CVGRAPH_INGEST_{name.upper()}")
            if raw:
                kw[name] = float(raw) if name == "max_ratio" else int(raw)
        return cls(**kw)


@dataclass
class IngestResult:
    pack_id: str
    zip_sha256: str
    accepted: int = 0
    duplicates: int = 0
    skipped: int = 0
    rejected: list[dict] = field(default_factory=list)
    bytes_stored: int = 0
    seconds: float = 0.0
    labels: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def pack_keys(pack_id: str) -> dict[str, str]:
    base = f"packs/{pack_id}"
    return {"manifest": f"{base}/manifest.parquet", "rejects": f"{base}/rejects.parquet", "record": f"{base}/pack.json"}


def _unsafe_reason(name: str) -> str | None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("\\"):
        return "unsafe path: absolute member path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "unsafe path: escapes the pack root (..)"
    if "\x00" in name:
        return "unsafe path: NUL in member name"
    return None


def _is_junk(name: str) -> bool:
    parts = name.split("/")
    base = parts[-1]
    return "__MACOSX" in parts[:-1] or base.startswith("._") or base.lower() in JUNK_NAMES


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _hash_zip(f) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def _read_labels(zf: zipfile.ZipFile, names: set[str]) -> tuple[dict[str, tuple[str, str]], dict[str, list[dict]]]:
    """Labels (with their source) and boxes a pack carries: ``labels.csv`` (member,label) and/or a COCO json."""
    labels: dict[str, tuple[str, str]] = {}
    boxes: dict[str, list[dict]] = {}
    if LABELS_FILE in names:
        with zf.open(LABELS_FILE) as f:
            for row in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")):
                labels[row["member"]] = (row["label"], LABELS_FILE)
    for coco_name in COCO_FILES:
        if coco_name not in names:
            continue
        with zf.open(coco_name) as f:
            coco = json.load(f)
        cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
        files = {im["id"]: im["file_name"] for im in coco.get("images", [])}
        for ann in coco.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.setdefault(files[ann["image_id"]], []).append(
                {"category": cats[ann["category_id"]], "x": x, "y": y, "w": w, "h": h}
            )
        for member, bs in boxes.items():
            if member not in labels:
                # An image's label is its most frequent box category (ties: alphabetical).
                counts = Counter(b["category"] for b in bs)
                labels[member] = (min(counts, key=lambda c: (-counts[c], c)), "coco")
    return labels, boxes


def _label_for(member: str, labels: dict[str, tuple[str, str]]) -> tuple[str | None, str | None]:
    """(label, source): an explicit labels.csv / COCO label, else the top folder's name."""
    if member in labels:
        return labels[member]
    parts = member.split("/")
    return (parts[0], "folder") if len(parts) > 1 else (None, None)


def inspect_image(path: str, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height as displayed) of a decodable image, else ValueError(reason)."""
    from PIL import Image, ImageOps  # noqa: PLC0415

    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit before decoding, with a reason
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
            fmt = im.format or "unknown"
            if fmt not in FORMAT_EXT:
                raise ValueError(f"unsupported image format {fmt}")
            im.load()  # full decode: catches truncated and corrupt data
            exif_rotated = ImageOps.exif_transpose(im).size if fmt in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else (w, h)
            return fmt, int(exif_rotated[0]), int(exif_rotated[1])
    except ValueError:
        raise
    except Exception as e:  # Pillow raises many types for bad data
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None


def ingest_pack(lake, pack_id: str, key: str, limits: IngestLimits | None = None, progress=None) -> IngestResult:
    limits = limits or IngestLimits()
    keys = pack_keys(pack_id)
    t0 = time.perf_counter()
    with lake.open_read(key) as f, tempfile.TemporaryDirectory(prefix="cvgraph-ingest-") as tmpdir:
        zip_sha = _hash_zip(f)
        if lake.exists(keys["record"]):
            prior = json.loads(lake.get(keys["record"]))
            if prior.get("zip_sha256") == zip_sha:
                return IngestResult(**{k: prior[k] for k in IngestResult.__dataclass_fields__ if k in prior})
        try:
            zf = zipfile.ZipFile(f)
            infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            reason = f"not a readable zip: {e}"
            # Recorded even though nothing was kept, so the pack's fate is in the lake.
            write_parquet(lake, keys["rejects"], pa.Table.from_pylist([{"member": "", "reason": reason}], schema=REJECTS_SCHEMA))
            raise PackUnreadable(f"pack {pack_id} ({key}) is {reason}") from None

        result = IngestResult(pack_id=pack_id, zip_sha256=zip_sha)
        names = {i.filename for i in infos}
        try:
            labels, boxes = _read_labels(zf, names)
        except Exception as e:  # a bad labels file loses the labels, not the images
            labels, boxes = {}, {}
            result.rejected.append({"member": LABELS_FILE, "reason": f"unreadable labels/annotations: {e}"})
        rows: list[dict] = []
        seen: dict[str, str] = {}
        total = 0
        tmp_path = os.path.join(tmpdir, "member")

        def reject(member: str, reason: str) -> None:
            result.rejected.append({"member": member, "reason": reason})

        for n, info in enumerate(infos):
            if progress:
                progress(n, len(infos))
            name = info.filename
            if info.is_dir():
                continue
            if _is_junk(name):
                result.skipped += 1
                continue
            if name in (LABELS_FILE, *COCO_FILES):
                continue
            if reason := _unsafe_reason(name):
                reject(name, reason)
                continue
            if _is_symlink(info):
                reject(name, "symlink member: not followed")
                continue
            if n >= limits.max_members:
                reject(name, f"zip bomb: more than {limits.max_members} members")
                continue
            ext = posixpath.splitext(name)[1].lower()
            if ext in ARCHIVE_EXTS:
                reject(name, f"nested archive ({ext}): not unpacked")
                continue
            if ext not in IMAGE_EXTS:
                reject(name, f"not an image: extension {ext or '(none)'}")
                continue
            if info.file_size == 0:
                reject(name, "empty file (0 bytes)")
                continue
            if info.file_size > limits.max_member_bytes:
                reject(name, f"zip bomb: member is {info.file_size} bytes > limit {limits.max_member_bytes}")
                continue
            if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
                ratio = info.file_size / info.compress_size
                reject(name, f"zip bomb: compression ratio {ratio:.0f} > limit {limits.max_ratio:.0f}")
                continue
            if total + info.file_size > limits.max_total_bytes:
                reject(name, f"zip bomb: pack total over {limits.max_total_bytes} bytes")
                continue
            total += info.file_size
            h = hashlib.sha256()
            size = 0
            try:
                with zf.open(info) as src, open(tmp_path, "wb") as dst:
                    for chunk in iter(lambda: src.read(CHUNK), b""):
                        size += len(chunk)
                        if size > info.file_size:
                            raise ValueError("member is larger than its header says")
                        h.update(chunk)
                        dst.write(chunk)
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
                reject(name, f"corrupt member: {e}")
                continue
            sha = h.hexdigest()
            try:
                fmt, width, height = inspect_image(tmp_path, limits.max_pixels)
            except ValueError as e:
                reject(name, str(e))
                continue
            ext_out = FORMAT_EXT[fmt]
            prefix = sha[:2]
            if sha in seen:
                status = "duplicate"
            elif lake.put_file_if_absent(f"raw/{prefix}/{sha}.{ext_out}", tmp_path):
                status = "new"
                result.bytes_stored += size
            else:
                status = "duplicate"
            seen.setdefault(sha, name)
            if status == "new":
                result.accepted += 1
            else:
                result.duplicates += 1
            rows.append(
                {
                    "member": name,
                    "sha256": sha,
                    "prefix": prefix,
                    "format": fmt,
                    "ext": ext_out,
                    "bytes": size,
                    "width": width,
                    "height": height,
                    **dict(zip(("label", "label_source"), _label_for(name, labels))),
                    "status": status,
                    "boxes": boxes.get(name, []),
                }
            )
        zf.close()

    rows.sort(key=lambda r: (r["sha256"], r["member"]))
    result.labels = dict(sorted(Counter(r["label"] or "(none)" for r in rows).items()))
    result.seconds = round(time.perf_counter() - t0, 3)
    write_parquet(lake, keys["rejects"], pa.Table.from_pylist(result.rejected, schema=REJECTS_SCHEMA))
    write_parquet(lake, keys["manifest"], pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    lake.put(keys["record"], json.dumps(result.to_json(), indent=2, sort_keys=True).encode())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--pack-id", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args(argv)
    lake = open_lake(args.lake, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    try:
        result = ingest_pack(lake, args.pack_id, args.key, IngestLimits.from_env())
    except PackUnreadable as e:
        print(json.dumps({"pack_id": args.pack_id, "error": str(e)}))
        print(str(e), file=sys.stderr)
        return 3
    print(json.dumps(result.to_json(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pack ingest: one zip in ``incoming/`` → content-addressed originals, a manifest, rejects.

Members are streamed one at a time (never the whole pack in memory), hashed while
copied, validated as images, and stored at ``raw/<pp>/<sha256>.<ext>``. Every member that
is not kept gets a recorded reason; good members of a bad pack are kept. ``pack.json`` is
written last: it is the commit marker, so a killed ingest leaves no pack a reader could
take as done, and a re-run converges to what a clean run writes.

Nothing a pack says is trusted: member names are never used as paths, sizes are checked in
the central directory and again while streaming, and an image's pixel count is checked from
its header before it is decoded.

    python -m workloads.ingest --lake DIR_OR_S3_URL --pack-id digits --key incoming/digits.zip
"""

from __future__ import annotations

import argparse
import copy
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
import unicodedata
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from workloads.lake import open_lake, parquet_table, write_parquet
from workloads.layout import (
    PENDING_RAW,
    pack_keys,
    pack_prefix_key,
    pending_raw_key,
    raw_index_key,
    raw_key,
)
from workloads.tasks import PACK_UNREADABLE

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
ARCHIVE_EXTS = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}
JUNK_NAMES = {"thumbs.db", ".ds_store", "desktop.ini"}
JUNK_DIRS = {
    "__MACOSX",
    "@eaDir",
    ".Trashes",
    ".Spotlight-V100",
    ".fseventsd",
}  # macOS, Synology NAS thumbnails
FORMAT_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "BMP": "bmp",
    "TIFF": "tif",
    "WEBP": "webp",
    "GIF": "gif",
    "MPO": "jpg",
}
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
LABELS_FILE = "labels.csv"
COCO_FILES = ("annotations.json", "coco.json")
CHUNK = 1 << 20

BOX_TYPE = pa.struct(
    [
        ("category", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("w", pa.float64()),
        ("h", pa.float64()),
    ]
)
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
    """The pack as a whole cannot be read (not a zip, no central directory) or is refused
    as a whole (more members than the limit)."""


class BadMember(ValueError):
    """One member is not kept; the message is the reason recorded in ``rejects.parquet``."""


@dataclass(frozen=True)
class IngestLimits:
    max_member_bytes: int = 512 << 20
    max_total_bytes: int = 16 << 30
    max_ratio: float = 200.0
    max_members: int = 200_000
    max_pixels: int = 178_956_970  # Pillow's own decompression-bomb limit, made explicit

    @classmethod
    def from_env(cls, environ: dict | None = None) -> IngestLimits:
        """Defaults overridden by ``CVGRAPH_INGEST_<FIELD>``, e.g. ``CVGRAPH_INGEST_MAX_RATIO=500``."""
        environ = os.environ if environ is None else environ
        kw = {}
        for f in dataclasses.fields(cls):
            var = f"CVGRAPH_INGEST_{f.name.upper()}"
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            try:
                value = float(raw) if f.name == "max_ratio" else int(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a number") from None
            if value <= 0:
                raise ValueError(f"{var}={raw!r} must be positive")
            kw[f.name] = value
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
    prefixes: dict = field(
        default_factory=dict
    )  # {prefix: manifest rows}: the prefixes this pack touches
    manifest_rows: int = (
        0  # rows of the manifest as written (its check reads this, not the manifest)
    )
    limits: dict = field(
        default_factory=dict
    )  # the limits it ran with: changed limits re-run the ingest

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- member names ----------------------------------------------------------------
# Member names are never used as file paths here (a member is copied to one fixed temp
# file and stored under its sha256), but a name an extractor could not use safely marks a
# hostile or broken pack, so it is refused with a reason its author can act on.


def _parts(name: str) -> list[str]:
    """Path components; a backslash counts as a separator (the zip spec says '/', some
    Windows tools write '\\'), and '.' and empty components are dropped."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _unsafe_reason(name: str) -> str | None:
    if name.startswith(("/", "\\")):
        return "unsafe path: absolute member path"
    if len(name) > 1 and name[1] == ":" and name[0].isalpha():
        return "unsafe path: Windows drive path"
    parts, depth = _parts(name), 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return "unsafe path: escapes the pack root (..)"
    if ".." in parts:  # a/../b stays inside, but no honest tool writes it
        return "unsafe path: '..' in member path"
    return None


def _file_type_reason(info: zipfile.ZipInfo) -> str | None:
    """Symlinks and special files, from the Unix mode that Unix (3) and macOS (19) hosts store."""
    if info.create_system not in (3, 19):
        return None
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink member: not followed"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return f"special file member (type {stat.filemode(mode)[0]}): not a regular file"
    return None


def _is_dir(info: zipfile.ZipInfo) -> bool:
    return info.is_dir() or (info.filename.endswith("\\") and info.file_size == 0)


def _is_junk(name: str) -> bool:
    parts = _parts(name)
    base = parts[-1] if parts else ""
    return (
        any(p in JUNK_DIRS for p in parts[:-1])
        or base.startswith("._")
        or base.lower() in JUNK_NAMES
    )


def _kind_reason(name: str) -> str | None:
    """Nested archives and non-images, by extension (content is checked later)."""
    base = (_parts(name) or [""])[-1].lower()
    ext = posixpath.splitext(base)[1]
    if ext in ARCHIVE_EXTS:
        full = ".tar" + ext if base[: -len(ext)].endswith(".tar") else ext
        return f"nested archive ({full}): not unpacked"
    if ext not in IMAGE_EXTS:
        return f"not an image: extension {ext or '(none)'}"
    return None


# -- member data -----------------------------------------------------------------


def _data_reason(info: zipfile.ZipInfo, limits: IngestLimits) -> str | None:
    """What the central directory already says is wrong (sizes are re-checked while streaming)."""
    if info.flag_bits & 0x1:
        return "encrypted member: no password"
    if info.compress_type not in READABLE_METHODS:
        method = zipfile.compressor_names.get(info.compress_type, "unknown")
        return f"unsupported compression method {info.compress_type} ({method})"
    if info.file_size == 0:
        return "empty file (0 bytes)"
    if info.file_size > limits.max_member_bytes:
        return f"zip bomb: member is {info.file_size} bytes > limit {limits.max_member_bytes}"
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_ratio:
        return f"zip bomb: compression ratio {ratio:.0f} > limit {limits.max_ratio:g}"
    return None


def _overlapping(infos: list[zipfile.ZipInfo]) -> set[int]:
    """Indexes of members whose data starts inside another member's data.

    Non-recursive zip bombs point many entries at one compressed kernel; zipfile refuses
    them itself only from Python 3.12. 30 bytes is the fixed part of a local header: the
    real span (plus name and extra field) is longer, so this never flags honest zips.
    """
    flagged, end = set(), -1
    for k in sorted(range(len(infos)), key=lambda k: infos[k].header_offset):
        if infos[k].header_offset < end:
            flagged.add(k)
        end = max(end, infos[k].header_offset + 30 + infos[k].compress_size)
    return flagged


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst) -> tuple[str, int]:
    """Stream a member into ``dst``; (sha256, size) or BadMember.

    The header's size is enforced, not trusted: zipfile stops at the declared size (silently,
    if the CRC was forged to match), so we ask for one byte more and refuse the member if it
    comes. zipfile's own CRC check is turned off (it would fire first and report a size lie as
    a CRC error); we check the CRC here.
    """
    probe = copy.copy(info)
    probe.file_size = info.file_size + 1
    del probe.CRC
    h, crc, size = hashlib.sha256(), 0, 0
    try:
        src = zf.open(probe)
    except Exception as e:  # bad local header, ...
        raise BadMember(f"corrupt member: {type(e).__name__}: {e}") from None
    with src:
        while True:
            try:
                chunk = src.read(CHUNK)
            except Exception as e:  # zlib.error, EOFError, BadZipFile, ...: damaged data
                raise BadMember(f"corrupt member: {type(e).__name__}: {e}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > info.file_size:
                raise BadMember(
                    f"zip bomb: member data is larger than its header says ({info.file_size} bytes)"
                )
            h.update(chunk)
            crc = zlib.crc32(chunk, crc)
            dst.write(chunk)
    if size < info.file_size:
        raise BadMember(f"corrupt member: {size} bytes of data, its header says {info.file_size}")
    if crc != info.CRC:
        raise BadMember("corrupt member: CRC-32 mismatch")
    return h.hexdigest(), size


def _hash_zip(f) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def _open_zip(f, limits: IngestLimits) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(f)
    except Exception as e:  # BadZipFile mostly; a hostile central directory raises other types too
        f.seek(0)
        if isinstance(e, zipfile.BadZipFile) and f.read(4) == b"PK\x03\x04":
            raise PackUnreadable(
                "not a readable zip: truncated (member data but no central directory)"
            ) from None
        detail = str(e) if isinstance(e, zipfile.BadZipFile) else f"{type(e).__name__}: {e}"
        raise PackUnreadable(f"not a readable zip: {detail}") from None
    # Refused as a whole: no subset of the members is "the pack", and a reject row for each
    # of millions of members would itself be the bomb. Raise the limit and re-run instead.
    n = sum(1 for i in zf.infolist() if not _is_dir(i))
    if n > limits.max_members:
        zf.close()
        raise PackUnreadable(f"zip bomb: {n} members > limit {limits.max_members}")
    return zf


# -- labels ----------------------------------------------------------------------


def _read_labels(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: IngestLimits, reject
) -> tuple[dict, dict]:
    """Labels (with their source) and boxes a pack carries: ``labels.csv`` (member,label)
    and/or a COCO json. A bad file loses its labels, not the images."""
    labels: dict[str, tuple[str, str]] = {}
    boxes: dict[str, list[dict]] = {}
    present = {i.filename: i for i in infos if i.filename in (LABELS_FILE, *COCO_FILES)}
    for name in (LABELS_FILE, *COCO_FILES):
        if name not in present:
            continue
        info = present[name]
        try:
            if reason := _file_type_reason(info) or _data_reason(info, limits):
                raise BadMember(reason)
            buf = io.BytesIO()
            _copy_member(zf, info, buf)  # the same size limits as images: a json can be a bomb too
            text = buf.getvalue().decode("utf-8-sig")  # Excel writes a BOM
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


def _label_for(member: str, labels: dict[str, tuple[str, str]]) -> tuple[str | None, str | None]:
    """(label, source): an explicit labels.csv / COCO label, else the top folder's name."""
    if member in labels:
        return labels[member]
    parts = _parts(member)
    # NFC: the same folder zipped on macOS (NFD names) and elsewhere (NFC) is one label.
    return (unicodedata.normalize("NFC", parts[0]), "folder") if len(parts) > 1 else (None, None)


# -- images ----------------------------------------------------------------------


def inspect_image(path: str, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height as displayed) of a decodable image, else BadMember(reason).

    The pixel count is checked from the header, before anything is decoded.
    """
    from PIL import Image

    from workloads.kernels import exif_orientation

    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit before decoding, with a reason
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadMember(
                    f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}"
                )
            fmt = im.format or "unknown"
            if fmt not in FORMAT_EXT:
                raise BadMember(f"unsupported image format {fmt}")
            im.load()  # full decode: catches truncated and corrupt data
            if exif_orientation(im) in (5, 6, 7, 8):  # rotated by 90°: displayed sides swap
                w, h = h, w
            return fmt, int(w), int(h)
    except (BadMember, MemoryError):
        raise
    except Exception as e:  # Pillow raises many types for bad data
        raise BadMember(f"undecodable image: {type(e).__name__}: {e}") from None


def _claimed_elsewhere(lake, pack_id: str, shas: set[str]) -> set[str]:
    """Those of ``shas`` that a committed pack other than ``pack_id`` lists: per prefix of them,
    its index (packs merged) and its pending committed packs (not merged yet). Reads what those
    prefixes hold, never every pack's manifest."""
    claimed: set[str] = set()
    by_prefix: dict[str, set[str]] = {}
    for sha in shas:
        by_prefix.setdefault(sha[:2], set()).add(sha)
    for prefix, wanted in sorted(by_prefix.items()):
        value_set = pa.array(sorted(wanted), pa.string())
        if lake.exists(raw_index_key(prefix)):
            index = parquet_table(lake.get(raw_index_key(prefix)), columns=["sha256", "packs"])
            for r in index.filter(pc.is_in(index["sha256"], value_set=value_set)).to_pylist():
                if set(r["packs"]) - {pack_id}:
                    claimed.add(r["sha256"])
        for key in lake.keys(f"{PENDING_RAW}{prefix}/"):
            other = key.rsplit("/", 1)[1][: -len(".json")]
            if other == pack_id or not lake.exists(pack_keys(other)["record"]):
                continue
            col = parquet_table(
                lake.get(pack_prefix_key(other, prefix)), columns=["sha256"]
            ).column("sha256")
            claimed.update(col.filter(pc.is_in(col, value_set=value_set)).to_pylist())
    return claimed


def ingest_pack(
    lake, pack_id: str, key: str, limits: IngestLimits | None = None, progress=None
) -> IngestResult:
    limits = limits or IngestLimits()
    keys = pack_keys(pack_id)
    t0 = time.perf_counter()
    with lake.open_read(key) as f, tempfile.TemporaryDirectory(prefix="cvgraph-ingest-") as tmpdir:
        zip_sha = _hash_zip(f)
        if lake.exists(keys["record"]):
            prior = json.loads(lake.get(keys["record"]))
            if prior.get("zip_sha256") == zip_sha and prior.get("limits") == dataclasses.asdict(
                limits
            ):
                return IngestResult(
                    **{k: prior[k] for k in IngestResult.__dataclass_fields__ if k in prior}
                )
            # Another zip (or other limits) under this id: un-commit the old pack first, so
            # no reader pairs the old record with a half-written new manifest.
            lake.delete(keys["record"])
        try:
            zf = _open_zip(f, limits)
        except PackUnreadable as e:
            # Recorded even though nothing was kept, so the pack's fate is in the lake.
            write_parquet(
                lake,
                keys["rejects"],
                pa.Table.from_pylist([{"member": "", "reason": str(e)}], schema=REJECTS_SCHEMA),
            )
            raise PackUnreadable(f"pack {pack_id} ({key}) is {e}") from None

        result = IngestResult(
            pack_id=pack_id, zip_sha256=zip_sha, limits=dataclasses.asdict(limits)
        )

        def reject(member: str, reason: str) -> None:
            result.rejected.append({"member": member, "reason": reason})

        with zf:
            infos = zf.infolist()
            overlapping = _overlapping(infos)
            labels, boxes = _read_labels(zf, infos, limits, reject)
            rows: list[dict] = []
            seen: set[str] = set()
            already_stored: set[str] = set()
            total = 0
            tmp_path = os.path.join(tmpdir, "member")
            for n, info in enumerate(infos):
                if progress:
                    progress(n, len(infos))
                name = info.filename
                if _is_dir(info) or name in (LABELS_FILE, *COCO_FILES):
                    continue
                if _is_junk(name):
                    result.skipped += 1
                    continue
                reason = (
                    _unsafe_reason(name)
                    or _file_type_reason(info)
                    or _kind_reason(name)
                    or _data_reason(info, limits)
                )
                if not reason and n in overlapping:
                    reason = "zip bomb: member data overlaps another member's"
                if not reason and total + info.file_size > limits.max_total_bytes:
                    reason = f"zip bomb: pack total {total + info.file_size} bytes > limit {limits.max_total_bytes}"
                if reason:
                    reject(name, reason)
                    continue
                total += info.file_size
                try:
                    with open(tmp_path, "wb") as dst:
                        sha, size = _copy_member(zf, info, dst)
                    fmt, width, height = inspect_image(tmp_path, limits.max_pixels)
                except BadMember as e:
                    reject(name, str(e))
                    continue
                ext = FORMAT_EXT[fmt]
                status = "duplicate" if sha in seen else None  # None: decided below
                if status is None and not lake.put_file_if_absent(raw_key(sha, ext), tmp_path):
                    already_stored.add(sha)
                seen.add(sha)
                label, label_source = _label_for(name, labels)
                rows.append(
                    {
                        "member": name,
                        "sha256": sha,
                        "prefix": sha[:2],
                        "format": fmt,
                        "ext": ext,
                        "bytes": size,
                        "width": width,
                        "height": height,
                        "label": label,
                        "label_source": label_source,
                        "status": status,
                        "boxes": boxes.get(name, []),
                    }
                )

    # An object that was already stored is a duplicate only if a committed pack accounts for
    # it; otherwise an interrupted ingest left it, and this pack brings it: a re-run after a
    # kill then writes exactly what a clean run writes. (Two packs ingesting the same new
    # image at the same moment may both count it new; it is still stored once.)
    claimed = _claimed_elsewhere(lake, pack_id, already_stored)
    for r in rows:
        if r["status"] is None:
            r["status"] = "duplicate" if r["sha256"] in claimed else "new"
    new = [r for r in rows if r["status"] == "new"]
    result.accepted, result.duplicates = len(new), len(rows) - len(new)
    result.bytes_stored = sum(r["bytes"] for r in new)
    rows.sort(key=lambda r: (r["sha256"], r["member"]))
    result.labels = dict(sorted(Counter(r["label"] or "(none)" for r in rows).items()))
    result.seconds = round(time.perf_counter() - t0, 3)
    write_parquet(
        lake, keys["rejects"], pa.Table.from_pylist(result.rejected, schema=REJECTS_SCHEMA)
    )
    manifest = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    result.manifest_rows = parquet_table(write_parquet(lake, keys["manifest"], manifest)).num_rows
    # Split by prefix, each with its pending marker, before the commit marker: a prefix's index
    # reads only these (a marker of an uncommitted pack waits for its commit).
    counts = Counter(r["prefix"] for r in rows)
    result.prefixes = dict(sorted(counts.items()))
    for prefix in result.prefixes:
        write_parquet(
            lake,
            pack_prefix_key(pack_id, prefix),
            manifest.filter(pc.equal(manifest["prefix"], prefix)),
        )
        lake.put(
            pending_raw_key(prefix, pack_id),
            json.dumps({"pack_id": pack_id, "rows": counts[prefix]}).encode(),
        )
    lake.put(keys["record"], json.dumps(result.to_json(), indent=2, sort_keys=True).encode())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--pack-id", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument(
        "--run-id",
        help="write the task's result record (requests, seconds) under _results/<run-id>/ingest/",
    )
    args = ap.parse_args(argv)
    lake = open_lake(args.lake, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    t0 = time.perf_counter()
    try:
        result = ingest_pack(lake, args.pack_id, args.key, IngestLimits.from_env())
    except PackUnreadable as e:
        print(json.dumps({"pack_id": args.pack_id, "error": str(e)}))
        print(str(e), file=sys.stderr)
        return PACK_UNREADABLE
    if args.run_id:
        from workloads.layout import result_key

        record = {
            "pack_id": args.pack_id,
            "seconds": round(time.perf_counter() - t0, 3),
            "requests": lake.counters.since({}),
        }
        lake.put(
            result_key(args.run_id, "ingest", args.pack_id),
            json.dumps(record, sort_keys=True).encode(),
        )
    print(json.dumps(result.to_json(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

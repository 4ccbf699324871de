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
import dataclasses
import json
import os
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from workloads.annotations import BOX_TYPE, read_annotations
from workloads.lake import open_lake, parquet_table, write_parquet
from workloads.layout import (
    pack_keys,
    pack_prefix_key,
    pending_raw_key,
    raw_key,
    replaced_key,
    result_key,
    unreadable_key,
)
from workloads.member_names import is_junk, kind_reason, unsafe_reason
from workloads.pack_claims import claims_elsewhere, label_conflicts
from workloads.pack_zip import (
    BadMember,
    IngestLimits,
    PackUnreadable,
    copy_member,
    data_reason,
    file_type_reason,
    hash_zip,
    is_dir,
    open_zip,
    overlapping_members,
)
from workloads.staging import staging
from workloads.tasks import PACK_REPLACED, PACK_UNREADABLE

FORMAT_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "BMP": "bmp",
    "TIFF": "tif",
    "WEBP": "webp",
    "GIF": "gif",
    "MPO": "jpg",
}

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


# 2: annotation files found by content (COCO anywhere, VOC, YOLO), layout and wrapping folders
# are no classes, boxes checked against their image
# 3: boxes carry iscrowd; a COCO annotations/ folder read whole (keypoints once; captions, stuff,
# panoptic skipped, its mask PNGs no images); Darknet/CVAT YOLO 1.1; VOC paired by stem
READER = 3


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
    boxes: dict = field(default_factory=lambda: {"accepted": 0, "rejected": 0})
    label_conflicts: list = field(default_factory=list)  # pack_claims.label_conflicts
    reader: int = READER  # how packs were read: a record of another reader is read again

    def reject(self, member: str, reason: str) -> None:
        self.rejected.append({"member": member, "reason": reason})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def inspect_image(path: str | BinaryIO, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height as displayed) of a decodable image (a file or its open bytes), else
    BadMember(reason).

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


class PackReplaced(Exception):
    """Other bytes under an ingested pack's key: refused, the ingested pack kept as it is."""


def _prior_result(
    lake, keys: dict, zip_sha: str, limits: IngestLimits, pack_id: str, key: str
) -> IngestResult | None:
    """The committed result of this very zip under these limits, if any. A pack is immutable
    once ingested: other bytes under its key are refused (``PackReplaced``), with the reason
    recorded at ``packs/<id>/replaced/<sha256>.json``; subsets frozen from it stay valid."""
    if not lake.exists(keys["record"]):
        return None
    prior = json.loads(lake.get(keys["record"]))
    if prior.get("zip_sha256") != zip_sha:
        reason = (
            f"pack {pack_id}: {key} was replaced by other bytes (sha256 {zip_sha[:12]}…, "
            f"ingested {prior.get('zip_sha256', '?')[:12]}…); refused, the ingested pack is kept. "
            "Upload the new zip under a new name, or `cvgraph forget pack "
            f"{pack_id}` and ingest it again"
        )
        refusal = {"pack_id": pack_id, "key": key, "zip_sha256": zip_sha, "reason": reason}
        refusal["ingested_zip_sha256"] = prior.get("zip_sha256")
        lake.put(replaced_key(pack_id, zip_sha), json.dumps(refusal, sort_keys=True).encode())
        raise PackReplaced(reason)
    if prior.get("limits") == dataclasses.asdict(limits) and prior.get("reader") == READER:
        return IngestResult(
            **{k: prior[k] for k in IngestResult.__dataclass_fields__ if k in prior}
        )
    # The same zip under other limits or a newer reader: un-commit the old reading first, so
    # no reader pairs the old record with a half-written new manifest.
    lake.delete(keys["record"])
    return None


def _open_pack(
    lake, keys: dict, f, limits: IngestLimits, *, pack_id: str, key: str, zip_sha: str
) -> zipfile.ZipFile:
    try:
        return open_zip(f, limits)
    except PackUnreadable as e:
        # Recorded even though nothing was kept, so the pack's fate is in the lake; the verdict
        # (last) tells a sync these bytes are owed no ingest again.
        write_parquet(
            lake,
            keys["rejects"],
            pa.Table.from_pylist([{"member": "", "reason": str(e)}], schema=REJECTS_SCHEMA),
        )
        verdict = {"key": key, "bytes": lake.size(key), "zip_sha256": zip_sha, "reason": str(e)}
        lake.put(unreadable_key(pack_id), json.dumps(verdict, sort_keys=True).encode())
        raise PackUnreadable(f"pack {pack_id} ({key}) is {e}") from None


def _refusal(info: zipfile.ZipInfo, limits: IngestLimits, overlaps: bool, total: int) -> str | None:
    """Why a member is refused before its data is read (``total``: the bytes kept so far)."""
    name = info.filename
    reason = (
        unsafe_reason(name)
        or file_type_reason(info)
        or kind_reason(name)
        or data_reason(info, limits)
    )
    if not reason and overlaps:
        reason = "zip bomb: member data overlaps another member's"
    if not reason and total + info.file_size > limits.max_total_bytes:
        reason = (
            f"zip bomb: pack total {total + info.file_size} bytes > limit {limits.max_total_bytes}"
        )
    return reason


def _store_images(
    lake, zf: zipfile.ZipFile, limits: IngestLimits, result: IngestResult, tmp_path: str, progress
) -> tuple[list[dict], set[str]]:
    """Copy each image member to ``tmp_path``, check it, and store it under its sha256 if the lake
    lacks it; returns the manifest rows (``status`` None where a row is new or a duplicate of a
    stored object not yet told apart) and the shas the lake already held."""
    infos = zf.infolist()
    overlapping = overlapping_members(infos)
    annotations = read_annotations(zf, infos, limits, result.reject)
    rows: list[dict] = []
    seen: set[str] = set()
    already_stored: set[str] = set()
    total = 0
    for n, info in enumerate(infos):
        if progress:
            progress(n, len(infos))
        name = info.filename
        if is_dir(info) or name in annotations.consumed:
            continue
        if is_junk(name):
            result.skipped += 1
            continue
        if reason := _refusal(info, limits, n in overlapping, total):
            result.reject(name, reason)
            continue
        total += info.file_size
        try:
            with open(tmp_path, "wb") as dst:
                sha, size = copy_member(zf, info, dst)
            fmt, width, height = inspect_image(tmp_path, limits.max_pixels)
        except BadMember as e:
            result.reject(name, str(e))
            continue
        ext = FORMAT_EXT[fmt]
        status = "duplicate" if sha in seen else None  # None: decided by _settle_statuses
        if status is None and not lake.put_file_if_absent(raw_key(sha, ext), tmp_path):
            already_stored.add(sha)
        seen.add(sha)
        label, label_source, boxes = annotations.image(name, width, height, result.reject)
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
                "boxes": boxes,
            }
        )
    result.boxes = {"accepted": annotations.accepted, "rejected": annotations.rejected}
    return rows, already_stored


def _settle_statuses(
    lake, pack_id: str, rows: list[dict], already_stored: set[str], result: IngestResult
) -> None:
    """Decide new vs duplicate for the undecided rows, sort them, and count them into ``result``.

    An object that was already stored is a duplicate only if a committed pack accounts for
    it; otherwise an interrupted ingest left it, and this pack brings it: a re-run after a
    kill then writes exactly what a clean run writes. (Two packs ingesting the same new
    image at the same moment may both count it new; it is still stored once.)
    """
    claims = claims_elsewhere(lake, pack_id, already_stored)
    claimed = set(claims)
    for r in rows:
        if r["status"] is None:
            r["status"] = "duplicate" if r["sha256"] in claimed else "new"
    new = [r for r in rows if r["status"] == "new"]
    result.accepted, result.duplicates = len(new), len(rows) - len(new)
    result.bytes_stored = sum(r["bytes"] for r in new)
    rows.sort(key=lambda r: (r["sha256"], r["member"]))
    result.labels = dict(sorted(Counter(r["label"] or "(none)" for r in rows).items()))
    result.label_conflicts = label_conflicts(pack_id, rows, claims)


def _write_pack(lake, pack_id: str, keys: dict, rows: list[dict], result: IngestResult) -> None:
    """Rejects, manifest, the manifest split by prefix with a pending marker each, and the
    record last (the commit marker)."""
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


def ingest_pack(
    lake,
    pack_id: str,
    key: str,
    limits: IngestLimits | None = None,
    progress=None,
    on_sweep=None,
) -> IngestResult:
    """Ingest the zip at ``key`` as pack ``pack_id``. Members are staged in the lake's staging
    area, which first loses what killed ingests left there (``on_sweep`` hears of it)."""
    limits = limits or IngestLimits()
    keys = pack_keys(pack_id)
    t0 = time.perf_counter()
    with lake.open_read(key) as f, staging(lake, "ingest", on_sweep=on_sweep) as tmpdir:
        zip_sha = hash_zip(f)
        prior = _prior_result(lake, keys, zip_sha, limits, pack_id, key)
        if prior is not None:
            return prior
        zf = _open_pack(lake, keys, f, limits, pack_id=pack_id, key=key, zip_sha=zip_sha)
        result = IngestResult(
            pack_id=pack_id, zip_sha256=zip_sha, limits=dataclasses.asdict(limits)
        )
        with zf:
            rows, already_stored = _store_images(
                lake, zf, limits, result, os.path.join(tmpdir, "member"), progress
            )
    _settle_statuses(lake, pack_id, rows, already_stored, result)
    result.seconds = round(time.perf_counter() - t0, 3)
    _write_pack(lake, pack_id, keys, rows, result)
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
    swept = []
    error, code = None, 0
    try:
        result = ingest_pack(
            lake, args.pack_id, args.key, IngestLimits.from_env(), on_sweep=swept.append
        )
    except (PackUnreadable, PackReplaced) as e:
        error = str(e)
        code = PACK_UNREADABLE if isinstance(e, PackUnreadable) else PACK_REPLACED
    if args.run_id:
        record = {
            "pack_id": args.pack_id,
            "seconds": round(time.perf_counter() - t0, 3),
            "requests": lake.counters.since({}),
            **({"swept": dataclasses.asdict(swept[0])} if swept else {}),
            **({"error": error} if error else {}),
        }
        lake.put(
            result_key(args.run_id, "ingest", args.pack_id),
            json.dumps(record, sort_keys=True).encode(),
        )
    if error:
        print(json.dumps({"pack_id": args.pack_id, "error": error}))
        print(error, file=sys.stderr)
        return code
    print(json.dumps(result.to_json(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A pack's zip, read without trusting it: the limits it is read under, what its central
directory already says is wrong with a member, and a member streamed out with its size and
CRC enforced rather than believed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass

READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
CHUNK = 1 << 20


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


def is_dir(info: zipfile.ZipInfo) -> bool:
    return info.is_dir() or (info.filename.endswith("\\") and info.file_size == 0)


def file_type_reason(info: zipfile.ZipInfo) -> str | None:
    """Symlinks and special files, from the Unix mode that Unix (3) and macOS (19) hosts store."""
    if info.create_system not in (3, 19):
        return None
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink member: not followed"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return f"special file member (type {stat.filemode(mode)[0]}): not a regular file"
    return None


def data_reason(info: zipfile.ZipInfo, limits: IngestLimits) -> str | None:
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


def overlapping_members(infos: list[zipfile.ZipInfo]) -> set[int]:
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


def copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst) -> tuple[str, int]:
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


def hash_zip(f) -> str:
    """The sha256 of the whole file ``f``, left at its start."""
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def open_zip(f, limits: IngestLimits) -> zipfile.ZipFile:
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
    n = sum(1 for i in zf.infolist() if not is_dir(i))
    if n > limits.max_members:
        zf.close()
        raise PackUnreadable(f"zip bomb: {n} members > limit {limits.max_members}")
    return zf


def image_members(lake, key: str) -> tuple[int, int] | None:
    """(members named as images, their uncompressed bytes) of the zip at ``key``, from its
    central directory alone: a few ranged reads, whatever the zip's size (what a plan reads).
    None for what is no readable zip: its ingest records why."""
    from workloads.member_names import is_junk, kind_reason

    fs, base = lake.arrow_filesystem()
    try:
        with fs.open_input_file(f"{base}/{key}") as f, zipfile.ZipFile(f) as zf:
            infos = [
                i
                for i in zf.infolist()
                if not is_dir(i) and not is_junk(i.filename) and kind_reason(i.filename) is None
            ]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    return len(infos), sum(i.file_size for i in infos)

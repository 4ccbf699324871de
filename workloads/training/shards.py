"""WebDataset-format tar shards of a frozen subset: a derived cache that verifies itself.

A shard is a POSIX (ustar) tar whose members come in pairs grouped by key, the name up to its
first dot (WebDataset's convention)::

    <sha256>.<ext>    the image's bytes (ext: the lake key's, e.g. jpg or png)
    <sha256>.json     {"label": ..., "sha256": <the same>, "split": ...}, and for a subset
                      frozen with boxes "boxes": [[category, x, y, w, h, iscrowd], ...] in the
                      original's pixels with its "width" and "height" (what maps them onto
                      the variant: ``preprocess.variant_boxes``)

``sha256`` is that of the image's bytes, so every sample checks itself: ``iter_shard`` refuses
an image whose bytes do not hash to its name, or whose json names another. The index
``write_shards`` returns gives each shard's sha256 too, which also covers the labels: pass it
as ``digests`` and a shard is checked whole (at its end, since it is read as a stream).

Shards are written byte for byte the same for the same samples in the same order (mtime 0,
uid/gid 0, no user names), each up to ``target_bytes``; a sample is never split. They are read
with tarfile's stream mode, so a non-seekable body (an S3 GetObject) does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from workloads.layout import VARIANT_COLUMNS, VARIANT_HASHES
from workloads.versions import canonical_json

TARGET_BYTES = 150_000_000
BLOCK = tarfile.BLOCKSIZE  # 512: a member's header, and the unit its data is padded to
MAX_MEMBER = 256 << 20  # a member this large is no image of a subset: refuse, don't buffer it
_KEY = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"[a-z0-9]{1,16}")

Opener = Callable[[], BinaryIO]


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


SHARDS_FORMAT = 2  # 2: samples carry their boxes (an index of another format is rewritten)
BOX_COLUMNS = ("objects", "width", "height")  # a manifest frozen with boxes has them


def manifest_samples(manifest: pa.Table, variant: str) -> list[dict]:
    """What ``write_shards`` takes for a frozen subset's ``manifest``: each row's ``variant`` lake
    key, its frozen sha256, label and split (and its boxes, when the subset was frozen with
    them), in sha256 order (a pseudo-random order, so each shard mixes the labels and a bounded
    shuffle buffer is enough)."""
    col, digest = VARIANT_COLUMNS[variant], VARIANT_HASHES[variant]
    boxed = set(BOX_COLUMNS) <= set(manifest.schema.names)
    names = [col, digest, "label", "split", *(BOX_COLUMNS if boxed else ())]
    out = []
    for r in manifest.select(list(dict.fromkeys(names))).to_pylist():
        sample = {"key": r[col], "sha256": r[digest], "label": r["label"], "split": r["split"]}
        if boxed:
            sample["boxes"] = [
                [b["category"], b["x"], b["y"], b["w"], b["h"], bool(b.get("iscrowd"))]
                for b in r["objects"] or []
            ]
            sample["width"], sample["height"] = r["width"], r["height"]
        out.append(sample)
    return sorted(out, key=lambda s: s["sha256"] or "")


# -- writing ------------------------------------------------------------------------------------
class _HashingWriter:
    def __init__(self, f: BinaryIO):
        self.f, self.hash, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _ShardWriter:
    """One shard being written: to ``<dir>/.<name>.tmp`` then renamed, or to a temporary file
    handed to ``writer(name, file)`` once complete."""

    def __init__(self, name: str, out: Path | Callable[[str, BinaryIO], None]):
        self.name, self.out = name, out
        if callable(out):
            self.file = tempfile.NamedTemporaryFile(prefix="shard-")  # its .name: an upload's
        else:
            self.tmp = out / f".{name}.tmp"
            self.file = open(self.tmp, "w+b")  # closed by close() or abandon()
        self.stream = _HashingWriter(self.file)
        self.tar = tarfile.open(fileobj=self.stream, mode="w|", format=tarfile.USTAR_FORMAT)
        self.count, self.size = 0, 0

    def add(self, key: str, ext: str, data: bytes, meta: bytes) -> None:
        for member, content in ((f"{key}.{ext}", data), (f"{key}.json", meta)):
            self.tar.addfile(_member(member, len(content)), io.BytesIO(content))
        self.count += 1
        self.size += sample_bytes(data, meta)

    def close(self) -> dict:
        self.tar.close()  # the end-of-archive blocks; the file stays open
        entry = {
            "name": self.name,
            "bytes": self.stream.bytes,
            "count": self.count,
            "sha256": self.stream.hash.hexdigest(),
        }
        if callable(self.out):
            self.file.seek(0)
            self.out(self.name, self.file)
            self.file.close()
        else:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.out / self.name)
        return entry

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self.tar.close()  # or its stream writes its buffer when collected, to a closed file
        self.file.close()
        if not callable(self.out):
            self.tmp.unlink(missing_ok=True)


def sample_bytes(data: bytes, meta: bytes) -> int:
    """What a sample adds to a shard: two headers and the padded contents."""
    return 2 * BLOCK + _padded(len(data)) + _padded(len(meta))


def write_shards(
    items: Iterable[Mapping],
    read_bytes: Callable[[str], bytes],
    out: Path | str | Callable[[str, BinaryIO], None],
    target_bytes: int = TARGET_BYTES,
) -> list[dict]:
    """Write ``items`` (mappings with ``key``: what ``read_bytes`` reads, whose suffix names the
    member's ext unless ``ext`` is given; ``sha256``: of those bytes; ``label``; ``split``;
    optionally ``data``: the bytes, read already), in the order given, as ``shard-000000.tar``,
    ... of up to ``target_bytes`` each (a sample larger than that gets a shard of its own).
    ``out``: a directory, or ``writer(name, file)`` given each complete shard as a named file
    at offset 0 (an upload, say).

    Bytes that do not hash to their item's sha256, and a sha256 given twice, are ValueErrors:
    the cache holds what the subset froze, once. Returns the index: ``[{"name", "bytes",
    "count", "sha256"}]``."""
    if not callable(out):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    index: list[dict] = []
    seen: set[str] = set()
    shard: _ShardWriter | None = None
    try:
        for item in items:
            key, sha = item["key"], item["sha256"]
            ext = (item.get("ext") or Path(key).suffix.lstrip(".")).lower()
            if not sha or not _KEY.fullmatch(sha):
                raise ValueError(f"{key}: sha256 {sha!r} is not 64 lower-case hex digits")
            if not _EXT.fullmatch(ext) or ext == "json":
                raise ValueError(f"{key}: {ext!r} is no image extension a shard member can have")
            if sha in seen:
                raise ValueError(
                    f"{key}: sha256 {sha[:12]} was given twice: a shard keys samples by it "
                    "(drop the repeat, or resolve its labels)"
                )
            seen.add(sha)
            data = item["data"] if "data" in item else read_bytes(key)
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha:
                raise ValueError(
                    f"{key} is not what was frozen: sha256 {actual[:12]} != {sha[:12]}"
                )
            meta = canonical_json(
                {
                    "label": item["label"],
                    "sha256": sha,
                    "split": item["split"],
                    **{k: item[k] for k in ("boxes", "width", "height") if k in item},
                }
            )
            if shard is not None and shard.size + sample_bytes(data, meta) > target_bytes:
                index.append(shard.close())
                shard = None
            if shard is None:
                shard = _ShardWriter(shard_name(len(index)), out)
            shard.add(sha, ext, data, meta)
        if shard is not None:
            index.append(shard.close())
            shard = None
    finally:
        if shard is not None:
            shard.abandon()
    return index


# -- reading ------------------------------------------------------------------------------------
class _HashingReader:
    def __init__(self, f: BinaryIO):
        self.f, self.hash, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.bytes += len(data)
        return data


def iter_shard(
    fileobj: BinaryIO, name: str = "shard", sha256: str | None = None
) -> Iterator[tuple[str, bytes, dict]]:
    """``(sha256, image bytes, meta)`` of each sample of the shard read from ``fileobj`` (read
    once, front to back: a non-seekable stream does), after checking the image's bytes hash to
    its name and its json names the same. With ``sha256`` the whole shard's bytes are checked
    too, once its last sample is read. ValueError naming the shard (and sample) otherwise."""
    stream = _HashingReader(fileobj)
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    raise ValueError(f"shard {name}: member {member.name!r} is not a file")
                k, _, ext = member.name.partition(".")
                if not _KEY.fullmatch(k) or not ext:
                    raise ValueError(f"shard {name}: member {member.name!r} is not <sha256>.<ext>")
                if member.size > MAX_MEMBER:
                    raise ValueError(f"shard {name}: member {member.name} has {member.size} bytes")
                if k != key:
                    if key is not None:
                        yield _sample(name, key, parts)
                    if k in seen:
                        raise ValueError(f"shard {name}: sample {k} appears twice")
                    seen.add(k)
                    key, parts = k, {}
                if ext in parts:
                    raise ValueError(f"shard {name}: sample {k} has two {ext} members")
                parts[ext] = tar.extractfile(member).read()
            if key is not None:
                yield _sample(name, key, parts)
    except tarfile.TarError as e:
        raise ValueError(f"shard {name} is not a readable tar ({e})") from None
    if sha256 is not None:
        while stream.read(1 << 20):  # the end-of-archive padding tarfile stops short of
            pass
        if stream.hash.hexdigest() != sha256:
            raise ValueError(
                f"shard {name} is not what was written: sha256 {stream.hash.hexdigest()[:12]} "
                f"!= {sha256[:12]}"
            )


def _sample(shard: str, key: str, parts: dict[str, bytes]) -> tuple[str, bytes, dict]:
    if "json" not in parts or len(parts) != 2:
        raise ValueError(
            f"shard {shard}: sample {key} has members {', '.join(sorted(parts))}: "
            "expected one image and one json"
        )
    meta_bytes = parts.pop("json")
    (data,) = parts.values()
    actual = hashlib.sha256(data).hexdigest()
    if actual != key:
        raise ValueError(
            f"shard {shard}: sample {key}: the image's bytes hash to {actual[:12]}, not its name"
        )
    try:
        meta = json.loads(meta_bytes)
    except ValueError:
        raise ValueError(f"shard {shard}: sample {key}: its json does not parse") from None
    if not isinstance(meta, dict) or meta.get("sha256") != key:
        raise ValueError(f"shard {shard}: sample {key}: its json names another image")
    return key, data, meta


# -- a frozen subset's shards in the lake ------------------------------------------------------
def _prefetched(items: Iterable[dict], read: Callable[[str], bytes], threads: int) -> Iterator:
    """``items`` in order, each with its ``data`` read by ``threads`` readers ahead of it (at
    most ``4 * threads`` held): an object store's latency paid in parallel."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads)) as pool:
        ahead: deque = deque()
        for item in items:
            ahead.append((item, pool.submit(read, item["key"])))
            if len(ahead) >= 4 * max(1, threads):
                it, data = ahead.popleft()
                yield {**it, "data": data.result()}
        while ahead:
            it, data = ahead.popleft()
            yield {**it, "data": data.result()}


def _split_samples(samples: list[dict]) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The samples of each split, and what is left out: rows without the variant (not made for
    that image) and a variant's bytes a second time (two originals that resize alike)."""
    from workloads.versions import SPLITS

    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    skipped = {"no_variant": 0, "repeated": 0}
    for s in samples:
        if not s["key"] or not s["sha256"]:
            skipped["no_variant"] += 1
        elif s["sha256"] in seen:
            skipped["repeated"] += 1
        else:
            seen.add(s["sha256"])
            out.setdefault(s["split"], []).append(s)
    return out, skipped


def build_subset_shards(
    lake,
    subset: str,
    variant: str,
    target_bytes: int = TARGET_BYTES,
    threads: int = 16,
    say: Callable[[str], None] = print,
) -> dict:
    """Write frozen subset ``subset``'s ``variant`` images as shards under
    ``shard_keys(subset, variant)["base"]``, one set per split, and their index last (the
    commit marker); returns the index. An index of this manifest and target already there: it,
    nothing written. A run killed part way leaves shards but no index; run again, it writes the
    same bytes under the same keys (a shard's bytes are a function of its samples) and the index.

    The manifest must still hash to the subset record's ``manifest_sha256``, and every image to
    its frozen sha256 (ValueError naming it otherwise)."""
    from workloads.lake import get_json, parquet_table
    from workloads.layout import record_key, shard_keys, subset_keys
    from workloads.versions import SPLITS

    keys = shard_keys(subset, variant)
    record = json.loads(lake.get(record_key("subset", subset)))
    manifest = lake.get(subset_keys(subset)["manifest"])
    if hashlib.sha256(manifest).hexdigest() != record["manifest_sha256"]:
        raise ValueError(f"subset {subset}: its manifest is not what was frozen")
    prior = get_json(lake, keys["index"])
    if (
        prior
        and prior.get("manifest_sha256") == record["manifest_sha256"]
        and prior.get("target_bytes") == target_bytes
        and prior.get("format") == SHARDS_FORMAT
    ):
        return prior
    if variant not in VARIANT_COLUMNS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANT_COLUMNS)}")
    splits, skipped = _split_samples(manifest_samples(parquet_table(manifest), variant))
    index = {
        "subset": subset,
        "variant": variant,
        "format": SHARDS_FORMAT,
        "manifest_sha256": record["manifest_sha256"],
        "target_bytes": target_bytes,
        "skipped": skipped,
        "splits": {},
    }
    for split in SPLITS:
        samples = splits.get(split, [])

        def upload(name: str, f, split=split) -> None:
            lake.put_file(f"{keys['base']}/{split}/{name}", f.name)
            say(f"shards {subset}/{variant}: {split}/{name}")

        written = write_shards(
            _prefetched(samples, lake.get, threads), lake.get, upload, target_bytes
        )
        labels: dict[str, int] = {}
        categories: dict[str, int] = {}
        for s in samples:
            if s["label"] is not None:
                labels[str(s["label"])] = labels.get(str(s["label"]), 0) + 1
            for b in s.get("boxes", ()):
                if not b[5]:
                    categories[b[0]] = categories.get(b[0], 0) + 1
        index["splits"][split] = {
            "count": len(samples),
            "labels": dict(sorted(labels.items())),  # the labelled samples, by label
            "unlabelled": len(samples) - sum(labels.values()),
            "categories": dict(sorted(categories.items())),  # boxes (not crowd), by category
            "shards": [{**e, "key": f"{split}/{e['name']}"} for e in written],
        }
    lake.put(keys["index"], canonical_json(index))
    kept = {keys["index"]} | {
        f"{keys['base']}/{e['key']}" for s in index["splits"].values() for e in s["shards"]
    }
    for key in lake.keys(keys["base"] + "/"):  # a previous target's shards
        if key not in kept:
            lake.delete(key)
    return index


def split_shards(root: Path | str, index: dict, split: str) -> tuple[list[Path], list[str]]:
    """The paths (under ``root``, where the index's base is: a FastFile channel, the local
    lake's directory) and sha256s of split ``split``'s shards."""
    entries = index["splits"].get(split, {}).get("shards", [])
    return [Path(root) / e["key"] for e in entries], [e["sha256"] for e in entries]


STATS_IMAGES = 512  # the train images a normalisation is measured on: the shards' first


def first_images(shards: Sequence[Path | Callable[[], BinaryIO]], limit: int) -> list[bytes]:
    """The encoded bytes of the first ``limit`` images of ``shards`` (paths, or callables
    opening a stream), each checked against its name: in sha256 order, a sample of the split
    (what its normalisation is measured on)."""
    out: list[bytes] = []
    for shard in shards:
        with open(shard, "rb") if isinstance(shard, Path) else contextlib.closing(shard()) as f:
            for _, data, _ in iter_shard(f, str(shard)):
                out.append(data)
                if len(out) >= limit:
                    return out
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.training.shards --lake URL --subset S --variant V``: the subset's
    training shards (see ``build_subset_shards``); one JSON line with what was written."""
    import argparse
    import sys
    import time

    from workloads.lake import open_lake

    ap = argparse.ArgumentParser(description="write a frozen subset's images as training shards")
    ap.add_argument("--lake", required=True)
    ap.add_argument("--subset", required=True)
    ap.add_argument("--variant", required=True, choices=sorted(VARIANT_COLUMNS))
    ap.add_argument("--target-mb", type=float, default=TARGET_BYTES / 1e6)
    ap.add_argument("--threads", type=int, default=16, help="objects read at once")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        index = build_subset_shards(
            open_lake(args.lake),
            args.subset,
            args.variant,
            target_bytes=int(args.target_mb * 1e6),
            threads=args.threads,
            say=lambda line: print(line, flush=True),
        )
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"shards of subset {args.subset}: {e}", file=sys.stderr)
        return 1
    splits = index["splits"].values()
    print(
        json.dumps(
            {
                "stage": "shards",
                "subset": args.subset,
                "variant": args.variant,
                "images": sum(s["count"] for s in splits),
                "shards": sum(len(s["shards"]) for s in splits),
                "bytes": sum(e["bytes"] for s in splits for e in s["shards"]),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

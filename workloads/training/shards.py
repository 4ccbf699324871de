"""WebDataset-format tar shards of a frozen subset: a derived cache that verifies itself.

A shard is a POSIX (ustar) tar whose members come in pairs grouped by key, the name up to its
first dot (WebDataset's convention)::

    <sha256>.<ext>    the image's bytes (ext: the lake key's, e.g. jpg or png)
    <sha256>.json     {"label": ..., "sha256": <the same>, "split": ...}

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

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from workloads.layout import VARIANT_COLUMNS, VARIANT_HASHES
from workloads.training.data import AUGMENT_LEVELS, AUGMENTATION, ORDER, Preprocess, image_tensor
from workloads.versions import canonical_json

TARGET_BYTES = 150_000_000
BLOCK = tarfile.BLOCKSIZE  # 512: a member's header, and the unit its data is padded to
MAX_MEMBER = 256 << 20  # a member this large is no image of a subset: refuse, don't buffer it
SHUFFLE = 2  # the word that keeps the shuffle buffer's random stream apart (see data.ORDER)
_KEY = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"[a-z0-9]{1,16}")

Opener = Callable[[], BinaryIO]


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def manifest_samples(manifest: pa.Table, variant: str) -> list[dict]:
    """What ``write_shards`` takes for a frozen subset's ``manifest``: each row's ``variant`` lake
    key, its frozen sha256, label and split, in sha256 order (a pseudo-random order, so each
    shard mixes the labels and a bounded shuffle buffer is enough)."""
    col, digest = VARIANT_COLUMNS[variant], VARIANT_HASHES[variant]
    rows = manifest.select(list(dict.fromkeys([col, digest, "label", "split"]))).to_pylist()
    return sorted(
        (
            {"key": r[col], "sha256": r[digest], "label": r["label"], "split": r["split"]}
            for r in rows
        ),
        key=lambda s: s["sha256"] or "",
    )


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
            self.file = tempfile.TemporaryFile()
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
    member's ext unless ``ext`` is given; ``sha256``: of those bytes; ``label``; ``split``), in
    the order given, as ``shard-000000.tar``, ... of up to ``target_bytes`` each (a sample
    larger than that gets a shard of its own). ``out``: a directory, or ``writer(name, file)``
    given each complete shard as a file at offset 0 (an upload, say).

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
            data = read_bytes(key)
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha:
                raise ValueError(
                    f"{key} is not what was frozen: sha256 {actual[:12]} != {sha[:12]}"
                )
            meta = canonical_json({"label": item["label"], "sha256": sha, "split": item["split"]})
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


# -- the dataset --------------------------------------------------------------------------------
class ShardImages(IterableDataset):
    """Yields ``(FloatTensor (C, S, S), label index)`` for each sample of ``shards`` whose split
    is ``split`` (None: any) and whose label is one of ``classes`` (the index is its place
    there; other samples are skipped), once per epoch.

    ``shards``: paths, or callables opening a binary stream (e.g. an S3 body). ``digests``: the
    index's sha256 of each, to check each shard whole. Each epoch the shard order is drawn from
    ``(seed, epoch)`` (``shuffle``) and worker w of k reads shards w, w + k, ... (with fewer
    shards than workers every worker reads them all and keeps every k-th sample); its samples
    pass through a shuffle buffer of ``buffer`` encoded samples (its memory bound). An image's
    augmentation is drawn from ``(seed, epoch, its sha256)``, whatever worker reads it."""

    def __init__(
        self,
        shards: Sequence[Path | str | Opener],
        classes: Sequence[str],
        preprocess: Preprocess,
        augment: str = "none",
        seed: int = 0,
        shuffle: bool = True,
        buffer: int = 1000,
        split: str | None = None,
        digests: Sequence[str | None] | None = None,
    ):
        if augment not in AUGMENT_LEVELS:
            raise ValueError(f"augment {augment!r}: expected one of {', '.join(AUGMENT_LEVELS)}")
        if digests is not None and len(digests) != len(shards):
            raise ValueError(f"{len(digests)} digests for {len(shards)} shards")
        if int(seed) < 0 or buffer < 1:
            raise ValueError(f"seed must be 0 or more and buffer 1 or more: {seed}, {buffer}")
        self.shards = [s if callable(s) else Path(s) for s in shards]
        self.digests = list(digests) if digests is not None else [None] * len(self.shards)
        self.classes = list(classes)
        self._index = {c: i for i, c in enumerate(self.classes)}
        self.preprocess, self.augment = preprocess, augment
        self.seed, self.shuffle, self.buffer, self.split = int(seed), shuffle, buffer, split
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _name(self, i: int) -> str:
        s = self.shards[i]
        return str(s) if isinstance(s, Path) else getattr(s, "name", None) or f"#{i}"

    def _open(self, i: int):
        s = self.shards[i]
        return open(s, "rb") if isinstance(s, Path) else contextlib.closing(s())

    def _samples(self, mine: Sequence[int], worker: int, every: int):
        """(sha256, bytes, label index) of this worker's samples: all of its shards' (every=1),
        or every ``every``-th sample of all shards from the ``worker``-th."""
        position = 0
        for i in mine:
            with self._open(i) as f:
                for key, data, meta in iter_shard(f, self._name(i), self.digests[i]):
                    position += 1
                    if (position - 1) % every != worker:
                        continue
                    if self.split is not None and meta.get("split") != self.split:
                        continue
                    label = meta.get("label")
                    index = self._index.get(str(label)) if label is not None else None
                    if index is not None:
                        yield key, data, index

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self.shards)
        order = (
            np.random.default_rng([self.seed, self.epoch, ORDER]).permutation(n)
            if self.shuffle
            else np.arange(n)
        ).tolist()
        if n >= workers:
            samples = self._samples(order[worker::workers], 0, 1)
        else:
            samples = self._samples(order, worker, workers)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, SHUFFLE, worker, workers])
            samples = _shuffled(samples, self.buffer, rng)
        for key, data, label in samples:
            rng = None
            if self.augment != "none":
                rng = np.random.default_rng([self.seed, self.epoch, AUGMENTATION, int(key, 16)])
            yield image_tensor(data, key, self.preprocess, self.augment, rng), label


def _shuffled(samples: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """``samples`` in a random order, holding at most ``size`` of them."""
    held: list = []
    for s in samples:
        if len(held) < size:
            held.append(s)
            continue
        j = int(rng.integers(size))
        yield held[j]
        held[j] = s
    for j in rng.permutation(len(held)):
        yield held[j]

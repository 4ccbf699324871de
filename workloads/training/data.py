"""Training input that streams: a frozen subset's images read, verified, decoded, augmented and
normalised one at a time, so memory stays flat however large the subset.

    items = Items.from_manifest(manifest, "resized", classes, split="train")
    pre = Preprocess(32, 3, *channel_stats(items.paths, 3, 32, reader=read))
    data = StreamingImages(items, root, pre, augment="light", seed=0)
    for epoch in range(epochs):
        data.set_epoch(epoch)
        for x, y in loader(data, batch_size=64, workers=2):  # (B, C, S, S) float, (B,) int64
            ...

Every random choice is a function of ``(seed, epoch)`` (the order) or ``(seed, epoch, item)``
(an item's augmentation), never of the number of DataLoader workers: ``loader`` hands each
worker whole batches of the epoch's order, so workers 0, 1 or 8 give the same batches in the
same order. ``Preprocess`` is what evaluation and the export apply too (``preprocess.json``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from workloads.layout import VARIANT_COLUMNS, VARIANT_HASHES
from workloads.training.preprocess import (
    AUGMENT_LEVELS,
    Preprocess,
    augment,
    channel_stats,
    decode,
)
from workloads.training.shards import Opener, iter_shard

__all__ = [
    "AUGMENT_LEVELS",
    "Items",
    "Preprocess",
    "ShardImages",
    "StreamingImages",
    "augment",
    "channel_stats",
    "decode",
    "image_tensor",
    "loader",
]

# Words that keep the random streams apart: (seed, epoch, ORDER) draws an epoch's order,
# (seed, epoch, AUGMENTATION, item) an item's augmentation, (seed, epoch, SHUFFLE, ...) the
# shuffle buffer's picks.
ORDER, AUGMENTATION, SHUFFLE = 0, 1, 2
SHUFFLE_BUFFER = 4096  # encoded images a training holds to shuffle its stream (~4 KB at 32 px)


def image_tensor(
    data: bytes,
    name: str,
    preprocess: Preprocess,
    level: str = "none",
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Encoded ``data`` → float tensor (C, S, S): decoded, augmented at ``level``, normalised."""
    img = decode(data, preprocess.channels, name)
    return torch.from_numpy(preprocess(augment(img, level, rng, preprocess.size)))


# -- the items of a split, held compactly --------------------------------------------------------
class Items:
    """``(relative path, label index, sha256 hex or None)`` rows held as a few flat buffers (the
    paths' UTF-8 in one ``bytes``, ends, labels and digests in numpy arrays): ~50 bytes a row
    beyond the path, no Python object per row, so forked DataLoader workers share the pages
    instead of copying them as they touch per-row objects' reference counts."""

    def __init__(self, rows: Iterable[tuple[str, int, str | None]]):
        blob, ends, labels, digests, has = bytearray(), [], [], bytearray(), []
        for path, label, sha in rows:
            blob += str(path).encode()
            ends.append(len(blob))
            labels.append(int(label))
            digests += bytes.fromhex(sha) if sha else bytes(32)
            has.append(bool(sha))
            if sha and len(digests) != 32 * len(ends):
                raise ValueError(f"{path}: sha256 {sha!r} is not 64 hex digits")
        self._blob = bytes(blob)
        self._ends = np.array(ends, np.int64)
        self.labels = np.array(labels, np.int64)
        self._digests = np.frombuffer(bytes(digests), np.uint8).reshape(-1, 32)
        self._has = np.array(has, bool)

    @classmethod
    def from_manifest(
        cls, manifest: pa.Table, variant: str, classes: Sequence[str], split: str | None = "train"
    ) -> Items:
        """The rows of ``split`` (None: all) whose label is one of ``classes``: the variant's lake
        key, the label's index in ``classes``, the variant's frozen sha256."""
        if variant not in VARIANT_COLUMNS:
            raise ValueError(f"variant {variant!r}: expected one of {sorted(VARIANT_COLUMNS)}")
        col, digest = VARIANT_COLUMNS[variant], VARIANT_HASHES[variant]
        t = manifest.select(list(dict.fromkeys([col, digest, "label", "split"])))
        if split is not None:
            t = t.filter(pc.equal(t["split"], split))
        index = pc.index_in(
            pc.cast(t["label"], pa.string()), value_set=pa.array(classes, pa.string())
        )
        keep = pc.is_valid(index)
        t, index = t.filter(keep), pc.filter(index, keep)
        return cls(zip(t[col].to_pylist(), index.to_pylist(), t[digest].to_pylist(), strict=True))

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start : int(self._ends[i])].decode()

    def digest(self, i: int) -> bytes | None:
        return self._digests[i].tobytes() if self._has[i] else None

    def __getitem__(self, i: int) -> tuple[str, int, str | None]:
        d = self.digest(i)
        return self.path(i), int(self.labels[i]), d.hex() if d is not None else None

    @property
    def paths(self) -> _Paths:
        """The paths as a sequence (what ``channel_stats`` samples from)."""
        return _Paths(self)

    @property
    def nbytes(self) -> int:
        return len(self._blob) + sum(
            a.nbytes for a in (self._ends, self.labels, self._digests, self._has)
        )

    def unverifiable(self) -> list[int]:
        """Indexes of the rows without a sha256."""
        return np.flatnonzero(~self._has).tolist()


class _Paths(Sequence):
    def __init__(self, items: Items):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._items.path(j) for j in range(*i.indices(len(self)))]
        return self._items.path(i if i >= 0 else len(self) + i)


def _read_under(root: Path, key: str) -> bytes:
    return (root / key).read_bytes()


# -- the dataset --------------------------------------------------------------------------------
class StreamingImages(IterableDataset):
    """Yields ``(FloatTensor (C, S, S), label index)`` once per item per epoch.

    ``items``: an ``Items`` or ``(relative path, label index, sha256 hex or None)`` rows.
    ``reader(path)`` gives an item's bytes (default: the file ``root / path``; on S3 e.g. the
    lake's ``get``). ``verify``: each file's sha256 must be the item's (ValueError naming the
    image otherwise; an item without one is refused up front). ``shuffle``: each epoch's order
    is a permutation drawn from ``(seed, epoch)``; an item's augmentation is drawn from
    ``(seed, epoch, its index)``. Iterated by several DataLoader workers, each takes every k-th
    item of the order; ``loader`` instead gives each worker whole batches (``batches``), which
    keeps the batches themselves independent of the number of workers."""

    def __init__(
        self,
        items: Items | Iterable[tuple[str, int, str | None]],
        root: Path | str | None,
        preprocess: Preprocess,
        augment: str = "none",
        seed: int = 0,
        shuffle: bool = True,
        verify: bool = True,
        reader: Callable[[str], bytes] | None = None,
    ):
        if augment not in AUGMENT_LEVELS:
            raise ValueError(f"augment {augment!r}: expected one of {', '.join(AUGMENT_LEVELS)}")
        if int(seed) < 0:
            raise ValueError(f"seed must be 0 or more, not {seed}")
        if reader is None and root is None:
            raise ValueError("StreamingImages needs a root directory or a reader")
        self.items = items if isinstance(items, Items) else Items(items)
        self.root = Path(root) if root is not None else None
        self.preprocess, self.augment = preprocess, augment
        self.seed, self.shuffle, self.verify = int(seed), shuffle, verify
        self.reader = reader or functools.partial(_read_under, self.root)
        self.epoch = 0
        if verify and (missing := self.items.unverifiable()):
            raise ValueError(
                f"{len(missing)} image(s) have no sha256 to verify against (first: "
                f"{self.items.path(missing[0])}): pass verify=False to read them unverified"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def order(self) -> np.ndarray:
        """This epoch's item indexes, in the order they are read."""
        n = len(self.items)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch, ORDER]).permutation(n)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        """Item ``i`` for this epoch: read, verified, decoded, augmented, normalised."""
        path = self.items.path(i)
        data = self.reader(path)
        if self.verify:
            frozen = self.items.digest(i)
            actual = hashlib.sha256(data).digest()
            if actual != frozen:
                raise ValueError(
                    f"image {path} is not what was frozen: sha256 {actual.hex()[:12]} != "
                    f"{frozen.hex()[:12]}"
                )
        rng = None
        if self.augment != "none":
            rng = np.random.default_rng([self.seed, self.epoch, AUGMENTATION, int(i)])
        return image_tensor(data, path, self.preprocess, self.augment, rng), int(
            self.items.labels[i]
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        order = self.order()
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        for i in order:
            yield self.load(int(i))

    def batches(self, batch_size: int, drop_last: bool = False) -> Batches:
        return Batches(self, batch_size, drop_last)


class Batches(IterableDataset):
    """``StreamingImages`` as batches ``(FloatTensor (B, C, S, S), LongTensor (B,))``: the
    epoch's order cut into ``batch_size`` runs, worker w of k making runs w, w + k, ... . The
    DataLoader asks its workers in turn, so the batches come in the order's order, the same
    whatever the number of workers. The epoch is the dataset's, read when iteration starts."""

    def __init__(self, dataset: StreamingImages, batch_size: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, not {batch_size}")
        self.dataset, self.batch_size, self.drop_last = dataset, int(batch_size), drop_last

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.dataset.order()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(worker, len(self), workers):
            run = order[b * self.batch_size : (b + 1) * self.batch_size]
            loaded = [self.dataset.load(int(i)) for i in run]
            yield (
                torch.stack([x for x, _ in loaded]),
                torch.tensor([y for _, y in loaded], dtype=torch.int64),
            )


def loader(
    dataset: IterableDataset, batch_size: int, workers: int, prefetch: int = 2, drop_last=False
) -> DataLoader:
    """A DataLoader over ``dataset`` with ``workers`` processes (0: in this one), each holding at
    most ``prefetch`` batches ahead, started afresh each epoch (so they see ``set_epoch``). A
    dataset with ``batches`` (``StreamingImages``) is batched by it: the same batches in the
    same order for any ``workers``; others are batched by the DataLoader, per worker.

    Workers are forked and leave OpenCV's thread pool as they found it: ``cv2.setNumThreads``
    in a forked child waits forever on the pool's condition variables once the parent's pool
    threads have gone idle."""
    common = {
        "num_workers": workers,
        "persistent_workers": False,
        "prefetch_factor": prefetch if workers else None,
    }
    if hasattr(dataset, "batches"):
        return DataLoader(dataset.batches(batch_size, drop_last), batch_size=None, **common)
    return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **common)


# -- the dataset of shards --------------------------------------------------------------------------------
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
        """(sha256, bytes, target) of this worker's samples: all of its shards' (every=1), or
        every ``every``-th sample of all shards from the ``worker``-th."""
        position = 0
        for i in mine:
            with self._open(i) as f:
                for key, data, meta in iter_shard(f, self._name(i), self.digests[i]):
                    position += 1
                    if (position - 1) % every != worker:
                        continue
                    if self.split is not None and meta.get("split") != self.split:
                        continue
                    target = self.target(meta)
                    if target is not None:
                        yield key, data, target

    def target(self, meta: dict):
        """What a sample's json makes its target: the label's index, None (skipped) for a label
        not in ``classes``."""
        label = meta.get("label")
        return self._index.get(str(label)) if label is not None else None

    def item(self, key: str, data: bytes, target, rng: np.random.Generator | None):
        return image_tensor(data, key, self.preprocess, self.augment, rng), target

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
        for key, data, target in samples:
            rng = None
            if self.augment != "none":
                rng = np.random.default_rng([self.seed, self.epoch, AUGMENTATION, int(key, 16)])
            yield self.item(key, data, target, rng)


class ShardDetections(ShardImages):
    """``ShardImages`` for a detector: yields ``(FloatTensor (C, S, S), targets)`` for every
    sample (an image without boxes is a negative), ``targets`` a dict of arrays of fixed shapes
    (so the DataLoader stacks them): ``detection.encode``'s training targets and the image's
    ground truth, padded to ``MAX_OBJECTS``: ``boxes`` (xyxy in the input's pixels), ``labels``
    (indexes in ``classes``; boxes of other categories are left out), ``crowd``, ``valid``.
    Crowd boxes are no training targets; they stay in the ground truth (evaluation ignores
    what they cover). The augmentation moves the boxes with the image."""

    def __init__(self, *args, variant: str = "original", **kwargs):
        super().__init__(*args, **kwargs)
        self.variant = variant

    def target(self, meta: dict):
        if "boxes" not in meta:
            raise ValueError(
                f"sample {meta.get('sha256', '?')[:12]}: the shards carry no boxes (a subset "
                "frozen before boxes were kept): freeze it again for a detector"
            )
        return meta["boxes"], meta["width"], meta["height"]

    def item(self, key: str, data: bytes, target, rng: np.random.Generator | None):
        from workloads.training.detection import MAX_OBJECTS, encode
        from workloads.training.preprocess import augment_detection, variant_boxes

        boxes, width, height = target
        known = [b for b in boxes if b[0] in self._index]
        pre = self.preprocess
        img = decode(data, pre.channels, key)
        xyxy, kept = variant_boxes(
            [b[1:5] for b in known], width, height, self.variant, img.shape[0]
        )
        img, xyxy, moved = augment_detection(img, xyxy, self.augment, rng, pre.size)
        labels = np.array([self._index[known[i][0]] for i in kept[moved]], np.int64)
        crowd = np.array([bool(known[i][5]) for i in kept[moved]], bool)
        out = encode(xyxy[~crowd], labels[~crowd], len(self.classes), pre.size)
        n = min(len(xyxy), MAX_OBJECTS)
        padded = {
            "boxes": np.zeros((MAX_OBJECTS, 4), np.float32),
            "labels": np.zeros(MAX_OBJECTS, np.int64),
            "crowd": np.zeros(MAX_OBJECTS, bool),
            "valid": np.zeros(MAX_OBJECTS, bool),
        }
        padded["boxes"][:n], padded["labels"][:n] = xyxy[:n], labels[:n]
        padded["crowd"][:n], padded["valid"][:n] = crowd[:n], True
        x = torch.from_numpy(pre(img))
        return x, {k: torch.from_numpy(v) for k, v in {**out, **padded}.items()}


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

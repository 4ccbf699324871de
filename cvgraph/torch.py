"""A PyTorch ``Dataset`` over a frozen subset: reads the lake in place, verifies what it reads."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from workloads.layout import VARIANT_COLUMNS, VARIANT_HASHES
from workloads.training.preprocess import variant_boxes
from workloads.versions import SPLITS, sha256_hex

TARGETS = ("class", "detection")


class SubsetIntegrityError(ValueError):
    """The subset's manifest or an image's bytes are not what was frozen."""


def collate_detection(batch):
    """A ``DataLoader``'s ``collate_fn`` for ``target="detection"``: (images, targets) as tuples,
    since each image has its own number of boxes (what torchvision's detection models take)."""
    return tuple(zip(*batch))


class FrozenSubsetDataset(Dataset):
    """Items are ``(image, target)``; ``image`` is ``transform(HxWx3 uint8 RGB array)`` or, with
    no transform, a float tensor (3, H, W) in [0, 1].

    ``target="class"``: the label's index in ``classes`` (the subset's labels; -1 unlabelled).
    ``target="detection"``: ``{"boxes": FloatTensor[N, 4] xyxy in the returned image's pixels,
    "labels": Int64Tensor[N]}``, indexes in ``classes`` (the subset's box categories; a
    torchvision detector reserves 0 for background: give it ``len(classes) + 1`` classes and
    ``labels + 1``). A ``transform`` sees the image only: boxes follow the variant's geometry,
    not the transform's. Batch with ``collate_fn=collate_detection``."""

    def __init__(
        self,
        key: str,
        variant: str = "resized",
        split: str | None = "train",
        transform=None,
        home: str | None = None,
        target: str = "class",
    ):
        from assets.subsets import load_subset
        from cvgraph.sdk import Datasets

        if variant not in VARIANT_COLUMNS:
            raise ValueError(f"variant {variant!r}: expected one of {sorted(VARIANT_COLUMNS)}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)} or None (all)")
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
        self.lake = Datasets(home).lake
        try:
            self.record, manifest = load_subset(self.lake, key)
        except ValueError as e:
            raise SubsetIntegrityError(str(e)) from None
        if target == "detection" and not {"objects", "width", "height"} <= set(
            manifest.schema.names
        ):
            raise ValueError(
                f"subset {key} was frozen without boxes and image sizes: freeze it under a new key"
            )
        self.key, self.variant, self.split = key, variant, split
        self.transform, self.target = transform, target
        self.classes = (
            sorted({b["category"] for bs in manifest["objects"].to_pylist() for b in bs or []})
            if target == "detection"
            else sorted({str(v) for v in manifest["label"].to_pylist() if v is not None})
        )
        if split is not None:
            manifest = manifest.filter(pc.equal(manifest["split"], split))
        col, digest = VARIANT_COLUMNS[variant], VARIANT_HASHES[variant]
        extra = ["objects", "width", "height"] if target == "detection" else []
        self.rows = manifest.select(
            list(dict.fromkeys(["sha256", "label", col, digest, *extra]))
        ).to_pylist()
        index = {c: i for i, c in enumerate(self.classes)}
        # (object key, frozen sha256, target) per item: __getitem__ does only I/O and decode
        self._items = [
            (r[col], bytes.fromhex(r[digest] or ""), self._target(r, index)) for r in self.rows
        ]

    def _target(self, row: dict, index: dict[str, int]):
        if self.target == "class":
            return index[str(row["label"])] if row["label"] is not None else -1
        boxes = row["objects"] or []
        return boxes, [index[b["category"]] for b in boxes], row["width"], row["height"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        obj, frozen, target = self._items[i]
        data = self.lake.get(obj)
        if hashlib.sha256(data).digest() != frozen:  # the bytes are what was frozen, or nothing
            raise SubsetIntegrityError(
                f"subset {self.key}: {obj} was changed after freezing (sha256 {sha256_hex(data)[:12]} != {frozen.hex()[:12]})"
            )
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise SubsetIntegrityError(f"subset {self.key}: {obj} is not decodable")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if self.target == "detection":
            target = self._detection(target, img.shape[0])
        if self.transform is not None:
            return self.transform(img), target
        return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0), target

    def _detection(self, target, size: int) -> dict:
        boxes, labels, width, height = target
        xyxy, kept = variant_boxes(
            [(b["x"], b["y"], b["w"], b["h"]) for b in boxes], width, height, self.variant, size
        )
        return {
            "boxes": torch.from_numpy(xyxy.astype(np.float32)),
            "labels": torch.tensor(labels, dtype=torch.int64)[torch.from_numpy(kept)],
        }


def streaming_subset(
    key: str,
    variant: str = "resized",
    split: str = "train",
    size: int = 64,
    augment: str = "none",
    seed: int = 0,
    home: str | None = None,
    source: str = "shards",
):
    """The subset's ``split`` as the trainer reads it: an ``IterableDataset`` yielding
    ``(FloatTensor (C, size, size), label index)``, augmented at ``augment``, normalised by the
    split's per-channel mean and std — never the subset in memory. ``source``: ``shards`` (the
    trainer's input: the subset's training shards streamed from the lake, written first if
    missing; ``ShardImages``) or ``objects`` (each image read from the lake when its batch is
    made; ``StreamingImages``); either way every image is checked against its frozen sha256.
    Batch it with ``workloads.training.data.loader(ds, batch_size, workers)``;
    ``ds.set_epoch(n)`` draws epoch n's order and augmentation. ``ds.classes`` are the label
    names, in index order."""
    import functools

    from assets.subsets import load_subset
    from cvgraph.sdk import Datasets
    from workloads.layout import shard_keys
    from workloads.training.data import SHUFFLE_BUFFER, Items, ShardImages, StreamingImages
    from workloads.training.preprocess import Preprocess, channel_stats
    from workloads.training.shards import STATS_IMAGES, first_images
    from workloads.training.spec import channels

    if variant not in VARIANT_COLUMNS:
        raise ValueError(f"variant {variant!r}: expected one of {sorted(VARIANT_COLUMNS)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if source not in ("shards", "objects"):
        raise ValueError(f"source {source!r}: expected shards or objects")
    ds = Datasets(home)
    lake, ch = ds.lake, channels(variant)
    common = {"augment": augment, "seed": seed, "shuffle": split == "train"}
    if source == "shards":
        index = ds.shards(key, variant)
        classes = sorted({c for s in index["splits"].values() for c in s["labels"]})
        base = shard_keys(key, variant)["base"]
        entries = index["splits"][split]["shards"]
        opens = [functools.partial(lake.stream, f"{base}/{e['key']}") for e in entries]
        pre = Preprocess(size, ch, *channel_stats(first_images(opens, STATS_IMAGES), ch, size))
        data = ShardImages(
            opens,
            classes,
            pre,
            buffer=SHUFFLE_BUFFER,
            digests=[e["sha256"] for e in entries],
            **common,
        )
    else:
        try:
            _, manifest = load_subset(lake, key)
        except ValueError as e:
            raise SubsetIntegrityError(str(e)) from None
        classes = sorted({str(v) for v in manifest["label"].to_pylist() if v is not None})
        items = Items.from_manifest(manifest, variant, classes, split)
        pre = Preprocess(size, ch, *channel_stats(items.paths, ch, size, reader=lake.get))
        data = StreamingImages(items, None, pre, reader=lake.get, **common)
    data.classes = classes
    return data

"""A PyTorch ``Dataset`` over a frozen subset: reads the lake in place, verifies what it reads."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from workloads.layout import VARIANT_COLUMNS, VARIANT_HASHES
from workloads.versions import SPLITS, sha256_hex


class SubsetIntegrityError(ValueError):
    """The subset's manifest or an image's bytes are not what was frozen."""


class FrozenSubsetDataset(Dataset):
    """Items are ``(image, label_index)``; ``image`` is ``transform(HxWx3 uint8 RGB array)``
    or, with no transform, a float tensor (3, H, W) in [0, 1]. ``classes`` lists the labels."""

    def __init__(
        self,
        key: str,
        variant: str = "resized",
        split: str | None = "train",
        transform=None,
        home: str | None = None,
    ):
        from assets.subsets import load_subset
        from cvgraph.sdk import Datasets

        if variant not in VARIANT_COLUMNS:
            raise ValueError(f"variant {variant!r}: expected one of {sorted(VARIANT_COLUMNS)}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)} or None (all)")
        self.lake = Datasets(home).lake
        try:
            self.record, manifest = load_subset(self.lake, key)
        except ValueError as e:
            raise SubsetIntegrityError(str(e)) from None
        self.classes = sorted({str(v) for v in manifest["label"].to_pylist() if v is not None})
        if split is not None:
            manifest = manifest.filter(pc.equal(manifest["split"], split))
        self.rows = manifest.select(
            list(
                dict.fromkeys(
                    ["sha256", "label", VARIANT_COLUMNS[variant], VARIANT_HASHES[variant]]
                )
            )
        ).to_pylist()
        self.key, self.variant, self.split, self.transform = key, variant, split, transform
        index = {c: i for i, c in enumerate(self.classes)}
        col, digest = VARIANT_COLUMNS[variant], VARIANT_HASHES[variant]
        # (object key, frozen sha256, label index) per item: __getitem__ does only I/O and decode
        self._items = [
            (
                r[col],
                bytes.fromhex(r[digest] or ""),
                index[str(r["label"])] if r["label"] is not None else -1,
            )
            for r in self.rows
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        obj, frozen, label = self._items[i]
        data = self.lake.get(obj)
        if hashlib.sha256(data).digest() != frozen:  # the bytes are what was frozen, or nothing
            raise SubsetIntegrityError(
                f"subset {self.key}: {obj} was changed after freezing (sha256 {sha256_hex(data)[:12]} != {frozen.hex()[:12]})"
            )
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise SubsetIntegrityError(f"subset {self.key}: {obj} is not decodable")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if self.transform is not None:
            return self.transform(img), label
        return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0), label

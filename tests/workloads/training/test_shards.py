"""WebDataset shards as a cache of a frozen subset: written deterministically, read as a stream,
every sample checked against its name, and a dataset that covers each sample once an epoch."""

from __future__ import annotations

import hashlib
import io
import tarfile

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from workloads.training.data import Preprocess, ShardImages, loader
from workloads.training.shards import (
    iter_shard,
    manifest_samples,
    write_shards,
)

CLASSES = ["a", "b", "c"]
PRE = Preprocess(size=16, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def lake():
    """40 small images by key, and their items (key, sha256, label, split)."""
    rng = np.random.default_rng(3)
    blobs, items = {}, []
    for i in range(40):
        img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        ext = "png" if i % 2 else "jpg"
        ok, enc = cv2.imencode(f".{ext}", img)
        data = enc.tobytes()
        sha = hashlib.sha256(data).hexdigest()
        key = f"resized/p/{sha[:2]}/{sha}.{ext}"
        blobs[key] = data
        split = "val" if i % 10 == 0 else "train"
        items.append({"key": key, "sha256": sha, "label": CLASSES[i % 3], "split": split})
    items.sort(key=lambda s: s["sha256"])
    return blobs, items


class Unseekable(io.RawIOBase):
    """A stream that reads forward only, like an S3 GetObject body."""

    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else self._at + n
        out, self._at = self._data[self._at : end], min(end, len(self._data))
        return out

    def seekable(self) -> bool:
        return False


def test_round_trip_from_a_stream(lake, tmp_path):
    blobs, items = lake
    index = write_shards(items, blobs.__getitem__, tmp_path)
    assert len(index) == 1 and index[0]["count"] == 40 and index[0]["name"] == "shard-000000.tar"
    data = (tmp_path / "shard-000000.tar").read_bytes()
    assert index[0]["bytes"] == len(data) and index[0]["sha256"] == hashlib.sha256(data).hexdigest()
    got = list(iter_shard(Unseekable(data), "s0", index[0]["sha256"]))
    assert [(sha, img) for sha, img, _ in got] == [(s["sha256"], blobs[s["key"]]) for s in items]
    assert [m for _, _, m in got] == [
        {"sha256": s["sha256"], "label": s["label"], "split": s["split"]} for s in items
    ]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        first = tar.getmembers()[:2]
    sha, ext = items[0]["sha256"], items[0]["key"].rsplit(".", 1)[1]
    assert [m.name for m in first] == [f"{sha}.{ext}", f"{sha}.json"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in first)


def test_deterministic_bytes(lake, tmp_path):
    blobs, items = lake
    one = write_shards(items, blobs.__getitem__, tmp_path / "one")
    uploaded = {}
    two = write_shards(items, blobs.__getitem__, lambda name, f: uploaded.update({name: f.read()}))
    assert one == two
    assert uploaded["shard-000000.tar"] == (tmp_path / "one" / "shard-000000.tar").read_bytes()


def test_small_target_splits_between_samples(lake, tmp_path):
    blobs, items = lake
    index = write_shards(items, blobs.__getitem__, tmp_path, target_bytes=8_000)
    assert len(index) > 3 and sum(e["count"] for e in index) == 40
    assert [e["name"] for e in index] == [f"shard-{i:06d}.tar" for i in range(len(index))]
    back = []
    for e in index:
        path = tmp_path / e["name"]
        assert path.stat().st_size == e["bytes"]
        with open(path, "rb") as f:
            back += [sha for sha, _, _ in iter_shard(f, e["name"], e["sha256"])]
    assert back == [s["sha256"] for s in items]
    assert not list(tmp_path.glob(".*.tmp"))


def test_refuses_bytes_that_are_not_the_frozen_ones(lake, tmp_path):
    blobs, items = lake
    wrong = dict(blobs)
    wrong[items[5]["key"]] = b"other bytes"
    with pytest.raises(ValueError, match=f"{items[5]['key']} is not what was frozen"):
        write_shards(items, wrong.__getitem__, tmp_path)
    assert not list(tmp_path.iterdir())  # the half-written shard is gone
    with pytest.raises(ValueError, match="given twice"):
        write_shards([items[0], items[0]], blobs.__getitem__, tmp_path)


def tampered(data: bytes, sha: str, member_ext: str, new: bytes) -> bytes:
    """The shard ``data`` with sample ``sha``'s ``member_ext`` member's bytes replaced."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst,
    ):
        for m in src.getmembers():
            content = src.extractfile(m).read()
            if m.name.startswith(sha) and m.name.endswith(member_ext):
                content = new
                m.size = len(new)
            dst.addfile(m, io.BytesIO(content))
    return out.getvalue()


def test_a_tampered_shard_is_refused(lake, tmp_path):
    blobs, items = lake
    index = write_shards(items[:6], blobs.__getitem__, tmp_path)
    data = (tmp_path / index[0]["name"]).read_bytes()
    victim = items[3]["sha256"]
    ext = items[3]["key"].rsplit(".", 1)[1]
    bad_image = tampered(data, victim, ext, b"\x89PNG other")
    with pytest.raises(ValueError, match=f"shard s0: sample {victim}: the image's bytes"):
        list(iter_shard(io.BytesIO(bad_image), "s0"))
    other = items[4]["sha256"]
    bad_json = tampered(data, victim, "json", f'{{"sha256":"{other}","label":"a"}}'.encode())
    with pytest.raises(ValueError, match=f"sample {victim}: its json names another"):
        list(iter_shard(io.BytesIO(bad_json), "s0"))
    # a relabelled sample hashes right on its own; the shard's digest catches it
    relabelled = tampered(
        data, victim, "json", f'{{"label":"zzz","sha256":"{victim}","split":"train"}}'.encode()
    )
    assert len(list(iter_shard(io.BytesIO(relabelled), "s0"))) == 6
    with pytest.raises(ValueError, match="shard s0 is not what was written"):
        list(iter_shard(io.BytesIO(relabelled), "s0", index[0]["sha256"]))
    with pytest.raises(ValueError, match="shard s0 is not a readable tar"):
        list(iter_shard(io.BytesIO(data[:1000]), "s0"))


def test_shard_images_cover_each_sample_once_with_two_workers(lake, tmp_path):
    blobs, items = lake
    index = write_shards(items, blobs.__getitem__, tmp_path, target_bytes=10_000)
    paths = [tmp_path / e["name"] for e in index]
    train = [s for s in items if s["split"] == "train"]
    expected = sorted(CLASSES.index(s["label"]) for s in train)
    ds = ShardImages(
        paths,
        CLASSES,
        PRE,
        augment="light",
        seed=2,
        buffer=8,
        split="train",
        digests=[e["sha256"] for e in index],
    )
    epochs = []
    for epoch in (0, 0, 1):
        ds.set_epoch(epoch)
        batches = list(loader(ds, 5, 2))
        assert batches[0][0].shape[1:] == (3, 16, 16)
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == expected
        epochs.append(torch.cat([x for x, _ in batches]))
    assert torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[0], epochs[2])


def test_fewer_shards_than_workers_and_openers(lake, tmp_path):
    blobs, items = lake
    index = write_shards(items, blobs.__getitem__, tmp_path)
    data = (tmp_path / index[0]["name"]).read_bytes()
    ds = ShardImages([lambda: Unseekable(data)], CLASSES, PRE, shuffle=False)
    got = sorted(int(y) for _, yb in loader(ds, 7, 2) for y in yb)
    assert got == sorted(CLASSES.index(s["label"]) for s in items)
    # labels outside the classes are skipped
    only_ab = ShardImages([tmp_path / index[0]["name"]], ["a", "b"], PRE, shuffle=False)
    assert {y for _, y in only_ab} == {0, 1}


def test_manifest_samples():
    manifest = pa.table(
        {
            "sha256": ["o1", "o2"],
            "label": ["a", "b"],
            "split": ["train", "val"],
            "edges_key": ["e/2.png", "e/1.png"],
            "edges_sha256": ["f" * 64, "0" * 64],
        }
    )
    assert manifest_samples(manifest, "edges") == [
        {"key": "e/1.png", "sha256": "0" * 64, "label": "b", "split": "val"},
        {"key": "e/2.png", "sha256": "f" * 64, "label": "a", "split": "train"},
    ]

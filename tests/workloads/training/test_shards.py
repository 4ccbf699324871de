"""WebDataset shards as a cache of a frozen subset: written deterministically, read as a stream,
every sample checked against its name, and a dataset that covers each sample once an epoch."""

from __future__ import annotations

import hashlib
import io
import json
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


# -- a frozen subset's shards in the lake -------------------------------------------------------
def frozen(tmp_path, blobs, items, extra_rows=()):
    """The items as a frozen subset ``s`` of a local lake at ``tmp_path``: their bytes at their
    keys, the manifest (plus ``extra_rows``) and its record."""
    from workloads.lake import LocalLake, write_parquet
    from workloads.layout import record_key, subset_keys

    lake = LocalLake(tmp_path)
    for key, data in blobs.items():
        lake.put(key, data)
    rows = [
        {
            "sha256": f"o{i}",
            "label": s["label"],
            "split": s["split"],
            "resized_key": s["key"],
            "resized_sha256": s["sha256"],
        }
        for i, s in enumerate(items)
    ] + list(extra_rows)
    data = write_parquet(lake, subset_keys("s")["manifest"], pa.Table.from_pylist(rows))
    manifest_sha = hashlib.sha256(data).hexdigest()
    lake.put(record_key("subset", "s"), json.dumps({"manifest_sha256": manifest_sha}).encode())
    return lake


def lake_files(root) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "shards" in p.parts
    }


def test_subset_shards_hold_each_split_once_and_are_written_once(lake, tmp_path):
    from workloads.training.shards import main, split_shards

    blobs, items = lake
    unlabelled = dict(items[0], label=None)  # a second row of one image's bytes: kept once
    store = frozen(
        tmp_path,
        blobs,
        items,
        extra_rows=[
            {
                "sha256": "ox",
                "label": None,
                "split": "train",
                "resized_key": unlabelled["key"],
                "resized_sha256": unlabelled["sha256"],
            },
            {
                "sha256": "oy",
                "label": "a",
                "split": "train",
                "resized_key": None,
                "resized_sha256": None,
            },
        ],
    )
    args = ["--lake", str(tmp_path), "--subset", "s", "--variant", "resized", "--target-mb", "0.01"]
    assert main(args) == 0
    index = json.loads(store.get("subsets/s/shards/resized/index.json"))
    assert index["skipped"] == {"no_variant": 1, "repeated": 1}
    for split in ("train", "val", "test"):
        want = [s for s in items if s["split"] == split]
        paths, digests = split_shards(tmp_path / "subsets/s/shards/resized", index, split)
        got = []
        for path, digest in zip(paths, digests, strict=True):
            with open(path, "rb") as f:
                got += [(sha, meta["label"]) for sha, _, meta in iter_shard(f, path.name, digest)]
        assert got == [(s["sha256"], s["label"]) for s in want]
        labels = {c: sum(s["label"] == c for s in want) for c in CLASSES}
        assert index["splits"][split]["labels"] == {c: n for c, n in labels.items() if n}
        assert index["splits"][split]["count"] == len(want)
    assert len(index["splits"]["train"]["shards"]) > 1  # 10 KB shards
    before = lake_files(tmp_path)
    assert main(args) == 0  # nothing to do: the same index, no shard written again
    assert lake_files(tmp_path) == before
    # another size: the shards are rewritten, the old ones go
    assert main([*args[:-1], "0.02"]) == 0
    after = json.loads(store.get("subsets/s/shards/resized/index.json"))
    assert len(after["splits"]["train"]["shards"]) < len(index["splits"]["train"]["shards"])
    listed = {k.split("/shards/resized/", 1)[1] for k in store.keys("subsets/s/shards/")}
    assert listed == {"index.json"} | {
        e["key"] for s in after["splits"].values() for e in s["shards"]
    }


def test_subset_shards_refuse_an_image_that_is_not_the_frozen_one(lake, tmp_path, capsys):
    from workloads.training.shards import main

    blobs, items = lake
    store = frozen(tmp_path, blobs, items)
    store.put(items[7]["key"], b"other bytes")
    assert main(["--lake", str(tmp_path), "--subset", "s", "--variant", "resized"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"shards of subset s: {items[7]['key']} is not what was frozen: sha256 "
        f"{hashlib.sha256(b'other bytes').hexdigest()[:12]} != {items[7]['sha256'][:12]}"
    )
    assert not store.exists("subsets/s/shards/resized/index.json")


@pytest.mark.parametrize("seed", range(3))
def test_a_killed_shards_job_run_again_leaves_what_an_uninterrupted_one_does(lake, tmp_path, seed):
    """SIGKILL the job at a point drawn from the seed (after its k-th shard is in the lake),
    run it again: the lake's shards and index are byte for byte an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    blobs, items = lake
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    frozen(reference, blobs, items)
    frozen(killed, blobs, items)

    def command(root):
        return [
            sys.executable,
            "-m",
            "workloads.training.shards",
            "--lake",
            str(root),
            "--subset",
            "s",
            "--variant",
            "resized",
            "--target-mb",
            "0.005",
        ]

    subprocess.run(command(reference), check=True, capture_output=True)
    shards = sorted((reference / "subsets/s/shards/resized").rglob("shard-*.tar"))
    at = np.random.default_rng(seed).integers(0, len(shards))
    proc = subprocess.Popen(command(killed), stdout=subprocess.PIPE, text=True)
    for _ in range(at + 1):  # a line a shard put
        if not proc.stdout.readline():
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "subsets/s/shards/resized/index.json").exists() or at + 1 >= len(shards)
    subprocess.run(command(killed), check=True, capture_output=True)
    assert lake_files(killed) == lake_files(reference)
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")]

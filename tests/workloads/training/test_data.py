"""The streaming input: preprocessing, augmentation, and a dataset that reads each item once per
epoch, verified, in an order (and with augmentations) that the number of workers does not change."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from workloads.training.data import (
    AUGMENT_LEVELS,
    Items,
    Preprocess,
    StreamingImages,
    augment,
    channel_stats,
    decode,
    loader,
)


def png(img: np.ndarray) -> bytes:
    ok, out = cv2.imencode(".png", img)
    assert ok
    return out.tobytes()


@pytest.fixture
def images(tmp_path):
    """50 PNGs (RGB 40x36, a gray one every fifth) under tmp_path/img/<pp>/<sha>.png:
    (root, rows) with rows (relative path, label, sha256)."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(50):
        shape = (40, 36) if i % 5 == 0 else (40, 36, 3)
        data = png(rng.integers(0, 256, shape, dtype=np.uint8))
        sha = hashlib.sha256(data).hexdigest()
        rel = f"resized/x/{sha[:2]}/{sha}.png"
        path = tmp_path / "img" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append((rel, i % 4, sha))
    return tmp_path / "img", rows


PRE = Preprocess(size=24, channels=3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def test_preprocess_json_round_trip_and_values():
    assert Preprocess.from_json(PRE.to_json()) == PRE
    gray = Preprocess(16, 1, [0.5], [0.25])
    assert Preprocess.from_json(gray.to_json().encode()) == gray and gray.mean == (0.5,)
    img = np.full((24, 24, 3), 255, np.uint8)
    out = PRE(img)
    assert out.dtype == np.float32 and out.shape == (3, 24, 24)
    np.testing.assert_allclose(out[:, 0, 0], [(1 - 0.5) / 0.25, (1 - 0.4) / 0.2, (1 - 0.3) / 0.3])
    # resized to size, gray to RGB and RGB to gray
    assert PRE(np.zeros((50, 30), np.uint8)).shape == (3, 24, 24)
    assert gray(np.zeros((50, 30, 3), np.uint8)).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="mean and std"):
        Preprocess(16, 3, (0.5,), (0.2,))
    with pytest.raises(ValueError, match="version"):
        Preprocess.from_json({**PRE.__dict__, "version": 9})


@pytest.mark.parametrize("level", AUGMENT_LEVELS)
@pytest.mark.parametrize("shape", [(40, 30, 3), (30, 50), (20, 20, 1)])
def test_augment_shapes_and_determinism(level, shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    a = augment(img, level, np.random.default_rng(5), 24)
    b = augment(img, level, np.random.default_rng(5), 24)
    assert a.dtype == np.uint8 and a.shape == (24, 24, *shape[2:])
    assert np.array_equal(a, b)
    if level != "none":
        others = [augment(img, level, np.random.default_rng(s), 24) for s in range(6)]
        assert any(not np.array_equal(a, o) for o in others)


def test_augment_rejects_unknown_level():
    with pytest.raises(ValueError, match="augment 'heavy'"):
        augment(np.zeros((8, 8, 3), np.uint8), "heavy", np.random.default_rng(0), 8)


def test_decode_gives_rgb_or_gray(images):
    root, rows = images
    data = (root / rows[1][0]).read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(decode(data, 3), bgr[:, :, ::-1])
    assert decode(data, 1).shape == (40, 36)
    with pytest.raises(ValueError, match="junk is not a decodable image"):
        decode(b"not an image", 3, "junk")


def test_channel_stats_deterministic_and_plausible(images):
    root, rows = images
    paths = [root / r[0] for r in rows]
    mean, std = channel_stats(paths, channels=3, size=16, limit=20)
    assert (mean, std) == channel_stats(paths, channels=3, size=16, limit=20)
    assert all(0.4 < m < 0.6 for m in mean) and all(0.05 < s < 0.3 for s in std)
    # at the model's resolution: what an area resize to 16 x 16 leaves of each picked image
    arrays = [decode((root / r[0]).read_bytes(), 3) for r in rows]
    small = np.stack([cv2.resize(a, (16, 16), interpolation=cv2.INTER_AREA) for a in arrays])
    x = small.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(
        channel_stats(arrays, 3, 16, limit=50), (x.mean(0), x.std(0)), atol=2e-6
    )
    flat = channel_stats([np.full((8, 8), 51, np.uint8)], channels=1, size=4)
    assert flat == ((0.2,), (0.001,))


def epoch_of(ds: StreamingImages, batch: int, workers: int, epoch: int):
    ds.set_epoch(epoch)
    return list(loader(ds, batch, workers))


def test_every_item_once_and_same_batches_for_any_workers(images):
    root, rows = images
    ds = StreamingImages(rows, root, PRE, augment="standard", seed=3)
    assert len(ds) == 50
    runs = {w: epoch_of(ds, 8, w, 0) for w in (0, 2)}
    for batches in runs.values():
        assert [len(y) for _, y in batches] == [8] * 6 + [2]
        assert batches[0][0].shape == (8, 3, 24, 24) and batches[0][0].dtype == torch.float32
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(r[1] for r in rows)
    for (xa, ya), (xb, yb) in zip(runs[0], runs[2], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the same epoch again: the same batches; another epoch: another order
    again = epoch_of(ds, 8, 2, 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, runs[2], strict=True))
    other = epoch_of(ds, 8, 2, 1)
    assert not torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in again]))


def test_item_iteration_splits_across_workers(images):
    """Iterated item by item (the DataLoader batching), each worker takes every k-th item."""
    root, rows = images
    ds = StreamingImages(rows, root, PRE, augment="light", seed=1)
    # label + the first pixel identify an item; the same seed gives the same tensors
    seen = {}
    for workers in (0, 2):
        dl = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers)
        got = sorted(
            (int(y), round(float(x[0, 0, 0]), 5), round(float(x.sum()), 2))
            for xb, yb in dl
            for x, y in zip(xb, yb, strict=True)
        )
        assert len(got) == 50
        seen[workers] = got
    assert seen[0] == seen[2]


def test_unshuffled_order_and_no_augmentation(images):
    root, rows = images
    ds = StreamingImages(rows, root, PRE, shuffle=False)
    labels = [y for _, y in ds]
    assert labels == [r[1] for r in rows]
    x, _ = next(iter(ds))
    img = cv2.cvtColor(cv2.imread(str(root / rows[0][0]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert torch.equal(x, torch.from_numpy(PRE(img)))


def test_a_changed_file_is_named(images):
    root, rows = images
    tampered = root / rows[17][0]
    tampered.write_bytes(png(np.zeros((40, 36, 3), np.uint8)))
    ds = StreamingImages(rows, root, PRE, shuffle=False)
    with pytest.raises(ValueError, match=f"image {rows[17][0]} is not what was frozen"):
        list(ds)
    with pytest.raises(ValueError, match=rows[17][0]):  # from a worker too
        list(loader(ds, 8, 2))
    assert len(list(StreamingImages(rows, root, PRE, verify=False))) == 50


def test_rows_without_hash_need_verify_off(images):
    root, rows = images
    rows = [*rows[:3], (rows[3][0], rows[3][1], None)]
    with pytest.raises(ValueError, match="no sha256"):
        StreamingImages(rows, root, PRE)
    assert len(list(StreamingImages(rows, root, PRE, verify=False))) == 4


def test_custom_reader(images):
    root, rows = images
    reads = []

    def read(key: str) -> bytes:
        reads.append(key)
        return (root / key).read_bytes()

    ds = StreamingImages(rows[:5], None, PRE, reader=read, shuffle=False)
    assert len(list(ds)) == 5 and reads == [r[0] for r in rows[:5]]


def test_items_are_compact():
    n = 200_000
    rows = ((f"resized/abc123/{i % 256:02x}/{i:064x}.jpg", i % 10, f"{i:064x}") for i in range(n))
    items = Items(rows)
    assert len(items) == n and items[12345] == (
        f"resized/abc123/{12345 % 256:02x}/{12345:064x}.jpg",
        5,
        f"{12345:064x}",
    )
    path_bytes = len(f"resized/abc123/00/{0:064x}.jpg")
    assert items.nbytes <= n * (path_bytes + 50)
    pre = Preprocess(8, 1, (0.5,), (0.5,))
    ds = StreamingImages(items, "/nonexistent", pre)
    assert len(pickle.dumps(ds)) < n * (path_bytes + 60)  # what a spawned worker is sent
    assert items.paths[-1].endswith(f"{n - 1:064x}.jpg") and len(items.paths) == n


def test_items_from_manifest():
    manifest = pa.table(
        {
            "sha256": ["a" * 64, "b" * 64, "c" * 64, "d" * 64],
            "label": ["cat", "dog", None, "cat"],
            "split": ["train", "train", "train", "val"],
            "resized_key": ["r/a.jpg", "r/b.jpg", "r/c.jpg", "r/d.jpg"],
            "resized_sha256": ["1" * 64, "2" * 64, "3" * 64, "4" * 64],
        }
    )
    items = Items.from_manifest(manifest, "resized", ["cat", "dog"], split="train")
    assert [items[i] for i in range(len(items))] == [
        ("r/a.jpg", 0, "1" * 64),
        ("r/b.jpg", 1, "2" * 64),
    ]
    assert len(Items.from_manifest(manifest, "resized", ["cat"], split=None)) == 2


FORK_AFTER_CV2 = """
import sys, time
from pathlib import Path
import cv2, numpy as np
from workloads.training.data import Preprocess, StreamingImages, loader
root, rows = Path(sys.argv[1]), [tuple(r.split(",")) for r in sys.argv[2:]]
rows = [(p, int(y), s) for p, y, s in rows]
big = np.zeros((2000, 2000, 3), np.uint8)
cv2.resize(big, (500, 500), interpolation=cv2.INTER_AREA)  # OpenCV's pool threads start
time.sleep(1)  # ... and go idle, waiting on their condition variables
ds = StreamingImages(rows, root, Preprocess(16, 3, (0.5,) * 3, (0.2,) * 3), augment="standard")
print(sum(len(y) for _, y in loader(ds, 4, 2)))
"""


def test_workers_fork_after_opencv_used_its_threads(images):
    """A forked worker must not reconfigure OpenCV's thread pool: with the parent's pool idle,
    ``cv2.setNumThreads`` in the child never returns."""
    root, rows = images
    args = [",".join(map(str, r)) for r in rows[:12]]
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_AFTER_CV2, str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
        start_new_session=True,  # a hung run's workers go with it
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the DataLoader's forked workers hung")
    assert proc.returncode == 0, err
    assert out.strip() == "12"

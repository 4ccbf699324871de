"""The detector's parts, each against what it must give exactly: targets and their decoding,
boxes moved with the augmented image, COCO scores against hand-counted cases, the detection
shards' samples."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from workloads.training.coco_eval import ImageBoxes, coco_scores
from workloads.training.detection import MAX_OBJECTS, STRIDE, CenterNet, decode, encode, loss
from workloads.training.preprocess import Preprocess, augment_detection, variant_boxes

ARCH = {"task": "detection", "name": "resnet18", "in_channels": 3, "num_classes": 3}


def _perfect_outputs(targets: dict, classes: int, size: int):
    """Head outputs that say exactly what ``targets`` hold: logits +-20 on the heat map's peaks,
    the sizes and offsets at their cells."""
    cells = size // STRIDE
    heat = np.where(targets["heat"] == 1.0, 20.0, -20.0).astype(np.float32)
    wh = np.zeros((2, cells * cells), np.float32)
    off = np.zeros((2, cells * cells), np.float32)
    for slot in np.flatnonzero(targets["mask"]):
        wh[:, targets["index"][slot]] = targets["wh"][slot]
        off[:, targets["index"][slot]] = targets["offset"][slot]
    as_t = lambda a: torch.from_numpy(a).reshape(1, -1, cells, cells)
    return as_t(heat), as_t(wh), as_t(off)


def test_encoded_targets_decode_to_the_same_boxes():
    size = 128
    boxes = np.array([[10.0, 12.0, 50.0, 40.0], [70.5, 80.25, 120.0, 127.0], [3, 90, 17, 104]])
    labels = np.array([0, 2, 1])
    targets = encode(boxes, labels, 3, size)
    assert targets["mask"].sum() == 3 and targets["heat"].shape == (3, 32, 32)
    assert {float(targets["heat"][c].max()) for c in range(3)} == {1.0}
    dets = decode(*_perfect_outputs(targets, 3, size), k=10)[0].numpy()
    found = dets[dets[:, 4] > 0.5]
    assert len(found) == 3
    got = sorted((int(d[5]), *np.round(d[:4], 3)) for d in found)
    want = sorted((int(c), *np.round(b, 3)) for b, c in zip(boxes, labels))
    assert got == want


def test_no_boxes_make_an_all_negative_target_and_a_finite_loss():
    targets = encode(np.zeros((0, 4)), np.zeros(0, np.int64), 2, 64)
    assert targets["heat"].max() == 0 and targets["mask"].sum() == 0
    net = CenterNet({**ARCH, "num_classes": 2, "input_size": 64})
    batch = {k: torch.from_numpy(v)[None] for k, v in targets.items()}
    value, parts = loss(net(torch.zeros(1, 3, 64, 64)), batch)
    assert torch.isfinite(value) and parts["size"] == 0 and parts["offset"] == 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_the_detector_has_a_stride_4_heat_map_per_class(name):
    net = CenterNet({**ARCH, "name": name, "input_size": 128}).eval()
    heat, size, offset = net(torch.zeros(2, 3, 128, 128))
    assert heat.shape == (2, 3, 32, 32) and size.shape == offset.shape == (2, 2, 32, 32)
    # starts at the prior: every cell says "no object" with p = 0.01
    assert torch.sigmoid(heat).mean().item() == pytest.approx(0.01, rel=0.5)


def test_a_detector_refuses_what_it_cannot_be_built_on():
    with pytest.raises(ValueError, match="resnet18 or mobilenet_v3_small"):
        CenterNet({**ARCH, "name": "small_cnn", "input_size": 128})
    with pytest.raises(ValueError, match="multiple of 32"):
        CenterNet({**ARCH, "input_size": 100})


def _white_box_image(h: int, w: int, box) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    return img


@pytest.mark.parametrize("seed", range(12))
def test_augmentation_moves_the_boxes_with_the_image(seed):
    """A white rectangle on black: after the crop, resize and flip, the returned box is where
    the white pixels are (within a pixel of the resize)."""
    box = (40, 30, 90, 70)
    img = _white_box_image(100, 140, box)
    out, moved, kept = augment_detection(
        img, np.array([box], float), "light", np.random.default_rng(seed), 64
    )
    assert out.shape == (64, 64, 3)
    if not len(kept):  # the crop left less than MIN_VISIBLE of it
        return
    ys, xs = np.nonzero(out[:, :, 0] > 127)
    seen = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.abs(np.array(seen) - moved[0]).max() <= 1.0, (seen, moved[0])


def test_no_augmentation_stretches_boxes_with_the_image():
    img = _white_box_image(80, 160, (20, 10, 60, 50))
    out, moved, kept = augment_detection(img, np.array([[20, 10, 60, 50]]), "none", None, 32)
    assert kept.tolist() == [0]
    assert moved.tolist() == [[4.0, 4.0, 12.0, 20.0]]


def test_variant_boxes_follow_the_resize_and_centre_crop():
    # 200 x 100 → short side 50: 100 x 50, crop x from 25; a box wholly left of the crop is gone
    xyxy, kept = variant_boxes([(60, 20, 40, 40), (0, 0, 20, 20)], 200, 100, "resized", 50)
    assert kept.tolist() == [0]
    assert xyxy.tolist() == [[5.0, 10.0, 25.0, 30.0]]


def _boxes(rows, scores=None, crowd=None) -> ImageBoxes:
    arr = np.array([r[:4] for r in rows], float).reshape(-1, 4)
    labels = np.array([r[4] for r in rows], np.int64)
    return ImageBoxes(
        arr,
        labels,
        scores=None if scores is None else np.array(scores, float),
        crowd=None if crowd is None else np.array(crowd, bool),
    )


def test_coco_scores_of_perfect_detections_are_one():
    truth = [_boxes([(0, 0, 10, 10, 0), (20, 20, 40, 40, 1)]), _boxes([(5, 5, 30, 30, 1)])]
    found = [
        _boxes([(0, 0, 10, 10, 0), (20, 20, 40, 40, 1)], [0.9, 0.8]),
        _boxes([(5, 5, 30, 30, 1)], [0.7]),
    ]
    s = coco_scores(truth, found, ["a", "b"])
    assert (s["map"], s["map50"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert s["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert s["boxes"] == 3 and s["pr"]["a"]["precision"][0] == pytest.approx(1.0)


def test_coco_scores_count_a_miss_and_a_false_detection():
    """Class b: two boxes, one found exactly: precision 1 up to recall 0.5, then nothing; COCO
    interpolates over 101 recall points, 51 of them (0, 0.01, ..., 0.5) reached: AP 51/101 at
    every IoU threshold."""
    truth = [_boxes([(0, 0, 10, 10, 1), (50, 50, 70, 70, 1)])]
    found = [_boxes([(0, 0, 10, 10, 1)], [0.9])]
    s = coco_scores(truth, found, ["a", "b"])
    assert s["per_class"] == {"b": pytest.approx(51 / 101)}
    assert "a" not in s["per_class"]  # no ground truth: no AP, not in the mean
    # a false detection scoring above the hit halves the precision at every recall reached
    found = [_boxes([(80, 0, 90, 10, 1), (0, 0, 10, 10, 1)], [0.95, 0.9])]
    s = coco_scores(truth, found, ["a", "b"])
    assert s["per_class"]["b"] == pytest.approx(0.5 * 51 / 101)


def test_a_detection_on_a_crowd_box_is_no_false_positive():
    truth = [_boxes([(0, 0, 10, 10, 0), (30, 30, 90, 90, 0)], crowd=[False, True])]
    on_crowd = [_boxes([(40, 40, 60, 60, 0), (0, 0, 10, 10, 0)], [0.95, 0.9])]
    s = coco_scores(truth, on_crowd, ["a"])
    assert s["map"] == pytest.approx(1.0) and s["boxes"] == 2
    nothing = coco_scores(truth, [_boxes([], [])], ["a"])
    assert nothing["map"] == 0.0 and nothing["per_class"] == {"a": 0.0}


def test_detection_shards_carry_the_boxes_through_to_the_targets(tmp_path):
    """A sample's boxes (original pixels, crowd flag) come out of ShardDetections in the input's
    pixels; crowd boxes are ground truth but not training targets; other categories dropped."""
    import cv2

    from workloads.training.data import ShardDetections
    from workloads.training.shards import write_shards

    img = _white_box_image(100, 200, (20, 10, 60, 50))
    data = cv2.imencode(".png", img)[1].tobytes()
    sha = hashlib.sha256(data).hexdigest()
    boxes = [["a", 20, 10, 40, 40, False], ["b", 100, 40, 50, 50, True], ["z", 0, 0, 5, 5, False]]
    item = {"key": "x.png", "data": data, "sha256": sha, "label": None, "split": "train"}
    index = write_shards([{**item, "boxes": boxes, "width": 200, "height": 100}], None, tmp_path)
    pre = Preprocess(64, 3, (0.0,) * 3, (1.0,) * 3)
    ds = ShardDetections(
        [tmp_path / index[0]["name"]], ["a", "b"], pre, shuffle=False, variant="original"
    )
    [(x, t)] = list(ds)
    assert x.shape == (3, 64, 64)
    valid = t["valid"].numpy()
    assert valid.sum() == 2 and t["boxes"].shape == (MAX_OBJECTS, 4)
    assert t["boxes"][:2].numpy() == pytest.approx(
        np.array([[6.4, 6.4, 19.2, 32.0], [32.0, 25.6, 48.0, 57.6]]), abs=1e-5
    )
    assert t["labels"][:2].tolist() == [0, 1] and t["crowd"][:2].tolist() == [False, True]
    assert t["mask"].sum() == 1 and t["heat"][1].max() == 0  # the crowd box is no target


def _entry(tmp_path, name: str, shards, hp: dict):
    import os
    import subprocess
    import sys

    cfg = tmp_path / name / "config"
    cfg.mkdir(parents=True)
    (cfg / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hp.items()}))
    env = {
        **os.environ,
        "SM_CHANNEL_SHARDS": str(shards),
        "SM_INPUT_CONFIG_DIR": str(cfg),
        "SM_MODEL_DIR": str(tmp_path / name / "model"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / name / "output"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "workloads.training.train"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_killed_detection_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """The entry SIGKILLed once its first epoch is checkpointed, then run again with the same
    checkpoint directory: the same weights, bit for bit, and the same history as a training never
    interrupted (the order and augmentation are functions of the seed and the epoch)."""
    import signal

    from bench.training import detection_subset
    from workloads.lake import LocalLake
    from workloads.training.models import load_record

    lake = LocalLake(tmp_path / "lake")
    shards = lake.path(detection_subset(lake, 40))
    hp = {
        "task": "detection",
        "epochs": 2,
        "input_size": 64,
        "batch_size": 8,
        "workers": 0,
        "width": 8,
    }

    def run(name: str, kill_after: str | None = None) -> str:
        p = _entry(tmp_path, name, shards, {**hp, "checkpoint_dir": tmp_path / name / "ckpt"})
        lines = []
        for line in p.stdout:
            lines.append(line)
            if kill_after and line.startswith(kill_after):
                p.send_signal(signal.SIGKILL)
                break
        p.wait()
        return "".join(lines)

    clean = run("clean")
    assert "test_map=" in clean, clean[-2000:]
    killed = run("killed", kill_after="epoch=1 ")
    assert "test_map=" not in killed
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "ckpt").symlink_to(tmp_path / "killed" / "ckpt")
    again = run("again")
    assert "resumed from checkpoint at epoch 1" in again, again[-2000:]
    want = load_record(tmp_path / "clean" / "model" / "model.pt")
    got = load_record(tmp_path / "again" / "model" / "model.pt")
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for k, v in want["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), k
    metrics = [
        json.loads((tmp_path / n / "model" / "metrics.json").read_text())
        for n in ("clean", "again")
    ]
    for m in metrics:
        for h in m["history"]:
            h.pop("seconds")
    assert metrics[0]["history"] == metrics[1]["history"]
    assert metrics[0]["test_map"] == metrics[1]["test_map"]

"""Faults: a worker or an ingest killed with SIGKILL part-way never leaves partial output a
reader can see, and a re-run converges to exactly what a clean run writes."""

import hashlib
import io
import itertools
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cvgraph.demo_packs import sample_image, zip_bytes
from workloads.image_params import ImageParams
from workloads.index import build_raw_index, committed_packs
from workloads.ingest import ingest_pack
from workloads.kernels import EdgeParams, ResizeParams
from workloads.lake import LocalLake, parquet_table
from workloads.layout import pack_keys, result_key

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "c5"  # every generated image is ground to this sha256 prefix: one prefix, much work
N_IMAGES = 200
SOURCES = [
    "retina.jpg",
    "hubble_deep_field.jpg",
    "china.jpg",
    "flower.jpg",
    "rocket.jpg",
    "astronaut.png",
    "coffee.png",
    "motorcycle_left.png",
]
SIZE = 64
PARAMS = ImageParams(ResizeParams(size=SIZE), EdgeParams())


def with_prefix(jpeg: bytes, prefix: str) -> bytes:
    """The same JPEG with a comment segment before EOI chosen so its sha256 starts with ``prefix``."""
    assert jpeg[-2:] == b"\xff\xd9"
    head = hashlib.sha256(jpeg[:-2])
    for nonce in itertools.count():
        tail = b"\xff\xfe" + struct.pack(">H", 10) + nonce.to_bytes(8, "big") + b"\xff\xd9"
        h = head.copy()
        h.update(tail)
        if h.hexdigest().startswith(prefix):
            return jpeg[:-2] + tail


@pytest.fixture(scope="module")
def big_pack() -> dict[str, bytes]:
    """N_IMAGES distinct real-content JPEGs (crops, rotations, flips of the sample photos), 800x600."""
    rng = np.random.default_rng(42)
    sources = []
    for name in SOURCES:
        img = cv2.imdecode(np.frombuffer(sample_image(name), np.uint8), cv2.IMREAD_COLOR)
        scale = max(1.0, 900 / min(img.shape[:2]))
        sources.append(cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC))
    members = {}
    for i in range(N_IMAGES):
        src = sources[i % len(sources)]
        y, x = rng.integers(0, src.shape[0] - 600 + 1), rng.integers(0, src.shape[1] - 800 + 1)
        crop = np.rot90(src[y : y + 600, x : x + 800], k=(i // len(sources)) % 4)
        if (i // (4 * len(sources))) % 2:
            crop = crop[:, ::-1]
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(crop), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        members[f"{SOURCES[i % len(SOURCES)].split('.')[0]}/img_{i:03d}.jpg"] = with_prefix(
            buf.tobytes(), PREFIX
        )
    assert len({hashlib.sha256(b).digest() for b in members.values()}) == N_IMAGES
    return members


def run_cli(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fails if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"process ended before the kill (exit {proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("nothing appeared before the timeout")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def visible(lake: LocalLake, prefix: str) -> list[str]:
    return [o.key for o in lake.list(prefix)]


def fully_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # strict: a truncated file raises
    except Exception:
        return False
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


def outputs(lake: LocalLake) -> dict[str, bytes]:
    return {k: lake.get(k) for k in visible(lake, "resized/") + visible(lake, "edges/")}


def images_args(lake: LocalLake, run_id: str) -> list[str]:
    return [
        "--lake",
        str(lake.root),
        "--run-id",
        run_id,
        "--stages",
        "resize,edges",
        "--prefixes",
        PREFIX,
        "--size",
        str(SIZE),
        "--threads",
        "1",
    ]


def ingested_lake(root: Path, members: dict[str, bytes]) -> LocalLake:
    lake = LocalLake(root)
    lake.put("incoming/big.zip", zip_bytes(members))
    ingest_pack(lake, "big", "incoming/big.zip")
    assert build_raw_index(lake, [PREFIX])[PREFIX]["images"] == N_IMAGES
    return lake


def test_killed_image_worker_leaves_nothing_partial_and_a_rerun_converges(tmp_path, big_pack):
    clean = ingested_lake(tmp_path / "clean", big_pack)
    proc = run_cli("workloads.images", *images_args(clean, "r1"))
    assert proc.wait(300) == 0, proc.stderr.read().decode()
    clean_records = {
        s: json.loads(clean.get(result_key("r1", s, PREFIX))) for s in ("resize", "edges")
    }
    assert clean_records["resize"]["images"] == N_IMAGES and clean_records["resize"]["failed"] == []

    lake = ingested_lake(tmp_path / "faulty", big_pack)
    resized_dir = f"resized/{PARAMS.resize_id}/{PREFIX}/"
    proc = run_cli("workloads.images", *images_args(lake, "r1"))
    kill_when(proc, lambda: len(visible(lake, resized_dir)) >= 10)
    seen = outputs(lake)
    done = {stage: sum(k.startswith(stage) for k in seen) for stage in ("resized/", "edges/")}
    assert 10 <= done["resized/"] < N_IMAGES, "the kill did not land mid-prefix"
    assert not visible(lake, "_results/r1/")  # the unfinished prefix task has no record
    broken = [k for k, data in seen.items() if not fully_decodes(data)]
    assert not broken, broken
    assert all(data == clean.get(k) for k, data in seen.items())  # what is visible is already final

    proc = run_cli("workloads.images", *images_args(lake, "r2"))
    assert proc.wait(300) == 0, proc.stderr.read().decode()
    for stage, out_dir in (("resize", "resized/"), ("edges", "edges/")):
        record = json.loads(lake.get(result_key("r2", stage, PREFIX)))
        assert record["data_version"] == clean_records[stage]["data_version"]
        assert record["images"] == N_IMAGES and record["failed"] == []
        assert (
            record["processed"] == N_IMAGES - done[out_dir]
        )  # it resumed: finished outputs were kept
    assert outputs(lake) == outputs(clean)


def test_killed_ingest_commits_nothing_and_a_rerun_equals_a_clean_ingest(tmp_path, big_pack):
    early = {
        "early/shared.jpg": next(iter(big_pack.values())),
        "early/own.png": sample_image("coffee.png"),
    }

    def prepare(root: Path) -> LocalLake:
        lake = LocalLake(root)
        lake.put("incoming/early.zip", zip_bytes(early))
        ingest_pack(lake, "early", "incoming/early.zip")  # a committed pack that shares one image
        lake.put("incoming/big.zip", zip_bytes(big_pack))
        return lake

    clean = prepare(tmp_path / "clean")
    clean_result = ingest_pack(clean, "big", "incoming/big.zip").to_json()
    assert (clean_result["accepted"], clean_result["duplicates"]) == (N_IMAGES - 1, 1)

    lake = prepare(tmp_path / "faulty")
    proc = run_cli(
        "workloads.ingest",
        "--lake",
        str(lake.root),
        "--pack-id",
        "big",
        "--key",
        "incoming/big.zip",
    )
    kill_when(
        proc, lambda: len(visible(lake, "raw/")) > 2 + 3
    )  # early's 2 objects, then a few of big's
    stored = len(visible(lake, "raw/"))
    assert stored < 2 + N_IMAGES - 1, "the kill did not land mid-pack"
    assert not lake.exists(pack_keys("big")["record"]) and not lake.exists(
        pack_keys("big")["manifest"]
    )
    assert committed_packs(lake) == ["early"]
    assert (
        build_raw_index(lake, [PREFIX])[PREFIX]["images"] == 1
    )  # only early's shared image is indexed

    proc = run_cli(
        "workloads.ingest",
        "--lake",
        str(lake.root),
        "--pack-id",
        "big",
        "--key",
        "incoming/big.zip",
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().splitlines()[-1])
    assert {k: v for k, v in result.items() if k != "seconds"} == {
        k: v for k, v in clean_result.items() if k != "seconds"
    }
    read = lambda lk: parquet_table(lk.get(pack_keys("big")["manifest"])).to_pylist()
    assert read(lake) == read(clean)
    assert visible(lake, "raw/") == visible(clean, "raw/")
    assert committed_packs(lake) == ["big", "early"]


def worker_pids(lake: LocalLake) -> list[int]:
    """Processes running ``workloads.images`` on ``lake`` (the pool's workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"workloads.images" in cmd and str(lake.root).encode() in cmd:
            pids.append(int(entry.name))
    return pids


def test_a_pool_worker_aborted_mid_prefix_is_rerun_and_the_run_converges(tmp_path, big_pack):
    """A worker that dies by a signal (here SIGABRT, as a native abort does) is run again by the
    local pool, as Batch retries a reclaimed child; the run then succeeds with a clean run's bytes."""
    import os

    import dagster as dg

    from resources.compute import LocalProcessPool

    clean = ingested_lake(tmp_path / "clean", big_pack)
    assert run_cli("workloads.images", *images_args(clean, "r1")).wait(300) == 0
    lake = ingested_lake(tmp_path / "lake", big_pack)
    resized_dir = f"resized/{PARAMS.resize_id}/{PREFIX}/"
    aborted: list[int] = []

    def abort_mid_prefix() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(visible(lake, resized_dir)) < 10:
            time.sleep(0.002)
        for pid in worker_pids(lake):
            os.kill(pid, signal.SIGABRT)
            aborted.append(pid)

    import threading

    killer = threading.Thread(target=abort_mid_prefix)
    killer.start()
    LocalProcessPool(max_workers=1, threads_per_worker=1).run_image_stages(
        dg.build_asset_context(), str(lake.root), "r1", ["resize", "edges"], [PREFIX], PARAMS
    )
    killer.join()
    assert len(aborted) == 1, "the abort did not land on the worker"
    record = json.loads(lake.get(result_key("r1", "resize", PREFIX)))
    assert (
        record["images"] == N_IMAGES
        and record["failed"] == []
        and 0 < record["processed"] < N_IMAGES
    )  # the retry kept the finished outputs
    assert (
        record["data_version"]
        == json.loads(clean.get(result_key("r1", "resize", PREFIX)))["data_version"]
    )
    assert outputs(lake) == outputs(clean)

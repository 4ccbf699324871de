"""Training with the defaults on the packs the tests build: ``python -m bench.training``.

Each pack (scikit-learn's digits, four classes of colour photos) is laid out as a frozen subset
would be — originals' sha256 decide the split, the ``resized`` variant made by the product's own
kernel — its training shards written by the product's own job code, and the training entry
(``workloads.training.train``) runs on them with SageMaker's layout, as the local trainer runs
it. Prints one JSON line: each pack's test accuracy, best epoch and wall time under the spec
given (``--spec '{"arch": "resnet18"}'``) over the defaults.

``--scale 2000,200000``: the entry's peak RSS and time to its first step at two subset sizes.
``--input 2000``: images a second delivered to a training loop from the shards vs from an
object per image, both over S3 (a moto server on 127.0.0.1; each request waits ``--latency``
seconds before it is sent, as S3's first byte takes).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from workloads.lake import LocalLake

PACKS = ("digits", "photos")


def pack_members(pack: str) -> dict[str, bytes]:
    """The pack's ``{"<label>/<name>": bytes}``, as a user's zip holds them."""
    from cvgraph.demo_packs import digit_members, photo_class_members

    return digit_members(size=96) if pack == "digits" else photo_class_members()


SUBSET = "bench"


def as_subset(lake, table) -> str:
    """``table`` (the manifest's columns) frozen as subset ``SUBSET`` of ``lake`` (its images
    already there) and its ``resized`` training shards written; the shards' base key."""
    from workloads.lake import write_parquet
    from workloads.layout import record_key, shard_keys, subset_keys
    from workloads.training.shards import build_subset_shards
    from workloads.versions import sha256_hex

    data = write_parquet(lake, subset_keys(SUBSET)["manifest"], table)
    lake.put(
        record_key("subset", SUBSET), json.dumps({"manifest_sha256": sha256_hex(data)}).encode()
    )
    build_subset_shards(lake, SUBSET, "resized", say=lambda line: None)
    return shard_keys(SUBSET, "resized")["base"]


def subset_layout(members: dict[str, bytes], root: Path) -> Path:
    """Write ``members``' resized variants in a lake at ``root``, frozen as a subset with its
    training shards; the shards' directory."""
    import pyarrow as pa

    from workloads.ingest import inspect_image
    from workloads.kernels import ResizeParams, resize_bytes
    from workloads.versions import split_for

    rows = []
    for name, data in sorted(members.items()):
        sha = hashlib.sha256(data).hexdigest()
        fmt, w, h = inspect_image(__import__("io").BytesIO(data), max_pixels=1 << 28)
        resized = resize_bytes(data, fmt, w, h, ResizeParams())
        key = f"resized/{sha[:2]}/{sha}.jpg"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(resized)
        rows.append(
            {
                "sha256": sha,
                "label": name.split("/", 1)[0],
                "split": split_for(sha),
                "resized_key": key,
                "resized_sha256": hashlib.sha256(resized).hexdigest(),
            }
        )
    lake = LocalLake(root)
    return lake.path(as_subset(lake, pa.Table.from_pylist(rows)))


def job_env(shards: Path, spec: dict, work: Path) -> dict:
    """SageMaker's layout under ``work`` for a training of ``spec`` on the training shards at
    ``shards`` (hyperparameters written as SageMaker writes them: strings); its environment."""
    for d in ("config", "model", "output", "checkpoints"):
        (work / d).mkdir(parents=True, exist_ok=True)
    hp = {**spec, "checkpoint_dir": str(work / "checkpoints")}
    (work / "config" / "hyperparameters.json").write_text(
        json.dumps({k: str(v) for k, v in hp.items()})
    )
    return {
        **os.environ,
        "SM_INPUT_CONFIG_DIR": str(work / "config"),
        "SM_CHANNEL_SHARDS": str(shards),
        "SM_MODEL_DIR": str(work / "model"),
        "SM_OUTPUT_DATA_DIR": str(work / "output"),
    }


def run_entry(env: dict) -> float:
    """The training entry run in ``env`` (``job_env``'s); its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "workloads.training.train"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None,
    )
    return time.perf_counter() - t0


def train_on(shards: Path, spec: dict, work: Path) -> dict:
    """The training entry on the shards; its metrics and wall time."""
    seconds = run_entry(job_env(shards, spec, work))
    metrics = json.loads((work / "model" / "metrics.json").read_text())
    return {
        "test_accuracy": metrics["test_accuracy"],
        "best_epoch": metrics["best_epoch"],
        "epochs": len(metrics["history"]),
        "counts": metrics["counts"],
        "seconds": round(seconds, 1),
    }


def detection_subset(lake, n: int, seed: int = 0, subset: str = SUBSET) -> str:
    """The demo's shapes pack (``n`` images, ``cvgraph.demo_packs.shape_members``) in ``lake``
    (a ``LocalLake`` or an ``S3Lake``) as subset ``subset`` frozen with its boxes, and its
    ``original`` training shards written; the shards' base key."""
    import pyarrow as pa

    from cvgraph.demo_packs import shape_members
    from workloads.annotations import BOX_TYPE
    from workloads.lake import write_parquet
    from workloads.layout import record_key, shard_keys, subset_keys
    from workloads.training.shards import build_subset_shards
    from workloads.versions import sha256_hex, split_for

    members, coco = shape_members(n, seed=seed)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes: dict[int, list] = {}
    for a in coco["annotations"]:
        x, y, w, h = (float(v) for v in a["bbox"])
        boxes.setdefault(a["image_id"], []).append(
            {"category": names[a["category_id"]], "x": x, "y": y, "w": w, "h": h, "iscrowd": False}
        )
    rows = []
    for image in coco["images"]:
        data = members[f"images/{image['file_name']}"]
        sha = hashlib.sha256(data).hexdigest()
        key = f"raw/{sha[:2]}/{sha}.jpg"
        lake.put(key, data)
        rows.append(
            {
                "sha256": sha,
                "label": None,
                "split": split_for(sha),
                "original_key": key,
                "width": image["width"],
                "height": image["height"],
                "objects": boxes.get(image["id"], []),
            }
        )
    schema = pa.schema(
        [
            ("sha256", pa.string()),
            ("label", pa.string()),
            ("split", pa.string()),
            ("original_key", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("objects", pa.list_(BOX_TYPE)),
        ]
    )
    data = write_parquet(lake, subset_keys(subset)["manifest"], pa.Table.from_pylist(rows, schema))
    lake.put(
        record_key("subset", subset), json.dumps({"manifest_sha256": sha256_hex(data)}).encode()
    )
    build_subset_shards(lake, subset, "original", say=lambda line: None)
    return shard_keys(subset, "original")["base"]


def measure_detection(n: int = 300, spec: dict | None = None) -> dict:
    """A detector trained with the defaults (and ``spec``) on the shapes pack: its test mAP,
    mAP@0.5, AP per class, epochs and wall time."""
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        lake = LocalLake(Path(tmp) / "lake")
        shards = lake.path(detection_subset(lake, n))
        seconds = run_entry(
            job_env(shards, {"task": "detection", **(spec or {})}, Path(tmp) / "job")
        )
        metrics = json.loads((Path(tmp) / "job" / "model" / "metrics.json").read_text())
    return {
        "test_map": metrics["test_map"],
        "test_map50": metrics["test_map50"],
        "per_class": metrics["test_per_class"],
        "best_epoch": metrics["best_epoch"],
        "epochs": len(metrics["history"]),
        "counts": metrics["counts"],
        "boxes": metrics["boxes"],
        "input_size": metrics["hyperparameters"]["input_size"],
        "arch": metrics["hyperparameters"]["arch"],
        "seconds": round(seconds, 1),
    }


def synthetic_images(n: int, root: Path):
    """``n`` distinct 16 px PNGs of four colour classes (noise on a class colour) written as a
    lake's ``resized`` variant at ``root``; the manifest's columns (a pyarrow table)."""
    import cv2
    import numpy as np
    import pyarrow as pa

    from workloads.versions import split_for

    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], np.int16)
    cols = {k: [] for k in ("sha256", "label", "split", "resized_key", "resized_sha256")}
    made = set()
    for pp in range(256):
        (root / "resized" / f"{pp:02x}").mkdir(parents=True, exist_ok=True)
    for start in range(0, n, 1000):  # noise drawn a thousand images at a time
        count = min(1000, n - start)
        labels = np.arange(start, start + count) % 4
        noise = rng.integers(-40, 41, (count, 16, 16, 3), dtype=np.int16)
        imgs = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        for label, img in zip(labels, imgs, strict=True):
            data = cv2.imencode(".png", img)[1].tobytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha in made:
                continue
            made.add(sha)
            key = f"resized/{sha[:2]}/{sha}.png"
            (root / key).write_bytes(data)
            for k, v in zip(cols, (sha, str(label), split_for(sha), key, sha), strict=True):
                cols[k].append(v)
    return pa.table(cols)


SCALE_SPEC = {"arch": "small_cnn", "epochs": 1, "input_size": 16, "batch_size": 256, "workers": 0}


def scale(n: int, work: Path) -> dict:
    """The training entry on an ``n``-image subset, one epoch: its own peak RSS (``bench.rss``)
    and the time from its start to its first optimizer step (its ``first_step_s`` line)."""
    root = work / f"scale-{n}"
    t0 = time.perf_counter()
    lake = LocalLake(root)
    shards = lake.path(as_subset(lake, synthetic_images(n, root)))
    built = time.perf_counter() - t0
    job = root / "job"
    env = job_env(shards, SCALE_SPEC, job)
    rss = job / "rss.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.rss",
            str(rss),
            "--",
            sys.executable,
            "-m",
            "workloads.training.train",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    first = next(
        float(ln.split("=", 1)[1]) for ln in out.splitlines() if ln.startswith("first_step_s=")
    )
    usage = json.loads(rss.read_text())
    return {
        "images": n,
        "subset_built_s": round(built, 1),
        "peak_rss_mb": round(usage["maxrss_kb"] / 1024, 1),
        "first_step_s": round(first, 3),
        "wall_s": round(usage["wall_s"], 1),
    }


def measure_scale(sizes=(2_000, 200_000)) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-scale-") as tmp:
        runs = [scale(n, Path(tmp)) for n in sizes]
    small, large = runs
    return {
        "runs": runs,
        "peak_rss_mb": large["peak_rss_mb"],
        "peak_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "first_step_ratio": round(large["first_step_s"] / small["first_step_s"], 3),
    }


def _with_latency(client, seconds: float) -> Counter:
    """Make every request of the boto3 ``client`` wait ``seconds`` before it is sent (S3's time
    to a first byte, which a server on 127.0.0.1 does not have); the counter it returns counts
    them."""
    sent: Counter = Counter()

    def wait(**_kwargs) -> None:  # None: botocore goes on to send the request
        sent["requests"] += 1
        time.sleep(seconds)

    client.meta.events.register("before-send.s3", wait)
    return sent


def _images_a_second(dataset) -> tuple[int, float]:
    """(images, images a second) a training loop gets from ``dataset`` (the entry's loader, no
    workers: its default for a subset this size)."""
    from workloads.training.data import loader

    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader(dataset, 64, 0))
    return n, n / (time.perf_counter() - t0)


@contextlib.contextmanager
def s3_endpoint():
    """An S3 endpoint on 127.0.0.1 for the input measurement: ``CVGRAPH_BENCH_S3_ENDPOINT`` if
    set (any S3-compatible server), else moto's standalone server started as a process of its
    own (installed with the test extras), stopped after."""
    if url := os.environ.get("CVGRAPH_BENCH_S3_ENDPOINT"):
        yield url
        return
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # a line a request otherwise
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{server} did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def measure_input(n: int = 2_000, latency: float = 0.02) -> dict:
    """Images a second into the training loop over S3 with ``latency`` a request: from the
    subset's shards (a stream per shard) vs an object per image (``StreamingImages`` reading
    each image with the lake's ``get``, as the trainer did before shards)."""
    import functools

    from workloads.lake import get_json, parquet_table
    from workloads.layout import shard_keys, subset_keys
    from workloads.s3lake import S3Lake
    from workloads.training.data import Items, Preprocess, ShardImages, StreamingImages

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with s3_endpoint() as url:
        lake = S3Lake("s3://bench-input/lake", endpoint_url=url)
        lake.client.create_bucket(Bucket="bench-input")
        with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
            table = synthetic_images(n, Path(tmp))
            for key in table["resized_key"].to_pylist():
                lake.put_file(key, Path(tmp) / key)
        base = as_subset(lake, table)
        requests = _with_latency(lake.client, latency)  # from here on: S3's latency
        index = get_json(lake, shard_keys(SUBSET, "resized")["index"])
        classes = sorted(index["splits"]["train"]["labels"])
        pre = Preprocess(size=16, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
        entries = [e for split in index["splits"].values() for e in split["shards"]]
        shards = ShardImages(
            [functools.partial(lake.stream, f"{base}/{e['key']}") for e in entries],
            classes,
            pre,
            shuffle=False,
            digests=[e["sha256"] for e in entries],
        )
        manifest = parquet_table(lake.get(subset_keys(SUBSET)["manifest"]))
        items = Items.from_manifest(manifest, "resized", classes, split=None)
        before = requests["requests"]
        got_shards, shard_rate = _images_a_second(shards)
        shard_requests = requests["requests"] - before
        objects = StreamingImages(items, None, pre, shuffle=False, reader=lake.get)
        before = requests["requests"]
        got_objects, object_rate = _images_a_second(objects)
        object_requests = requests["requests"] - before
    if got_shards != got_objects:
        raise SystemExit(f"the shards gave {got_shards} images, the objects {got_objects}")
    return {
        "images": got_shards,
        "latency_s": latency,
        "shards": len(entries),
        "shards_images_per_s": round(shard_rate, 1),
        "shards_requests": shard_requests,
        "per_object_images_per_s": round(object_rate, 1),
        "per_object_requests": object_requests,
        "ratio": round(shard_rate / object_rate, 2),
    }


def measure(packs=PACKS, spec: dict | None = None) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for pack in packs:
            root = Path(tmp) / pack
            shards = subset_layout(pack_members(pack), root)
            out[pack] = train_on(shards, spec or {}, root / "job")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pack", choices=PACKS, action="append")
    ap.add_argument("--spec", default="{}", help="JSON: spec fields over the defaults")
    ap.add_argument(
        "--scale",
        default="",
        help="instead: peak RSS and time to the first step at two subset sizes, e.g. 2000,200000",
    )
    ap.add_argument(
        "--input",
        type=int,
        default=0,
        help="instead: images a second from shards vs per object over S3, on this many images",
    )
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to each request")
    ap.add_argument(
        "--detection",
        type=int,
        default=0,
        help="instead: a detector with the defaults (and --spec) on a shapes pack of this many images",
    )
    args = ap.parse_args()
    if args.detection:
        print(json.dumps(measure_detection(args.detection, json.loads(args.spec))))
        return
    if args.input:
        print(json.dumps(measure_input(args.input, args.latency)))
        return
    if args.scale:
        print(json.dumps(measure_scale(tuple(int(n) for n in args.scale.split(",")))))
        return
    print(json.dumps(measure(args.pack or PACKS, json.loads(args.spec))))


if __name__ == "__main__":
    main()

"""Training with the defaults on the packs the tests build: ``python -m bench.training``.

Each pack (scikit-learn's digits, four classes of colour photos) is laid out as a frozen subset
would be — originals' sha256 decide the split, the ``resized`` variant made by the product's own
kernel — and the training entry (``workloads.training.train``) runs on it with SageMaker's
layout, as the local trainer runs it. Prints one JSON line: each pack's test accuracy, best
epoch and wall time under the spec given (``--spec '{"arch": "resnet18"}'``) over the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKS = ("digits", "photos")


def pack_members(pack: str) -> dict[str, bytes]:
    """The pack's ``{"<label>/<name>": bytes}``, as a user's zip holds them."""
    from cvgraph.demo_packs import digit_members, photo_class_members

    return digit_members(size=96) if pack == "digits" else photo_class_members()


def subset_layout(members: dict[str, bytes], root: Path) -> Path:
    """Write ``members``' resized variants under ``root`` and a manifest of them; its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    manifest = root / "manifest" / "manifest.parquet"
    manifest.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def job_env(manifest: Path, images: Path, spec: dict, work: Path) -> dict:
    """SageMaker's layout under ``work`` for a training of ``spec`` on the subset laid out at
    ``images`` (hyperparameters written as SageMaker writes them: strings); its environment."""
    for d in ("config", "model", "output", "checkpoints"):
        (work / d).mkdir(parents=True, exist_ok=True)
    hp = {**spec, "checkpoint_dir": str(work / "checkpoints")}
    (work / "config" / "hyperparameters.json").write_text(
        json.dumps({k: str(v) for k, v in hp.items()})
    )
    return {
        **os.environ,
        "SM_INPUT_CONFIG_DIR": str(work / "config"),
        "SM_CHANNEL_MANIFEST": str(manifest.parent),
        "SM_CHANNEL_IMAGES": str(images),
        "SM_MODEL_DIR": str(work / "model"),
        "SM_OUTPUT_DATA_DIR": str(work / "output"),
    }


def train_on(manifest: Path, images: Path, spec: dict, work: Path) -> dict:
    """The training entry on the layout; its metrics and wall time."""
    env = job_env(manifest, images, spec, work)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "workloads.training.train"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None,
    )
    seconds = time.perf_counter() - t0
    metrics = json.loads((work / "model" / "metrics.json").read_text())
    return {
        "test_accuracy": metrics["test_accuracy"],
        "best_epoch": metrics["best_epoch"],
        "epochs": len(metrics["history"]),
        "counts": metrics["counts"],
        "seconds": round(seconds, 1),
    }


def synthetic_subset(n: int, root: Path) -> Path:
    """``n`` distinct 16 px PNGs of four colour classes (noise on a class colour) laid out as a
    subset's ``resized`` variant, and its manifest; the manifest's path."""
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    manifest = root / "manifest" / "manifest.parquet"
    manifest.parent.mkdir(parents=True)
    pq.write_table(pa.table(cols), manifest)
    return manifest


SCALE_SPEC = {"arch": "small_cnn", "epochs": 1, "input_size": 16, "batch_size": 256, "workers": 0}


def scale(n: int, work: Path) -> dict:
    """The training entry on an ``n``-image subset, one epoch: its own peak RSS (``bench.rss``)
    and the time from its start to its first optimizer step (its ``first_step_s`` line)."""
    root = work / f"scale-{n}"
    t0 = time.perf_counter()
    manifest = synthetic_subset(n, root)
    built = time.perf_counter() - t0
    job = root / "job"
    env = job_env(manifest, root, SCALE_SPEC, job)
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


def measure(packs=PACKS, spec: dict | None = None) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for pack in packs:
            root = Path(tmp) / pack
            manifest = subset_layout(pack_members(pack), root)
            out[pack] = train_on(manifest, root, spec or {}, root / "job")
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
    args = ap.parse_args()
    if args.scale:
        print(json.dumps(measure_scale(tuple(int(n) for n in args.scale.split(",")))))
        return
    print(json.dumps(measure(args.pack or PACKS, json.loads(args.spec))))


if __name__ == "__main__":
    main()

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


def train_on(manifest: Path, images: Path, spec: dict, work: Path) -> dict:
    """The training entry on the layout; its metrics and wall time."""
    for d in ("config", "model", "output", "checkpoints"):
        (work / d).mkdir(parents=True, exist_ok=True)
    hp = {**spec, "checkpoint_dir": str(work / "checkpoints")}
    (work / "config" / "hyperparameters.json").write_text(
        json.dumps({k: str(v) for k, v in hp.items()})
    )
    env = {
        **os.environ,
        "SM_INPUT_CONFIG_DIR": str(work / "config"),
        "SM_CHANNEL_MANIFEST": str(manifest.parent),
        "SM_CHANNEL_IMAGES": str(images),
        "SM_MODEL_DIR": str(work / "model"),
        "SM_OUTPUT_DATA_DIR": str(work / "output"),
    }
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
    args = ap.parse_args()
    print(json.dumps(measure(args.pack or PACKS, json.loads(args.spec))))


if __name__ == "__main__":
    main()

"""A labeller model's classes for the images of one pack: the pack's rows of the ``predictions``
table, scored by an exported classifier (ONNX) in onnxruntime.

The pack's manifest says which images it holds (each distinct sha256 once); each original is
read from the lake and made the model's input as the export's ``preprocess.json`` says
(``workloads.training.model_input``, what ``cvgraph predict`` applies), in batches of ``BATCH``
in sha256 order, so the same pack and export always give the same floats. A row is the image's
top class and its softmax probability: ``(sha256, model, version, class, probability, pack)``.
Labels are not touched: they stay in the index and ``images.label``.

What a task writes, in order: the part (``tables/predictions/<pack>.parquet``, one object,
replaced whole), the pictures (a confidence histogram, a grid of the least confident images),
then the pack's scoring record (``packs/<pack>/predictions/predictions.json``), the commit
marker: its ``data_version`` says what was scored with what. A task killed before the record is
run again from the start and writes the same bytes; one that finds its record current does
nothing. Dagster-free: a Batch worker runs it, or a local process.

    python -m workloads.predictions --lake URL --run-id R --pack P --model M --version 3 \\
        --onnx exports/M/onnx/model.onnx --onnx-sha256 S --preprocess exports/M/preprocess.json
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workloads.lake import get_json, read_parquet, write_parquet
from workloads.layout import (
    PREDICTIONS,
    pack_keys,
    prediction_keys,
    raw_key,
    result_key,
    versions_key,
)
from workloads.versions import canonical_json

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("model", pa.string()),  # the labeller's model key (its registered model's name)
        ("version", pa.int64()),  # the registered version whose export scored it
        ("class", pa.string()),  # its top class
        ("probability", pa.float64()),  # softmax of the logits, of that class
        ("pack", pa.string()),  # the pack whose scoring made the row
    ]
)
# 1: the top class per image; a change of what a row is re-scores every pack (it is part of the
# data version)
ROWS_VERSION = 1
BATCH = 64  # images per onnxruntime call, always in sha256 order: the same floats every run
READ_THREADS = 8
HISTOGRAM_BINS = 20
LEAST_CONFIDENT = 16  # images in the grid


@dataclass(frozen=True)
class Scoring:
    """What scores a pack: the export of ``model`` v``version`` (its ONNX file, checked against
    ``onnx_sha256``) and its ``preprocess.json``."""

    pack: str
    model: str
    version: int
    onnx_key: str
    onnx_sha256: str
    preprocess_key: str


def pack_version(pack_record: dict) -> str:
    """A pack's data version, as the ``raw_packs`` asset gives it: its zip and how it was read."""
    return f"{pack_record['zip_sha256'][:24]}.r{pack_record.get('reader', 1)}"


def predictions_version(pack_data_version: str, onnx_sha256: str) -> str:
    """The data version of a pack's predictions: f(the pack's data version, the export's ONNX
    sha256), so a new pack or another champion's export is another version."""
    key = f"{ROWS_VERSION}:{pack_data_version}:{onnx_sha256}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def pack_images(lake, pack: str) -> list[tuple[str, str]]:
    """(sha256, lake key of the original) of each distinct image of the pack, by sha256."""
    manifest = read_parquet(lake, pack_keys(pack)["manifest"]).select(["sha256", "ext"])
    first = manifest.group_by("sha256").aggregate([("ext", "min")])
    rows = sorted(zip(first["sha256"].to_pylist(), first["ext_min"].to_pylist()))
    return [(sha, raw_key(sha, ext)) for sha, ext in rows]


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax of each row of ``logits`` (float64, from the export's float32)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _session(onnx: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # a worker is one vCPU: no thread pool to share it
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(onnx, sess_options=opts, providers=["CPUExecutionProvider"])


def _inputs(
    blobs: list[bytes], shas: list[str], pre: dict
) -> tuple[list[int], np.ndarray | None, list[dict]]:
    """(indexes of the images that made an input, their stacked inputs, failures)."""
    from workloads.training.model_input import model_input

    ok, xs, failed = [], [], []
    for i, (data, sha) in enumerate(zip(blobs, shas)):
        try:
            xs.append(model_input(data, pre)[0])
            ok.append(i)
        except ValueError as e:  # BadMember too: what ingest would say of it
            failed.append({"sha256": sha, "reason": str(e)})
    return ok, (np.stack(xs) if xs else None), failed


def score_pack(lake, job: Scoring, say=print) -> dict:
    """Score every image of ``job.pack`` with ``job``'s export; returns the pack's scoring record
    (nothing is done when the record is current). ValueError: the export is not the one the job
    names (changed since), or not a classifier's."""
    keys = prediction_keys(job.pack)
    pack_record = get_json(lake, pack_keys(job.pack)["record"])
    if pack_record is None:
        raise ValueError(f"pack {job.pack} is not ingested (no {pack_keys(job.pack)['record']})")
    version = predictions_version(pack_version(pack_record), job.onnx_sha256)
    done = get_json(lake, keys["record"])
    if done and done["data_version"] == version and lake.exists(keys["part"]):
        say(f"pack {job.pack}: already scored by {job.model} v{job.version}")
        return done
    onnx = lake.get(job.onnx_key)
    got = hashlib.sha256(onnx).hexdigest()
    if got != job.onnx_sha256:
        raise ValueError(
            f"{job.onnx_key} has sha256 {got[:12]}, not {job.onnx_sha256[:12]}: the export "
            "changed since this scoring was asked for; ask again"
        )
    pre = json.loads(lake.get(job.preprocess_key))
    if pre["output"]["name"] != "logits":
        raise ValueError(
            f"model {job.model} is not a classifier (its output: {pre['output']['name']})"
        )
    classes = pre["output"]["classes"]
    session = _session(onnx)
    name = session.get_inputs()[0].name
    images = pack_images(lake, job.pack)
    rows: list[dict] = []
    failed: list[dict] = []
    least: list[tuple[float, str]] = []  # a max-heap (negated) of the least confident
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(images), BATCH):
            batch = images[start : start + BATCH]
            blobs = list(pool.map(lake.get, [k for _, k in batch]))
            ok, x, bad = _inputs(blobs, [s for s, _ in batch], pre)
            failed += bad
            if x is not None:
                probs = probabilities(session.run(None, {name: x})[0])
                for i, p in zip(ok, probs):
                    top = int(p.argmax())
                    row = {
                        "sha256": batch[i][0],
                        "model": job.model,
                        "version": job.version,
                        "class": classes[top],
                        "probability": float(p[top]),
                        "pack": job.pack,
                    }
                    rows.append(row)
                    heapq.heappush(least, (-row["probability"], row["sha256"]))
                    if len(least) > LEAST_CONFIDENT:
                        heapq.heappop(least)
            say(f"pack {job.pack}: scored {min(start + BATCH, len(images))}/{len(images)} images")
    table = pa.Table.from_pylist(rows, schema=PREDICTIONS_SCHEMA)
    write_parquet(lake, keys["part"], table)  # one object: readers see the old rows or these
    by_sha = {r["sha256"]: r for r in rows}
    weakest = [by_sha[s] for _, s in sorted((-p, s) for p, s in least)]
    counts, _ = np.histogram(
        [r["probability"] for r in rows], bins=HISTOGRAM_BINS, range=(0.0, 1.0)
    )
    title = f"{job.model} v{job.version} on pack {job.pack}"
    lake.put(keys["least_confident"], grid_png(lake, weakest, raw_keys=dict(images), title=title))
    lake.put(keys["confidence"], histogram_png(counts.tolist(), title=title))
    record = {
        "pack": job.pack,
        "model": job.model,
        "version": job.version,
        "onnx_key": job.onnx_key,
        "onnx_sha256": job.onnx_sha256,
        "pack_version": pack_version(pack_record),
        "rows_version": ROWS_VERSION,
        "data_version": version,
        "images": len(rows),
        "failed": len(failed),
        "failures": failed[:20],
        "classes": _counts(table),
        "mean_probability": round(float(np.mean([r["probability"] for r in rows])), 6)
        if rows
        else None,
        "histogram": {"bins": HISTOGRAM_BINS, "counts": counts.tolist()},
        "least_confident": [{k: r[k] for k in ("sha256", "class", "probability")} for r in weakest],
        "part": keys["part"],
        "pictures": {k: keys[k] for k in ("confidence", "least_confident")},
    }
    lake.put(keys["record"], json.dumps(record, indent=2, sort_keys=True).encode())
    say(f"pack {job.pack}: {len(rows)} rows by {job.model} v{job.version} ({len(failed)} failed)")
    return record


def _counts(table: pa.Table) -> dict[str, int]:
    """Rows per class."""
    return dict(
        sorted((r["values"], r["counts"]) for r in pc.value_counts(table["class"]).to_pylist())
    )


# -- pictures (OpenCV: the worker has no matplotlib) -----------------------------------------
INK, PAPER, BAR = (40, 40, 40), (255, 255, 255), (237, 107, 79)  # BGR
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img: np.ndarray, text: str, at: tuple[int, int], scale: float = 0.4) -> None:
    cv2.putText(img, text, at, FONT, scale, INK, 1, cv2.LINE_AA)


def _png(img: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("PNG encoding failed")
    return png.tobytes()


def histogram_png(counts: list[int], title: str) -> bytes:
    """A bar chart of the images per probability bin over [0, 1]."""
    width, height, left, bottom, top = 520, 260, 44, 36, 30
    img = np.full((height, width, 3), PAPER, np.uint8)
    plot_w, plot_h = width - left - 16, height - bottom - top
    peak = max(counts) if counts and max(counts) else 1
    bar = plot_w / max(1, len(counts))
    for i, n in enumerate(counts):
        h = round(plot_h * n / peak)
        x0 = left + round(i * bar)
        cv2.rectangle(
            img,
            (x0 + 1, height - bottom - h),
            (left + round((i + 1) * bar) - 1, height - bottom),
            BAR,
            -1,
        )
    cv2.line(img, (left, height - bottom), (width - 16, height - bottom), INK, 1)
    cv2.line(img, (left, top), (left, height - bottom), INK, 1)
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + round(f * plot_w)
        _text(img, f"{f:g}", (x - 8, height - bottom + 16))
    _text(img, str(peak), (4, top + 8))
    _text(img, "0", (28, height - bottom))
    _text(img, "images per probability of the top class", (left, height - 6))
    _text(img, f"confidence: {title}", (left, 18), 0.45)
    return _png(img)


TILE, CAPTION, COLUMNS = 96, 18, 4


def grid_png(lake, rows: list[dict], raw_keys: dict[str, str], title: str) -> bytes:
    """The ``rows``' images (least confident first), each captioned with its class and
    probability, ``COLUMNS`` a row."""
    from workloads.training.preprocess import decode

    n = max(1, len(rows))
    cols = min(COLUMNS, n)
    lines = -(-n // cols)
    img = np.full((24 + lines * (TILE + CAPTION), cols * TILE, 3), PAPER, np.uint8)
    _text(img, f"least confident: {title}"[: cols * 14], (4, 16))
    for i, r in enumerate(rows):
        y, x = 24 + (i // cols) * (TILE + CAPTION), (i % cols) * TILE
        try:
            rgb = decode(lake.get(raw_keys[r["sha256"]]), 3)
        except ValueError:
            continue
        h, w = rgb.shape[:2]
        s = (TILE - 4) / max(h, w)
        small = cv2.resize(
            rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
        )
        sh, sw = small.shape[:2]
        oy, ox = y + (TILE - sh) // 2, x + (TILE - sw) // 2
        img[oy : oy + sh, ox : ox + sw] = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        _text(img, f"{r['class']} {r['probability']:.2f}"[:14], (x + 4, y + TILE + 12))
    return _png(img)


# -- the scored packs: one object, what the labeller sensor reads -----------------------------
SCORED = versions_key("pack_predictions")
SWAP_ATTEMPTS = 50


def scored_packs(lake) -> dict[str, dict]:
    """``{pack: what scored it}`` (``data_version``, ``pack_version``, ``onnx_sha256``, model,
    version, champion): one read."""
    data = get_json(lake, SCORED)
    return data["packs"] if data else {}


def _swap(lake, change) -> None:
    """``change(packs)`` applied to the scored packs by compare-and-swap (another run's change
    read again and kept, never overwritten)."""
    for attempt in range(SWAP_ATTEMPTS):
        data, tag = lake.get_tagged(SCORED)
        packs = json.loads(data)["packs"] if data else {}
        if not change(packs):
            return
        if lake.put_if_match(SCORED, canonical_json({"packs": packs}), tag):
            return
        time.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # jittered: swappers spread out
    raise RuntimeError(f"{SCORED}: changed by another writer {SWAP_ATTEMPTS} times in a row")


def record_scored(lake, pack: str, entry: dict) -> None:
    """Set ``pack``'s entry of the scored packs (a no-op when it is already ``entry``)."""

    def change(packs: dict) -> bool:
        if packs.get(pack) == entry:
            return False
        packs[pack] = entry
        return True

    _swap(lake, change)


def forget_predictions(lake, pack: str) -> int:
    """A forgotten pack's rows leave the ``predictions`` table, and its entry the scored packs
    (its record and pictures go with the pack's own objects); returns the objects removed."""
    part = prediction_keys(pack)["part"]
    removed = int(lake.exists(part))
    if removed:
        lake.delete(part)
    _swap(lake, lambda packs: packs.pop(pack, None) is not None)
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=f"score a pack's images: its rows of `{PREDICTIONS}`")
    ap.add_argument("--lake", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", required=True, type=int)
    ap.add_argument("--onnx", required=True, help="the lake key of the ONNX export")
    ap.add_argument("--onnx-sha256", required=True)
    ap.add_argument("--preprocess", required=True, help="the lake key of its preprocess.json")
    args = ap.parse_args(argv)
    from workloads.tasks import open_task_lake

    lake = open_task_lake(args)
    job = Scoring(
        pack=args.pack,
        model=args.model,
        version=args.version,
        onnx_key=args.onnx,
        onnx_sha256=args.onnx_sha256,
        preprocess_key=args.preprocess,
    )
    before, t0 = dict(lake.counters), time.perf_counter()
    try:
        record = score_pack(lake, job, say=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as e:  # said in one line: the step's failure
        error = f"predictions of pack {args.pack}: {e}"
        print(error, file=sys.stderr, flush=True)
        result = {"pack": args.pack, "stage": PREDICTIONS, "error": error}
        lake.put(result_key(args.run_id, PREDICTIONS, args.pack), canonical_json(result))
        return 1
    result = {
        "pack": args.pack,
        "stage": PREDICTIONS,
        "job": asdict(job),
        "data_version": record["data_version"],
        "images": record["images"],
        "seconds": round(time.perf_counter() - t0, 3),
        "requests": lake.counters.since(before),
    }
    lake.put(result_key(args.run_id, PREDICTIONS, args.pack), canonical_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

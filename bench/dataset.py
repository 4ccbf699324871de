"""FrozenSubsetDataset through a torch DataLoader vs reading and decoding the same files directly.

Runs on the lake the orchestrated pipeline run left (tables built): freezes the whole
``images`` table, then, round by round and interleaved, iterates

* the dataset: ``DataLoader(FrozenSubsetDataset(key, "resized", "train"), batch_size=64)``
  (``num_workers=0``: the same single process as the loop it is compared with);
* the direct loop: the same files by path, ``open().read()``, ``cv2.imdecode(IMREAD_COLOR)``,
  BGR→RGB, float tensor in [0, 1], stacked into the same batches with the same labels.

    python -m bench.dataset --rounds 5      # CVGRAPH_HOME from the environment; prints JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def run(rounds: int, batch_size: int = 64) -> dict:
    import cv2
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from bench.common import median
    from cvgraph import Datasets
    from cvgraph.torch import FrozenSubsetDataset

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    ds_sdk = Datasets()
    t0 = time.perf_counter()
    # a lake the bench wrote with the workloads alone: no step recorded it (work owed, knowingly)
    ds_sdk.freeze_dataset("bench_all", "SELECT * FROM images", allow_pending=True)
    t1 = time.perf_counter()
    dataset = FrozenSubsetDataset("bench_all", variant="resized", split="train")
    t2 = time.perf_counter()
    root = ds_sdk.lake.root
    paths = [str(root / r["resized_key"]) for r in dataset.rows]
    labels = [
        dataset.classes.index(str(r["label"])) if r["label"] is not None else -1
        for r in dataset.rows
    ]
    n = len(paths)

    def via_dataset() -> int:
        seen = 0
        for x, _y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            seen += x.shape[0]
        return seen

    def direct() -> int:
        seen = 0
        for i in range(0, n, batch_size):
            imgs = []
            for p in paths[i : i + batch_size]:
                with open(p, "rb") as f:
                    data = f.read()
                img = cv2.cvtColor(
                    cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
                )
                imgs.append(torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0))
            x = torch.stack(imgs)
            _y = torch.tensor(labels[i : i + batch_size])
            seen += x.shape[0]
        return seen

    via_dataset(), direct()  # warm-up: page cache, allocator
    rates: dict[str, list[float]] = {"dataset": [], "direct": []}
    for r in range(rounds):
        order = [("dataset", via_dataset), ("direct", direct)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            c = time.process_time()
            seen = fn()
            rates[name].append(seen / (time.process_time() - c))
            assert seen == n
    ratios = [a / b for a, b in zip(rates["dataset"], rates["direct"])]
    return {
        "images": n,
        "rounds": rounds,
        "batch_size": batch_size,
        "num_workers": 0,
        "dataset_img_per_cpu_s": round(median(rates["dataset"]), 1),
        "direct_img_per_cpu_s": round(median(rates["direct"]), 1),
        "ratio": round(median(ratios), 3),
        "freeze_s": round(t1 - t0, 2),
        "dataset_init_s": round(t2 - t1, 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

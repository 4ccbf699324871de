"""What a sweep buys over the defaults, measured the way a user gets it: a home with scikit-learn's
digits (every image, 10 classes) uploaded, synced and frozen; then ``cvgraph train`` with a spec,
and ``cvgraph tune`` of the same spec over the default search space; the test accuracy of each
(the test split is never seen by the sweep: trials are compared on the validation split) and the
wall time of each command.

    python -m bench.sweep [--home DIR] [--trials 8] [--parallel 2] [--arch small_cnn] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import REPO

CLI = REPO / ".venv" / "bin" / "cvgraph"


def _cvgraph(env: dict, *args: str) -> tuple[str, float]:
    import os

    t0 = time.perf_counter()
    out = subprocess.run(
        [str(CLI), *args], env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"cvgraph {' '.join(args)}: {out.stderr[-2000:]}")
    return out.stdout, time.perf_counter() - t0


def measure(home: Path, trials: int, parallel: int, spec: list[str]) -> dict:
    from cvgraph.demo_packs import digit_members, zip_bytes

    env = {"CVGRAPH_HOME": str(home), "CVGRAPH_PROFILE": "local"}
    pack = home / "digits.zip"
    home.mkdir(parents=True, exist_ok=True)
    pack.write_bytes(zip_bytes(digit_members(size=32)))
    _cvgraph(env, "upload", str(pack))
    _cvgraph(env, "sync")
    _cvgraph(env, "freeze", "d", "SELECT * FROM images WHERE label IS NOT NULL")
    out, train_s = _cvgraph(env, "train", "plain", "--subset", "d", *spec, "--json")
    plain = json.loads(out)
    out, tune_s = _cvgraph(
        env, "tune", "swept", "--subset", "d", "--trials", str(trials),
        "--parallel", str(parallel), *spec, "--json",
    )  # fmt: skip
    swept = json.loads(out)
    return {
        "spec": " ".join(spec),
        "train_test_accuracy": plain["test_accuracy"],
        "train_s": round(train_s, 1),
        "sweep_trials": trials,
        "sweep_parallel": parallel,
        "sweep_best": swept["best"],
        "sweep_val_accuracy": swept["best"]["objective"],
        "sweep_test_accuracy": swept["test_score"],
        "sweep_s": round(tune_s, 1),
        "sweep_objectives": [t["objective"] for t in swept["trials"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--epochs", default="4")
    a = ap.parse_args()
    spec = ["--arch", a.arch, "--epochs", a.epochs]
    if a.home:
        result = measure(a.home, a.trials, a.parallel, spec)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-sweep-") as d:
            result = measure(Path(d) / "home", a.trials, a.parallel, spec)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

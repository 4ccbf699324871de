"""How fast the ``cvgraph`` command answers: ``--help``, a query and a ``sync`` with nothing to
do, on a lake holding the demo's digits pack (1,797 images), each the median of ``--runs`` runs,
beside ``python -c pass`` measured in the same run (the interpreter's own start).

    python -m bench.cli_start [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import PY, REPO, env, median

COMMANDS = {
    "python_pass": ["-c", "pass"],
    "help": ["-m", "cvgraph.cli", "--help"],
    "query": [
        "-m",
        "cvgraph.cli",
        "query",
        "SELECT label, count(*) AS n FROM images GROUP BY label",
    ],
    "sync_noop": ["-m", "cvgraph.cli", "sync"],
}


def seconds(args: list[str], e: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([PY, *args], cwd=REPO, env=e, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    from cvgraph.demo_packs import build_digits_pack

    home = Path(tempfile.mkdtemp(prefix="cvgraph-bench-cli-"))
    try:
        e = env({"CVGRAPH_HOME": str(home), "CVGRAPH_PROFILE": "local"})
        build_digits_pack(home / "digits.zip")
        for setup in (["ingest", str(home / "digits.zip")], ["sync"]):
            subprocess.run(
                [PY, "-m", "cvgraph.cli", *setup], cwd=REPO, env=e, check=True, capture_output=True
            )
        out = {f"{name}_s": round(seconds(cmd, e, args.runs), 3) for name, cmd in COMMANDS.items()}
    finally:
        shutil.rmtree(home, ignore_errors=True)
    base = out["python_pass_s"]
    out.update(
        {f"{n}_vs_python": round(out[f"{n}_s"] / base, 1) for n in COMMANDS if n != "python_pass"}
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Kill anything, run it again: what the kill tests (tests/cvgraph/test_kill.py, the daemon's in
tests/orchestration/test_dagster_dev.py) run and compare. The fixtures ``kill_packs`` and
``clean_lake`` (the uninterrupted lake) are in conftest.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

# kill points per sweep (seeded delays, and as many named points); CVGRAPH_KILL_SEEDS widens it
SEEDS = int(os.environ.get("CVGRAPH_KILL_SEEDS", "2"))

CLI = str(Path(sys.executable).with_name("cvgraph"))
SQL = "SELECT * FROM images WHERE label IS NOT NULL"
# The lake as its own records say it is (never Dagster's bookkeeping), and what Dagster has left
# unfinished.
SNAPSHOT = """
import hashlib
import json
from assets.owed import PREFIX_ASSETS
from assets.versioning import read_prefix_versions
from cvgraph import Datasets
from orchestration.liveness import unfinished_runs
from workloads.layout import recorded
ds = Datasets()
lake = ds.lake
def digests(*roots):
    return {k: hashlib.sha256(lake.get(k)).hexdigest() for r in roots for k in lake.keys(r)}
def rows(sql):
    return [json.loads(json.dumps(r, default=str)) for r in ds.sql_query(sql).to_pylist()]
print(json.dumps({
    "images": rows("SELECT * FROM images ORDER BY sha256"),
    "objects": rows("SELECT * FROM objects ORDER BY ALL"),
    "bytes": digests("raw/", "resized/", "edges/", "index/resized/", "index/edges/"),
    "versions": {a: read_prefix_versions(lake, a) for a in PREFIX_ASSETS},
    "packs": recorded(lake, "pack"),
    "subsets": {k: ds.subset(k)["manifest_sha256"] for k in recorded(lake, "subset")},
    "owed": ds.owed().to_json(),
    "unfinished": [r.run_id for r in unfinished_runs(ds.instance)],
}, sort_keys=True))
"""


def cvgraph(
    env: dict, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    """``cvgraph ARGS`` as a user runs it in ``env``; a non-zero exit fails unless ``check=False``."""
    out = subprocess.run(
        [CLI, *args], check=False, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"cvgraph {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}"
        )
    return out


def lake_state(env: dict) -> dict:
    """``SNAPSHOT`` of the lake and instance of ``env``."""
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def assert_same_lake(env: dict, clean: dict) -> None:
    """The lake of ``env`` is ``clean``'s: rows, bytes, data versions, packs, frozen manifests;
    nothing owed and no run left unfinished."""
    got = lake_state(env)
    assert got["owed"] == {"packs": [], "prefixes": {}}, got["owed"]
    assert got["unfinished"] == [], "runs of killed commands left unfinished"
    for part in ("packs", "images", "objects", "bytes", "versions", "subsets"):
        assert got[part] == clean[part], f"{part} differ from the uninterrupted lake"


def killed_at(
    env, args: list[str], *, after_s: float | None = None, after_line: int | None = None
) -> bool:
    """Start ``cvgraph ARGS`` in a session of its own and SIGKILL its whole process group
    ``after_s`` seconds in, or right after its ``after_line``-th progress line (stderr); returns
    whether it was killed (False: it had finished first)."""
    proc = subprocess.Popen(
        [CLI, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    hit = threading.Event()

    def watch() -> None:
        for n, _line in enumerate(proc.stderr, 1):
            if after_line is not None and n >= after_line:
                hit.set()
                return
        hit.set()

    threading.Thread(target=watch, daemon=True).start()
    hit.wait(after_s if after_s is not None else 600)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def kill_points(seed_base: int, span: float, lines: int, seeds: int = SEEDS) -> list[dict]:
    """Kill points: ``seeds`` seeded delays within ``span`` seconds, and as many named points (the
    Nth progress line, up to three) spread over ``lines``."""
    rng = random.Random(seed_base)
    out = [{"after_s": rng.uniform(0.5, span)} for _ in range(seeds)]
    named = sorted({1, max(2, lines // 2), lines})[: max(1, seeds)]
    return out + [{"after_line": n} for n in named]

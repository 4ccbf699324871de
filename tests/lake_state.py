"""Kill anything, run it again: what the kill tests (tests/cvgraph/test_kill.py, the daemon's in
tests/orchestration/test_dagster_dev.py) run and compare. The fixtures ``kill_packs`` and
``clean_lake`` (the uninterrupted lake) are in conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def cvgraph(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``cvgraph ARGS`` as a user runs it in ``env``; a non-zero exit fails unless ``check=False``."""
    out = subprocess.run(
        [CLI, *args], check=False, env=env, capture_output=True, text=True, timeout=900
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

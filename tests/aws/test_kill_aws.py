"""Kill anything, run it again, on the aws profile (moto on 127.0.0.1, Batch jobs run by the test
harness as AWS would: they go on when the process that submitted them dies).

`cvgraph sync` SIGKILLed (the CLI and its process group) at seeded moments and after its Nth
progress line; the next sync ends the dead runs, terminates their Batch jobs, and does what the
lake is owed; the lake equals one made by a sync no one interrupted (in a fresh account): rows,
original and variant bytes, data versions of every prefix, the frozen manifest."""

from __future__ import annotations

import os
import time

from tests.lake_state import SEEDS, SQL, cvgraph, kill_points, killed_at, lake_state


def _user(home) -> dict:
    """The environment of a user of the aws fixture's account with their own home."""
    return {
        **os.environ,
        "CVGRAPH_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
    }


def _quiet(harness, timeout: float = 120) -> None:
    """Wait until no Batch job the harness started is running (a killed run's jobs included)."""
    import boto3

    batch = boto3.client("batch")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = [
            j["jobId"]
            for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")
            for j in batch.list_jobs(jobQueue="cvgraph", jobStatus=status)["jobSummaryList"]
        ]
        # an array's own status in a listing lags its children: describe says what it is
        busy = [
            j
            for i in range(0, len(listed), 100)
            for j in batch.describe_jobs(jobs=listed[i : i + 100])["jobs"]
            if j["status"] not in ("SUCCEEDED", "FAILED")
        ]
        if not busy:
            return
        time.sleep(0.5)
    raise AssertionError(
        f"Batch jobs still running after {timeout} s: "
        f"{[(j['jobName'], j['status'], j.get('statusReason')) for j in busy]}"
    )


def test_kill_sync_on_the_aws_profile_then_sync_makes_the_uninterrupted_lake(
    fresh_aws, kill_packs, tmp_path
):
    harness = fresh_aws(tmp_path / "killed")
    env = _user(tmp_path / "killed" / "home")
    for p in kill_packs:
        cvgraph(env, "upload", str(p))
    kills = sum(
        killed_at(env, ["sync"], **point)
        for point in kill_points(4, 20.0, 30, seeds=max(1, SEEDS // 2))
    )
    assert kills, "no kill landed"
    out = cvgraph(env, "sync")
    assert "nothing owed" in out.stdout, out.stdout + out.stderr[-3000:]
    cvgraph(env, "freeze", "s", SQL)
    _quiet(harness)
    killed = lake_state(env)

    harness = fresh_aws(tmp_path / "clean")
    env = _user(tmp_path / "clean" / "home")
    for p in kill_packs:
        cvgraph(env, "upload", str(p))
    cvgraph(env, "sync")
    cvgraph(env, "freeze", "s", SQL)
    clean = lake_state(env)

    assert killed["owed"] == {"packs": [], "prefixes": {}} and killed["unfinished"] == []
    for part in ("packs", "images", "objects", "bytes", "versions", "subsets"):
        assert killed[part] == clean[part], f"{part} differ from the uninterrupted lake"

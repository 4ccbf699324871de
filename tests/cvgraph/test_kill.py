"""Kill anything, run it again: the lake is what an uninterrupted run makes.

Each test runs a user's commands (`cvgraph sync`, `ingest`, `freeze`, `forget`) as processes in a
session of their own and SIGKILLs the whole process group (the CLI and its workers) at seeded
random moments, or right after the command's Nth progress line (a named point: a run created, a
prefix done, a table committed); then runs the command again, to the end, and compares with a
lake no one interrupted: the same `images` and `objects` rows, the same original and variant
bytes, the same data versions of every prefix, the same frozen manifest; `plan` says nothing is
owed and no run is left unfinished.

The default suite kills at a few points per command; ``CVGRAPH_KILL_SEEDS=N`` (e.g. 25) widens
every sweep: ``CVGRAPH_KILL_SEEDS=25 .venv/bin/pytest -k kill``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.lake_state import (
    SEEDS,
    SQL,
    assert_same_lake,
    cvgraph,
    kill_points,
    killed_at,
    lake_state,
)


def test_kill_sync_at_many_points_then_sync_makes_the_uninterrupted_lake(
    tmp_path, kill_packs, clean_lake, user_env
):
    """Packs uploaded, `cvgraph sync` killed again and again (during its ingests, its prefix
    runs, its table commits), then one sync: nothing lost, nothing owed."""
    env = user_env(tmp_path / "home")
    for p in kill_packs:
        cvgraph(env, "upload", str(p))
    kills = 0
    for point in kill_points(seed_base=1, span=clean_lake["sync_s"] + 3, lines=40):
        kills += killed_at(env, ["sync"], **point)
    assert kills, "no kill landed: the points are past the command's end"
    out = cvgraph(env, "sync")
    assert "nothing owed" in out.stdout, out.stdout
    plan = cvgraph(env, "plan").stdout
    assert "nothing to do" in plan, plan
    cvgraph(env, "freeze", "s", SQL)
    assert_same_lake(env, clean_lake)


def test_kill_ingest_then_ingest_again_and_sync(tmp_path, kill_packs, clean_lake, user_env):
    """`cvgraph ingest` killed mid-ingest (and before its run is created), run again, then sync."""
    env = user_env(tmp_path / "home")
    for point in kill_points(seed_base=2, span=4.0, lines=4):
        killed_at(env, ["ingest", str(kill_packs[0])], **point)
    cvgraph(env, "ingest", str(kill_packs[0]))
    cvgraph(env, "upload", str(kill_packs[1]))
    cvgraph(env, "sync")
    cvgraph(env, "freeze", "s", SQL)
    assert_same_lake(env, clean_lake)


def test_kill_freeze_then_freeze_again_gives_the_same_manifest(
    tmp_path, kill_packs, clean_lake, user_env
):
    """`cvgraph freeze` killed at many points, run again: one subset, the uninterrupted one's
    manifest; a killed freeze's run does not hold its key."""
    env = user_env(tmp_path / "home")
    for p in kill_packs:
        cvgraph(env, "upload", str(p))
    cvgraph(env, "sync")
    for point in kill_points(seed_base=3, span=4.0, lines=3):
        killed_at(env, ["freeze", "s", SQL], **point)
    cvgraph(env, "freeze", "s", SQL)
    assert_same_lake(env, clean_lake)


def test_a_killed_commands_run_is_ended_by_the_next_command(tmp_path, kill_packs, user_env):
    """The run of a SIGKILLed sync stays STARTED in Dagster; the next command finds its process
    gone, marks it failed, and says so on one line."""
    env = user_env(tmp_path / "home")
    for p in kill_packs:
        cvgraph(env, "upload", str(p))
    assert killed_at(env, ["sync"], after_line=3)
    out = cvgraph(env, "sync")
    assert "by a process that is gone" in out.stderr and "marked failed" in out.stderr, out.stderr
    assert "nothing owed" in out.stdout


def test_a_freeze_of_a_lake_with_work_owed_is_refused_in_one_line(tmp_path, kill_packs, user_env):
    """Packs ingested but not synced: the freeze is refused, naming what waits and `cvgraph
    sync`; with --allow-pending it freezes and records what was owed."""
    env = user_env(tmp_path / "home")
    cvgraph(env, "ingest", str(kill_packs[0]), "--wait")
    cvgraph(env, "ingest", str(kill_packs[1]))  # ingested, not indexed
    out = cvgraph(env, "freeze", "s", SQL, check=False)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "work owed" in out.stderr and "cvgraph sync" in out.stderr, out.stderr
    rec = json.loads(cvgraph(env, "freeze", "s", SQL, "--allow-pending", "--json").stdout)
    assert rec["pending"]["prefixes"]["raw_images"], rec["pending"]
    cvgraph(env, "sync")
    assert json.loads(cvgraph(env, "plan", "--json").stdout)["owed"] == {
        "packs": [],
        "prefixes": {},
    }


def _synced_homes(tmp_path, packs, user_env, freeze: bool = False) -> tuple[dict, dict]:
    """Two users' homes with ``packs`` uploaded and synced (and ``s`` frozen): one to leave alone,
    one to kill commands in."""
    homes = (user_env(tmp_path / "clean"), user_env(tmp_path / "home"))
    for home in homes:
        for p in packs:
            cvgraph(home, "upload", str(p))
        cvgraph(home, "sync")
        if freeze:
            cvgraph(home, "freeze", "s", SQL)
    return homes


def test_kill_forget_pack_then_forget_again_leaves_the_lake_without_it(
    tmp_path, kill_packs, user_env
):
    """`cvgraph forget pack b` killed at many points (before and after its record goes, during
    the prefix runs that drop its rows), run again: the lake of one that was never interrupted."""
    clean, env = _synced_homes(tmp_path, kill_packs, user_env)
    cvgraph(clean, "forget", "pack", "b")
    for point in kill_points(seed_base=5, span=6.0, lines=20, seeds=max(1, SEEDS // 2)):
        killed_at(env, ["forget", "pack", "b"], **point)
    out = cvgraph(env, "forget", "pack", "b", check=False)
    # finished by the re-run, or already finished by a killed one that got to its end
    assert out.returncode == 0 or "no ingested pack 'b'" in out.stderr, out.stderr
    cvgraph(env, "sync")
    want, got = lake_state(clean), lake_state(env)
    assert got["owed"] == {"packs": [], "prefixes": {}} and got["unfinished"] == []
    assert got["packs"] == ["a"]
    for part in ("images", "objects", "bytes", "versions"):
        assert got[part] == want[part], f"{part} differ from the uninterrupted forget"


def test_kill_train_and_export_then_again_gives_the_uninterrupted_model(
    tmp_path, kill_packs, user_env
):
    """`cvgraph train` killed at many points (MLflow's first store included), then `export`
    killed, each run again: the model and exports records of one never interrupted (but for the
    ids of the runs that made them)."""
    runs = {"dagster_run_id", "mlflow_run_id"}
    clean, env = _synced_homes(tmp_path, kill_packs, user_env, freeze=True)
    train = ["train", "m", "--subset", "s", "--epochs", "2"]
    want = json.loads(cvgraph(clean, *train, "--json").stdout)
    want_exports = json.loads(cvgraph(clean, "export", "m", "--json").stdout)
    for point in kill_points(seed_base=6, span=10.0, lines=6):
        killed_at(env, train, **point)
    got = json.loads(cvgraph(env, *train, "--json").stdout)
    for point in kill_points(seed_base=7, span=5.0, lines=3):
        killed_at(env, ["export", "m"], **point)
    got_exports = json.loads(cvgraph(env, "export", "m", "--json").stdout)
    assert {k: v for k, v in got.items() if k not in runs} == {
        k: v for k, v in want.items() if k not in runs
    }
    assert {k: v for k, v in got_exports.items() if k not in runs} == {
        k: v for k, v in want_exports.items() if k not in runs
    }
    # no MLflow run stays RUNNING: a killed command's were ended as KILLED by the next command
    statuses = mlflow_statuses(env)
    assert statuses and all(s in ("FINISHED", "KILLED") for s, _ in statuses), statuses
    assert all(
        ended.startswith("its Dagster run's process is gone")
        for s, ended in statuses
        if s == "KILLED"
    )


# (status, the cvgraph.ended tag) of every MLflow run of a home's tracking store
MLFLOW_STATUSES = """
import json, mlflow
from orchestration.settings import mlflow_tracking_uri
client = mlflow.MlflowClient(mlflow_tracking_uri())
ids = [e.experiment_id for e in client.search_experiments()]
runs = client.search_runs(ids) if ids else []
print(json.dumps(sorted([r.info.status, r.data.tags.get("cvgraph.ended", "")] for r in runs)))
"""


def mlflow_statuses(env: dict) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", MLFLOW_STATUSES], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])

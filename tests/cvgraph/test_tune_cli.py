"""`cvgraph tune`: a sweep of trainings on the local profile (an Optuna study in SQLite under the
home, trials as local training processes, two at once), each trial an MLflow run nested under the
sweep's, the best on the validation split the model's next registered version, the sweep's
picture in the UI's metadata and in MLflow. Killed anywhere and run again, it keeps what the
uninterrupted sweep kept: the same trials, objectives and weights."""

from __future__ import annotations

import hashlib
import json
import random
import time

import pytest

from tests.lake_state import SEEDS, SQL, cvgraph, kill_points, killed_at

# lr 1e-6 learns nothing in two epochs; 0.01 does: the sweep must keep a 0.01 trial
SPACE = {"lr": {"choices": [0.000001, 0.01]}, "label_smoothing": [0.0, 0.2]}
TUNE = ["tune", "m", "--subset", "s", "--trials", "4", "--parallel", "2", "--epochs", "3"]


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from cvgraph.demo_packs import digit_members, zip_bytes

    path = tmp_path_factory.mktemp("tune") / "digits.zip"
    path.write_bytes(zip_bytes(digit_members(size=32, limit=150, classes=(0, 1, 2))))
    return path


def _home(user_env, home, pack, space_file) -> dict:
    env = user_env(home)
    cvgraph(env, "upload", str(pack))
    cvgraph(env, "sync")
    cvgraph(env, "freeze", "s", SQL)
    return env


def _mlflow(env):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{env['CVGRAPH_HOME']}/mlflow/mlflow.db")


def test_tune_keeps_the_best_trial_as_the_next_version_and_a_killed_tune_keeps_the_same(
    tmp_path, user_env, pack
):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    args = [*TUNE, "--space", str(space)]
    env = _home(user_env, tmp_path / "clean", pack, space)
    t0 = time.monotonic()
    out = json.loads(cvgraph(env, *args, "--json").stdout)
    took = time.monotonic() - t0

    trials = out["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert out["objective"] == "val_accuracy" and out["version"] == "1"
    best = out["best"]
    assert best["params"]["lr"] == 0.01
    assert best["objective"] == max(t["objective"] for t in trials)
    learnt = [t["objective"] for t in trials if t["params"]["lr"] == 0.01]
    assert learnt and min(learnt) > max(
        (t["objective"] for t in trials if t["params"]["lr"] == 0.000001), default=0
    )
    rec = json.loads(cvgraph(env, "ls", "models", "--json").stdout)[0]
    model = json.loads((tmp_path / "clean/lake/models/m/model.json").read_text())
    assert rec["key"] == "m"
    sweep = model["sweep"]
    kept = sweep["trials"][best["number"]]
    # the kept trial's training is the model's: its weights, its spec, its MLflow run
    weights = (tmp_path / "clean/lake/models/m/model.pt").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == kept["model_sha256"] == model["model_sha256"]
    assert model["spec"]["lr"] == 0.01 and model["mlflow_run_id"] == kept["mlflow_run_id"]
    png = (tmp_path / "clean/lake" / sweep["picture"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    client = _mlflow(env)
    version = client.get_model_version("m", "1")
    assert version.run_id == kept["mlflow_run_id"]
    children = client.search_runs(
        [client.get_experiment_by_name("cvgraph").experiment_id],
        f"tags.`mlflow.parentRunId` = '{sweep['mlflow_run_id']}'",
    )
    assert sorted(int(r.data.tags["cvgraph.trial"]) for r in children) == [0, 1, 2, 3]
    for r in children:  # each trial's curve, its objective and its weights
        n = int(r.data.tags["cvgraph.trial"])
        assert r.data.metrics["val_accuracy"] == pytest.approx(trials[n]["objective"])
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 3
        assert float(r.data.params["lr"]) == trials[n]["params"]["lr"]
    parent = client.get_run(sweep["mlflow_run_id"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["objective"])
    assert {"sweep.png", "sweep.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }

    # every trial in the model's lineage
    tree = json.loads(cvgraph(env, "lineage", "m", "--json").stdout)
    assert [(t["number"], t["mlflow_run_id"]) for t in tree["model"]["sweep"]["trials"]] == [
        (t["number"], t["mlflow_run_id"]) for t in sweep["trials"]
    ]
    assert f"* trial {best['number']}: " in cvgraph(env, "lineage", "m").stdout

    # the same sweep again: nothing to do
    again = json.loads(cvgraph(env, *args, "--json").stdout)
    assert again == out
    assert len(client.search_model_versions("name = 'm'")) == 1

    # a user's mistakes: one line each
    for bad, says in (
        (["--trials", "1"], "a sweep has 2 trials or more"),
        (["--trials", "3", "--parallel", "4"], "parallel must be 1 to trials (3)"),
    ):
        done = cvgraph(env, "tune", "m", *bad, check=False)
        assert done.returncode == 1 and says in done.stderr and "Traceback" not in done.stderr

    # killed at seeded moments and mid-sweep, then run again: what the clean sweep kept
    killed = _home(user_env, tmp_path / "killed", pack, space)
    rng = random.Random(11)
    points = [{"after_s": rng.uniform(3, took)}, {"after_line": 20}]
    if SEEDS > 2:
        points = kill_points(11, took, 40)
    kills = sum(killed_at(killed, args, **p) for p in points)
    assert kills, "no kill landed"
    redo = json.loads(cvgraph(killed, *args, "--json").stdout)
    assert {k: v for k, v in redo.items() if k != "mlflow_run_id"} == {
        k: v for k, v in out.items() if k != "mlflow_run_id"
    }
    theirs = json.loads((tmp_path / "killed/lake/models/m/model.json").read_text())
    assert theirs["model_sha256"] == model["model_sha256"]
    assert [t["model_sha256"] for t in theirs["sweep"]["trials"]] == [
        t["model_sha256"] for t in sweep["trials"]
    ]

"""What a sweep's trials train, and which one it keeps (``workloads.training.sweep``): the space
is checked before anything runs; a trial's draw depends on the trials told before its wave only,
so a sweep killed anywhere — its study storage lost, or left with trials RUNNING — draws again
exactly what the uninterrupted sweep drew."""

from __future__ import annotations

import math

import pytest

from workloads.training.spec import check_spec, task_defaults
from workloads.training.sweep import (
    DEFAULT_SPACE,
    SweepPlan,
    Trial,
    best,
    objective,
    open_study,
    parameter_ranges,
    parse_space,
    tell,
    tuned_params,
    wave,
)


def test_the_space_is_parsed_and_checked_before_anything_runs():
    assert parse_space(None, "classification") == {
        k: {**{"log": False}, **v} if "choices" not in v else v
        for k, v in DEFAULT_SPACE["classification"].items()
    }
    assert parse_space('{"lr": [0.001, 0.1], "augment": ["none", "light"]}', "classification") == {
        "lr": {"low": 0.001, "high": 0.1, "log": False},
        "augment": {"choices": ["none", "light"]},
    }
    assert parse_space({"batch_size": {"low": 8, "high": 64, "log": True}}, "detection") == {
        "batch_size": {"low": 8, "high": 64, "log": True}
    }
    for space, says in (
        ('{"lr": ', "not JSON"),
        ({"seed": [0, 5]}, "'seed' cannot be searched"),
        ({"task": ["detection"]}, "'task' cannot be searched"),
        ({"colour": [1, 2]}, "'colour' cannot be searched"),
        ({"lr": [0.1, 0.01]}, "low 0.1 is not below high 0.01"),
        ({"lr": [0.0, 2.0]}, "lr must be in (0, 1]"),
        ({"weight_decay": {"low": 0, "high": 0.1, "log": True}}, "a log range starts above 0"),
        ({"batch_size": [8.5, 64]}, "batch_size takes whole numbers"),
        ({"arch": ["resnet50"]}, "arch 'resnet50': expected one of"),
        ({"augment": []}, "augment: no choices"),
        ({}, None),  # empty: the default
        ([1, 2], "a JSON object"),
    ):
        if says is None:
            assert parse_space(space, "classification") == parse_space(None, "classification")
            continue
        with pytest.raises(ValueError) as e:
            parse_space(space, "classification")
        assert says in str(e.value), (space, str(e.value))


def _plan(trials=7, parallel=3, seed=0) -> SweepPlan:
    return SweepPlan(
        model="m",
        subset_manifest_sha256="ab" * 32,
        base=task_defaults("classification"),
        space=parse_space(None, "classification"),
        trials=trials,
        parallel=parallel,
        seed=seed,
    )


def _score(t: Trial) -> float:
    """A made-up objective of the drawn spec, deterministic: peaks at lr 0.003."""
    return -abs(math.log(t.spec["lr"] / 0.003)) - t.spec["weight_decay"]


def _sweep(plan, storage, lake: dict, stop_after: int | None = None) -> list[int]:
    """Run ``plan`` as the asset does, trials' results kept in ``lake`` (number: Trial); stop
    (a kill) once ``stop_after`` trials have finished, mid-wave. Returns the trials it trained."""
    import dataclasses

    study = open_study(plan, storage)
    trained = []
    while batch := wave(study, plan):
        for t in batch:
            if t.number not in lake:
                if stop_after is not None and len(lake) >= stop_after:
                    return trained
                lake[t.number] = dataclasses.replace(t, objective=_score(t))
                trained.append(t.number)
        for t in batch:
            tell(study, lake[t.number])
    return trained


@pytest.mark.parametrize("storage", ["", "sqlite"])
def test_a_killed_sweep_run_again_draws_and_keeps_what_the_uninterrupted_one_did(tmp_path, storage):
    plan = _plan()
    clean: dict = {}
    assert _sweep(plan, "", clean) == list(range(7))
    assert [t.number for t in clean.values()] == list(range(7))
    url = f"sqlite:///{tmp_path}/optuna.db" if storage else ""
    for stop in (1, 4, 5):  # mid-wave, at a wave's end, mid-wave again
        killed: dict = {}
        trained = _sweep(plan, url.replace(".db", f"-{stop}.db"), killed, stop_after=stop)
        assert trained == list(range(stop))
        # run again: in memory the study is gone; in SQLite it holds RUNNING trials
        rest = _sweep(plan, url.replace(".db", f"-{stop}.db"), killed)
        assert rest == list(range(stop, 7))
        assert {n: t.params for n, t in killed.items()} == {n: t.params for n, t in clean.items()}
    winner = best(list(clean.values()))
    assert winner.objective == max(t.objective for t in clean.values())
    # the drawn fields vary, the others are the base's
    assert len({t.params["lr"] for t in clean.values()}) == 7
    assert all(t.spec["arch"] == "mobilenet_v3_small" for t in clean.values())


def test_another_seed_or_space_is_another_sweep_and_draws_otherwise():
    a, b = _plan(seed=0), _plan(seed=1)
    assert a.name != b.name and a.name == _plan(seed=0).name
    da, db = {}, {}
    _sweep(a, "", da)
    _sweep(b, "", db)
    assert da[0].params != db[0].params


def test_the_best_is_the_highest_objective_then_the_lowest_number_and_failures_never_win():
    trials = [
        Trial(number=0, params={}, spec={}, objective=0.5),
        Trial(number=1, params={}, spec={}, objective=0.75),
        Trial(number=2, params={}, spec={}, objective=0.75),
        Trial(number=3, params={}, spec={}, objective=None),  # failed
        Trial(number=4, params={}, spec={}, objective=float("nan")),  # no val split
    ]
    assert best(trials).number == 1
    with pytest.raises(ValueError, match="no trial finished"):
        best(trials[3:])


def test_the_objective_is_the_validation_score_of_the_epoch_whose_weights_were_kept():
    metrics = {
        "best_epoch": 2,
        "history": [
            {"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0},
            {"epoch": 2, "val_accuracy": 0.625, "val_loss": 0.5},
            {"epoch": 3, "val_accuracy": 0.75, "val_loss": 0.75},
        ],
        "test_accuracy": 0.9,
    }
    assert objective(metrics, {"task": "classification"}) == 0.625
    detector = {"best_epoch": 1, "history": [{"epoch": 1, "val_map": 0.25}]}
    assert objective(detector, {"task": "detection"}) == 0.25
    assert math.isnan(objective({"best_epoch": 1, "history": [{"epoch": 1}]}, {}))


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_a_space_as_tuning_job_ranges_and_the_tuned_values_back(task):
    space = parse_space(
        {**DEFAULT_SPACE[task], "epochs": [2, 9], "arch": ["small_cnn", "resnet18"]}
        if task == "classification"
        else None,
        task,
    )
    ranges = parameter_ranges(space)
    named = {r["Name"]: (kind, r) for kind, rs in ranges.items() for r in rs}
    assert set(named) == set(space)
    assert named["lr"][0] == "ContinuousParameterRanges"
    assert named["lr"][1]["ScalingType"] == "Logarithmic"
    assert named["batch_size"] == (
        "CategoricalParameterRanges",
        {"Name": "batch_size", "Values": [str(v) for v in space["batch_size"]["choices"]]},
    )
    if task == "classification":
        assert named["epochs"] == (
            "IntegerParameterRanges",
            {"Name": "epochs", "MinValue": "2", "MaxValue": "9", "ScalingType": "Linear"},
        )
        assert named["label_smoothing"][1]["ScalingType"] == "Linear"
    # what SageMaker hands back (strings, sometimes quoted) is typed as the space holds it
    tuned = {
        name: ('"' + r["Values"][-1] + '"') if kind.startswith("Categorical") else r["MaxValue"]
        for name, (kind, r) in named.items()
    }
    back = tuned_params(tuned, space)
    assert back["batch_size"] == space["batch_size"]["choices"][-1]
    assert isinstance(back["batch_size"], int) and isinstance(back["lr"], float)
    assert back["lr"] == space["lr"]["high"]
    if task == "classification":
        assert back["epochs"] == 9 and back["arch"] == "resnet18"
    assert check_spec({**task_defaults(task), **back})

"""``training_spec``: what a training is trained with, from the config over the model's last
record (its subset and spec), else the task's defaults; a bad value is one line naming it."""

import dagster as dg
import pytest

from assets.models import TrainConfig, training_spec
from workloads.training.spec import TRAIN_SPEC, task_defaults


def prior(subset: str = "old", **spec) -> dict:
    """A model's record as far as ``training_spec`` reads it: its subset and spec."""
    return {"subset": subset, "spec": {**TRAIN_SPEC, **spec}}


@pytest.mark.parametrize(
    ("config", "last", "subset", "expected"),
    [
        # a first training: the config's subset, the defaults
        ({"subset": "s"}, None, "s", TRAIN_SPEC),
        # a detector's first training: the detection defaults, not the classifier's
        ({"subset": "s", "task": "detection"}, None, "s", task_defaults("detection")),
        # a re-run with nothing set: the last subset and spec, so the same training
        ({}, prior(lr=0.01, epochs=3), "old", {**TRAIN_SPEC, "lr": 0.01, "epochs": 3}),
        # what the config sets goes over the last spec, the rest stays
        (
            {"subset": "new", "epochs": 5},
            prior(lr=0.01, epochs=3),
            "new",
            {**TRAIN_SPEC, "lr": 0.01, "epochs": 5},
        ),
        # another task than the last: its defaults, none of the last spec's values
        (
            {"task": "detection"},
            prior(lr=0.01, batch_size=8),
            "old",
            task_defaults("detection"),
        ),
        # a sweep's fields are not the spec's
        ({"subset": "s", "trials": 4, "parallel": 2}, None, "s", TRAIN_SPEC),
    ],
)
def test_training_spec_is_the_config_over_the_last_spec_else_the_tasks_defaults(
    config, last, subset, expected
):
    assert training_spec("m", TrainConfig(**config), last) == (subset, expected)


def test_a_record_older_than_a_field_reads_with_the_value_its_training_had():
    """A record written before ``task``/``entry_point`` existed is the same training today: its
    own values kept (it is read as the classifier it was), the added fields at their values."""
    added = ("task", "entry_point", "training_image")
    spec = {k: v for k, v in TRAIN_SPEC.items() if k not in added}
    old = {"subset": "s", "spec": {**spec, "lr": 0.01, "epochs": 3}}
    assert training_spec("m", TrainConfig(), old) == (
        "s",
        {**TRAIN_SPEC, "lr": 0.01, "epochs": 3},
    )


@pytest.mark.parametrize(
    ("config", "last", "message"),
    [
        ({}, None, "model m: give the frozen subset to train on as config `subset`"),
        ({"subset": "s", "lr": 2.0}, None, "model m: lr must be in (0, 1], not 2.0"),
        ({"subset": "s", "arch": "vgg"}, None, "model m: arch 'vgg': expected one of"),
        (
            {"subset": "s", "task": "detection", "arch": "small_cnn"},
            None,
            "model m: a detector is built on resnet18 or mobilenet_v3_small, not small_cnn",
        ),
        # a re-run of a detector: what the config sets is checked by the detector's rules
        ({"input_size": 100}, prior(task="detection"), "multiple of 32, not 100"),
    ],
)
def test_a_bad_training_spec_is_one_line_naming_the_field(config, last, message):
    with pytest.raises(dg.Failure) as failed:
        training_spec("m", TrainConfig(**config), last)
    assert message in failed.value.description
    assert "\n" not in failed.value.description

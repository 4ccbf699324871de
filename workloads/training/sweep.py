"""Sweeps: many trainings of one model, spec fields drawn from a search space by Optuna; the best
on the validation split is kept. Free of Dagster: the ``trained_models`` asset runs the trials
(through its trainer) and keeps the records; this module says what each trial trains and which
one won.

A sweep is a sequence of waves of ``parallel`` trials. A wave's parameters are asked before any
of it trains, each trial's by a sampler seeded with the sweep's seed and the trial's number, from
the trials of the waves before it (complete by then). So what trial ``n`` trains depends only on
the space, the seeds and the objectives before its wave: never on timing, on how many ran at
once within a wave, or on a kill — a killed sweep run again asks the same parameters, finds the
trials it had finished in the lake and trains the rest (the study's storage is a cache of that:
an empty one gives the same sweep).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workloads.training.spec import CHOICES, FIELDS, SCORE, check_spec, task_of

if TYPE_CHECKING:
    import optuna

# What a sweep never draws: what the model is, what it learns from and where it starts.
NOT_SEARCHED = ("task", "variant", "init_from", "seed", "entry_point", "training_image")
# The default space per task: the optimizer's knobs (README, Sweeps).
DEFAULT_SPACE: dict[str, dict[str, dict]] = {
    "classification": {
        "lr": {"low": 0.0005, "high": 0.01, "log": True},
        "weight_decay": {"low": 1e-5, "high": 0.01, "log": True},
        "label_smoothing": {"low": 0.0, "high": 0.2},
        "batch_size": {"choices": [32, 64, 128]},
    },
    "detection": {
        "lr": {"low": 0.0005, "high": 0.005, "log": True},
        "weight_decay": {"low": 1e-5, "high": 0.01, "log": True},
        "batch_size": {"choices": [8, 16]},
    },
}


def parse_space(space: dict | str | None, task: str) -> dict[str, dict]:
    """The search space as ``{field: {"low", "high"[, "log"]} | {"choices": [...]}}`` (a list is
    its choices; two numbers ``[low, high]`` a range), checked: known fields that a sweep may
    draw, ranges inside the field's limits, choices the field accepts. ``None`` or ``""``: the
    task's default space. ValueError names what is wrong."""
    if space in (None, "", {}):
        space = DEFAULT_SPACE[task]
    if isinstance(space, str):
        try:
            space = json.loads(space)
        except json.JSONDecodeError as e:
            raise ValueError(f"the search space is not JSON: {e}") from None
    if not isinstance(space, dict):
        raise ValueError("the search space is a JSON object {field: range or choices}")
    out: dict[str, dict] = {}
    for name, given in space.items():
        if name not in FIELDS or name in NOT_SEARCHED:
            drawable = ", ".join(f for f in FIELDS if f not in NOT_SEARCHED)
            raise ValueError(f"space: {name!r} cannot be searched (fields: {drawable})")
        spec = given
        if isinstance(given, list):
            is_range = len(given) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in given
            )
            spec = (
                {"low": given[0], "high": given[1]}
                if is_range and name not in CHOICES
                else {"choices": given}
            )
        if not isinstance(spec, dict) or not (
            {"choices"} <= set(spec) or {"low", "high"} <= set(spec)
        ):
            raise ValueError(f"space: {name}: a [low, high] range or a list of choices")
        if "choices" in spec:
            if not spec["choices"]:
                raise ValueError(f"space: {name}: no choices")
            for v in spec["choices"]:
                _check_value(name, v)
            out[name] = {"choices": list(spec["choices"])}
            continue
        low, high = spec["low"], spec["high"]
        if not low < high:
            raise ValueError(f"space: {name}: low {low} is not below high {high}")
        for v in (low, high):
            _check_value(name, v)
        if spec.get("log") and low <= 0:
            raise ValueError(f"space: {name}: a log range starts above 0, not at {low}")
        out[name] = {"low": low, "high": high, "log": bool(spec.get("log", False))}
    if not out:
        raise ValueError("the search space is empty")
    return out


def _check_value(name: str, value) -> None:
    default = FIELDS[name][0]
    if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
        raise ValueError(f"space: {name} takes whole numbers, not {value!r}")
    try:
        check_spec({name: value})
    except ValueError as e:
        raise ValueError(f"space: {e}") from None


def distributions(space: dict[str, dict]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna's distributions of a parsed space (whole-number fields: integer distributions)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out = {}
    for name, s in sorted(space.items()):
        if "choices" in s:
            out[name] = CategoricalDistribution(s["choices"])
        elif isinstance(FIELDS[name][0], int):
            out[name] = IntDistribution(s["low"], s["high"], log=s["log"])
        else:
            out[name] = FloatDistribution(s["low"], s["high"], log=s["log"])
    return out


def objective_name(spec: dict) -> str:
    """What a sweep maximises: the validation split's score (accuracy, a detector's mAP) at the
    epoch whose weights the training kept. The test split stays unseen until the winner is
    chosen."""
    return f"val_{SCORE[task_of(spec)]}"


def objective(metrics: dict, spec: dict) -> float:
    """A finished trial's objective, from its ``metrics.json``; NaN if it has no validation split."""
    name = objective_name(spec)
    best = metrics.get("best_epoch") or len(metrics["history"])
    value = next((h.get(name) for h in metrics["history"] if h["epoch"] == best), None)
    return float("nan") if value is None else float(value)


@dataclass(frozen=True)
class Trial:
    """One trial: its number, the spec it trains and, once trained, its objective."""

    number: int
    params: dict
    spec: dict
    objective: float | None = None
    mlflow_run_id: str = ""
    training_job: str = ""
    model_sha256: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Trial:
        return cls(**data)


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep is: the base spec, the space, how many trials and how many at once, its
    seed. Its ``name`` (the study's) changes with any of them and with the subset's manifest."""

    model: str
    subset_manifest_sha256: str
    base: dict
    space: dict
    trials: int
    parallel: int
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        from workloads.versions import canonical_json, sha256_hex

        what = [
            self.base,
            self.space,
            self.trials,
            self.parallel,
            self.seed,
            self.subset_manifest_sha256,
        ]
        return f"{self.model}-{sha256_hex(canonical_json(what))[:12]}"

    def to_json(self) -> dict:
        return {**asdict(self), "name": self.name}

    @classmethod
    def from_json(cls, data: dict) -> SweepPlan:
        return cls(**{k: v for k, v in data.items() if k != "name"})


def ensure_sqlite_storage(url: str) -> str:
    """A SQLite study storage created whole or not at all (Optuna makes its tables one by one: a
    process killed among them would leave a file every later open fails on): made in a temporary
    file beside it and renamed into place. Other URLs are returned as they are."""
    if not url.startswith("sqlite:///"):
        return url
    path = Path(url[len("sqlite:///") :])
    if path.exists():
        return url
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{path.name}.tmp-*"):  # a killed creation's, an hour old
        if time.time() - left.stat().st_mtime > 3600:
            left.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
    storage.engine.dispose()
    os.replace(tmp, path)
    return url


def open_study(plan: SweepPlan, storage: str) -> optuna.Study:
    """The plan's study in ``storage`` (``""``: in memory), made if new; maximised."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=plan.name,
        storage=ensure_sqlite_storage(storage) or None,
        direction="maximize",
        load_if_exists=True,
    )


def wave(study: optuna.Study, plan: SweepPlan) -> list[Trial]:
    """The next wave's trials (their parameters asked now if not yet): the trials of the first
    wave that is not complete, or [] when every trial is told."""
    import optuna

    told = {
        t.number
        for t in study.get_trials(deepcopy=False)
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    }
    for start in range(0, plan.trials, plan.parallel):
        numbers = range(start, min(start + plan.parallel, plan.trials))
        if all(n in told for n in numbers):
            continue
        dists = distributions(plan.space)
        while len(study.get_trials(deepcopy=False)) < numbers[-1] + 1:
            n = len(study.get_trials(deepcopy=False))
            # seeded per trial: its draw depends on the trials told before, not on a process's
            # RNG state (a re-run after a kill draws what the uninterrupted run drew)
            study.sampler = optuna.samplers.TPESampler(seed=plan.seed * 100_003 + n)
            study.ask(dists)
        trials = study.get_trials(deepcopy=False)
        return [
            Trial(
                number=n,
                params=dict(trials[n].params),
                spec=check_spec({**plan.base, **trials[n].params}),
            )
            for n in numbers
            if n not in told
        ]
    return []


def tell(study: optuna.Study, trial: Trial) -> None:
    """Record a trial's objective (NaN or None: failed) in the study."""
    import optuna

    if trial.objective is None or math.isnan(trial.objective):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial.number, trial.objective)


def best(trials: list[Trial]) -> Trial:
    """The trial with the highest objective; the lowest number among equals."""
    scored = [t for t in trials if t.objective is not None and not math.isnan(t.objective)]
    if not scored:
        raise ValueError("no trial finished with a validation score")
    return max(scored, key=lambda t: (t.objective, -t.number))


def sweep_png(trials: list[Trial], objective_label: str, title: str) -> bytes:
    """The sweep's picture: each trial's objective by its number, the best so far as a line and
    the winner marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted(
        (t for t in trials if t.objective is not None and not math.isnan(t.objective)),
        key=lambda t: t.number,
    )
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = [t.number for t in done]
    ys = [t.objective for t in done]
    ax.scatter(xs, ys, s=18, label="trial")
    running, so_far = [], float("-inf")
    for y in ys:
        so_far = max(so_far, y)
        running.append(so_far)
    ax.step(xs, running, where="post", color="C1", label="best so far")
    if done:
        win = best(done)
        ax.scatter([win.number], [win.objective], s=80, marker="*", color="C3", label="kept")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective_label)
    ax.set_title(title)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def trial_model_key(model: str, sweep: str, number: int) -> str:
    """Where trial ``number``'s training writes (``models/<this>/model.pt``, ``metrics.json``): under
    the model's own folder, one folder per sweep and trial."""
    return f"{model}/trials/{sweep}/{number:03d}"


def trial_record_key(model: str, sweep: str, number: int) -> str:
    """A finished trial's record (``Trial.to_json``), written last: its presence says it is done."""
    return f"models/{trial_model_key(model, sweep, number)}/trial.json"


def sweep_picture_key(model: str, sweep: str) -> str:
    return f"models/{model}/trials/{sweep}/sweep.png"


# -- SageMaker hyperparameter tuning jobs (a sweep on the aws profile) ----------------------


def parameter_ranges(space: dict[str, dict]) -> dict[str, list[dict]]:
    """A parsed space as a tuning job's ``ParameterRanges`` (values are strings; a log range is
    ``Logarithmic``; whole-number fields are integer ranges)."""
    out: dict[str, list[dict]] = {
        "ContinuousParameterRanges": [],
        "IntegerParameterRanges": [],
        "CategoricalParameterRanges": [],
    }
    for name, s in sorted(space.items()):
        if "choices" in s:
            out["CategoricalParameterRanges"].append(
                {"Name": name, "Values": [str(v) for v in s["choices"]]}
            )
            continue
        kind = "Integer" if isinstance(FIELDS[name][0], int) else "Continuous"
        out[f"{kind}ParameterRanges"].append(
            {
                "Name": name,
                "MinValue": str(s["low"]),
                "MaxValue": str(s["high"]),
                "ScalingType": "Logarithmic" if s["log"] else "Linear",
            }
        )
    return {k: v for k, v in out.items() if v}


def tuned_params(tuned: dict[str, str], space: dict[str, dict]) -> dict:
    """A trial's ``TunedHyperParameters`` (strings) as the values the space holds."""
    out = {}
    for name, s in sorted(space.items()):
        raw = tuned[name].strip('"')
        if "choices" in s:
            out[name] = next(v for v in s["choices"] if str(v) == raw)
        elif isinstance(FIELDS[name][0], int):
            out[name] = int(float(raw))
        else:
            out[name] = float(raw)
    return out


def tuning_job_name(plan: SweepPlan, attempt: int) -> str:
    """Attempt ``attempt``'s tuning job (a name is never reusable; SageMaker allows 32
    characters): ``cvg-``, the model's name cut, and the sweep's hash. Its trials' training jobs
    are named after it (``cvg-*``: what the orchestrator's role may describe)."""
    slug = re.sub(r"[^A-Za-z0-9-]", "-", plan.model)[:10].strip("-")
    return f"cvg-{slug}-{plan.name[-12:]}-{attempt}"

"""A sweep as ``trained_models`` runs it (``trials`` > 1 in its config): waves of trials an Optuna
study draws, through the trainer (``parallel`` jobs at once: local processes), or, with a trainer
that runs tuning jobs (SageMaker's), one tuning job that draws and trains them. Each trial is an
MLflow run nested under the sweep's, each finished trial's record is in the lake; the best on the
validation split is the model's training. What each trial trains: ``workloads.training.sweep``."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg

from resources.tracking import TAG, record_training, sweep_run, trial_run
from resources.training import Trainer, TrainingFailed
from workloads.layout import model_keys
from workloads.staging import staging
from workloads.training.sweep import (
    SweepPlan,
    Trial,
    best,
    objective,
    objective_name,
    open_study,
    sweep_picture_key,
    sweep_png,
    tell,
    trial_model_key,
    trial_record_key,
    wave,
)
from workloads.versions import canonical_json, sha256_hex


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    """The finished sweep: every trial (by number), the kept one, the sweep's MLflow run."""

    plan: SweepPlan
    trials: list[Trial]
    kept: Trial
    mlflow_run_id: str
    picture: str  # the lake key of the objective-per-trial picture

    def to_json(self) -> dict:
        return {
            "name": self.plan.name,
            "plan": self.plan.to_json(),
            "objective": objective_name(self.plan.base),
            "trials": [t.to_json() for t in self.trials],
            "best": self.kept.number,
            "mlflow_run_id": self.mlflow_run_id,
            "picture": self.picture,
        }


def job_name(key: str, spec: dict, manifest_sha256: str) -> str:
    """A training's job name: the model and a hash of what it trains (a trial's is the name a
    plain training of the same spec gets, so SageMaker reuses either's finished job)."""
    return f"cvgraph-{key}-{sha256_hex(canonical_json([spec, manifest_sha256]))[:8]}"


def run_sweep(
    context: dg.AssetExecutionContext,
    *,
    plan: SweepPlan,
    trainer: Trainer,
    store,
    mlf: Any,
    subset: str,
    shards_key: str,
) -> SweepOutcome:
    """Run ``plan``'s trials not yet in the lake, wave after wave; the outcome once all are."""
    parent = sweep_run(mlf, plan.name, plan.model)
    client = mlf.tracking_client
    uri = mlf.get_tracking_uri()
    experiment_id = mlf.experiment.experiment_id
    context.log.info(
        f"sweep {plan.name}: {plan.trials} trials, {plan.parallel} at once, over "
        f"{', '.join(sorted(plan.space))}; objective {objective_name(plan.base)}"
    )

    def recorded(trial: Trial) -> Trial | None:
        """The trial as an earlier (killed) attempt at this sweep recorded it, if one did."""
        rec_key = trial_record_key(plan.model, plan.name, trial.number)
        return Trial.from_json(json.loads(store.get(rec_key))) if store.exists(rec_key) else None

    def start(trial: Trial) -> str:
        return trial_run(
            client, experiment_id=experiment_id, parent=parent, sweep=plan.name, number=trial.number
        )

    def one(trial: Trial) -> Trial:
        if done := recorded(trial):
            return done
        run_id = start(trial)
        live = {"mlflow_tracking_uri": uri, "mlflow_run_id": run_id} if trainer.reaches(uri) else {}
        job = job_name(plan.model, trial.spec, plan.subset_manifest_sha256)
        tkey = trial_model_key(plan.model, plan.name, trial.number)
        try:
            metrics = trainer.train(context, store, job, shards_key, tkey, {**trial.spec, **live})
        except TrainingFailed as e:  # one diverging trial does not end the sweep
            context.log.warning(f"sweep {plan.name}: trial {trial.number} failed: {e}")
            client.set_terminated(run_id, "FAILED")
            return trial
        return finish(trial, run_id, job, metrics)

    def tuned(trial: Trial) -> Trial:
        """A trial of the trainer's tuning job, its weights and metrics in the lake: recorded."""
        if done := recorded(trial):
            return done
        run_id = start(trial)
        client.set_tag(run_id, f"{TAG}training_job", trial.training_job)
        if trial.objective is None:
            client.set_terminated(run_id, "FAILED")
            return trial
        metrics = json.loads(
            store.get(model_keys(trial_model_key(plan.model, plan.name, trial.number))["metrics"])
        )
        return finish(trial, run_id, trial.training_job, metrics)

    def finish(trial: Trial, run_id: str, job: str, metrics: dict) -> Trial:
        """A trained trial: its MLflow run filled and ended, its record in the lake."""
        rec_key = trial_record_key(plan.model, plan.name, trial.number)
        value = objective(metrics, trial.spec)
        keys = model_keys(trial_model_key(plan.model, plan.name, trial.number))
        with staging(store, "sweep") as tmp:
            paths = []
            for name in ("model", "metrics"):
                paths.append(str(Path(tmp) / Path(keys[name]).name))
                Path(paths[-1]).write_bytes(store.get(keys[name]))
            record_training(
                client,
                run_id,
                model_key=plan.model,
                subset_hash=plan.subset_manifest_sha256,
                params={**trial.spec, "subset": subset},
                metrics=metrics,
                artifacts=paths,
                run_name=f"{plan.model} trial {trial.number}",
            )
        if value == value:  # not NaN
            client.log_metric(run_id, objective_name(trial.spec), value)
        client.set_terminated(run_id, "FINISHED")
        done = dataclasses.replace(
            trial,
            objective=value,
            mlflow_run_id=run_id,
            training_job=job,
            model_sha256=sha256_hex(store.get(keys["model"])),
        )
        store.put(rec_key, json.dumps(done.to_json(), indent=2, sort_keys=True).encode())
        context.log.info(
            f"sweep {plan.name}: trial {trial.number} {trial.params} → "
            f"{objective_name(trial.spec)} {value:.4f}"
        )
        return done

    if trainer.runs_tuning_jobs():  # the service draws and trains; its trials come back
        trials = [
            tuned(t)
            for t in trainer.tune(
                context, store, plan=plan, shards_key=shards_key, hyperparameters=dict(plan.base)
            )
        ]
    else:
        trials = optuna_trials(plan, store, one, trainer.sweep_storage)
    try:
        kept = best(trials)
    except ValueError as e:
        raise dg.Failure(description=f"model {plan.model}: sweep {plan.name}: {e}") from None
    picture = sweep_picture_key(plan.model, plan.name)
    png = sweep_png(trials, objective_name(plan.base), f"{plan.model}: sweep of {plan.trials}")
    store.put(picture, png)
    with staging(store, "sweep") as tmp:
        (Path(tmp) / "sweep.png").write_bytes(png)
        outcome = SweepOutcome(
            plan=plan, trials=trials, kept=kept, mlflow_run_id=parent, picture=picture
        )
        (Path(tmp) / "sweep.json").write_text(json.dumps(outcome.to_json(), indent=2))
        for name in ("sweep.png", "sweep.json"):
            client.log_artifact(parent, str(Path(tmp) / name))
    client.log_param(parent, "trials", plan.trials)
    client.log_param(parent, "parallel", plan.parallel)
    client.log_param(parent, "space", json.dumps(plan.space, sort_keys=True))
    client.log_metric(parent, f"best_{objective_name(plan.base)}", kept.objective)
    client.set_tag(parent, "cvgraph.best_trial", str(kept.number))
    client.set_terminated(parent, "FINISHED")
    return outcome


def optuna_trials(plan: SweepPlan, store, one, storage: str) -> list[Trial]:
    """The sweep's trials drawn by its Optuna study (in ``storage``), wave after wave, each
    trained and recorded by ``one``; every trial, in order."""
    study = open_study(plan, storage)
    while batch := wave(study, plan):
        with ThreadPoolExecutor(max_workers=plan.parallel) as pool:
            finished = list(pool.map(one, batch))
        for t in finished:
            tell(study, t)
    trials = []
    for n in range(plan.trials):
        rec_key = trial_record_key(plan.model, plan.name, n)
        if store.exists(rec_key):
            trials.append(Trial.from_json(json.loads(store.get(rec_key))))
        else:  # failed: its drawn parameters are in the study
            t = study.get_trials(deepcopy=False)[n]
            trials.append(Trial(number=n, params=dict(t.params), spec={**plan.base, **t.params}))
    return trials

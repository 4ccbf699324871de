"""Tracking role: MLflow through dagster-mlflow, and the model registry.

``mlflow_tracking`` is dagster-mlflow's resource (``dagster_mlflow.resources.MlFlow``: it sets the
tracking URI and experiment and opens this Dagster run's MLflow run, tagged ``dagster_run_id``),
after making sure the experiment exists with its artifact location (MLflow would otherwise put
artifacts under the working directory). What dagster-mlflow does not do is here: a training
already logged by an earlier Dagster run is reused, not logged twice (the run this Dagster run
opened is then discarded), and each new training is a version of the registered model named
after the model key, tagged with what it was made from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # dagster-mlflow imports mlflow (~0.7 s): a query needs neither
    from dagster_mlflow.resources import MlFlow

TAG = "cvgraph."  # the prefix of this project's MLflow tags


def ensure_sqlite_store(path: Path) -> None:
    """Create a SQLite tracking store whole or not at all. MLflow makes a new store by running its
    schema migrations one by one on the file; a process killed among them (a killed `cvgraph
    train`) leaves a store every later open fails on ("duplicate column name"). So a new store is
    made in a temporary file beside it and renamed into place once its schema is complete."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{path.name}.tmp-*"):  # a killed creation's, an hour old
        if time.time() - left.stat().st_mtime > 3600:
            left.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "artifacts").as_uri())
    store.engine.dispose()
    os.replace(tmp, path)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created with ``artifact_location`` if it does not exist yet."""
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        ensure_sqlite_store(Path(tracking_uri[len("sqlite:///") :]))
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


@dg.resource(
    # the part of dagster-mlflow's CONFIG_SCHEMA cvgraph sets (its MlFlow reads the rest as unset)
    config_schema={
        "experiment_name": dg.Field(str),
        "mlflow_tracking_uri": dg.Field(str),
        "artifact_location": dg.Field(dg.Noneable(str), default_value=None, is_required=False),
    },
    description="dagster-mlflow's MLflow run of this Dagster run (experiment made first).",
)
def mlflow_tracking(init_context) -> MlFlow:
    from dagster_mlflow.resources import MlFlow

    cfg = init_context.resource_config
    ensure_experiment(cfg["mlflow_tracking_uri"], cfg["experiment_name"], cfg["artifact_location"])
    return MlFlow(init_context)


def end_runs_of(tracking_uri: str, dagster_run_id: str, why: str) -> list[str]:
    """End as KILLED the MLflow runs Dagster run ``dagster_run_id`` left RUNNING (its process was
    killed: no hook ended them), each tagged with ``why``; returns their ids. A SQLite store that
    does not exist yet holds none (and is not created)."""
    if (
        tracking_uri.startswith("sqlite:///")
        and not Path(tracking_uri[len("sqlite:///") :]).exists()
    ):
        return []
    import mlflow

    with _fail_fast():
        client = mlflow.MlflowClient(tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return []
        left = client.search_runs(
            experiments,
            filter_string=f"tags.dagster_run_id = '{dagster_run_id}' and attributes.status = 'RUNNING'",
        )
        for run in left:
            client.set_tag(run.info.run_id, f"{TAG}ended", why)
            client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in left]


@contextlib.contextmanager
def _fail_fast():
    """A tracking server's requests retried once, 10 s each, while a clean-up asks it (MLflow's
    own default, 7 retries with backoff and 120 s, would hold a command minutes on a server that
    is down); MLflow reads both variables at each request."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    before = {n: os.environ.get(n) for n in names}
    os.environ.update({n: os.environ.get(n) or v for n, v in names.items()})
    try:
        yield
    finally:
        for n, v in before.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _end_mlflow_run(context, event_list):
    from dagster_mlflow import end_mlflow_on_run_finished as hook

    return hook.hook_fn(context, event_list)


# dagster-mlflow's hook of that name (a failed step ends its MLflow run as FAILED, the last one
# ends it), imported when it runs: loading the definitions, as every `cvgraph` command does, then
# imports no mlflow (`cvgraph sync` with nothing to do: see the README's benchmarks).
end_mlflow_on_run_finished = dg.HookDefinition(
    name="end_mlflow_on_run_finished",
    hook_fn=_end_mlflow_run,
    required_resource_keys={"mlflow"},
    decorated_fn=_end_mlflow_run,
)


def _training_tags(model_key: str, subset_hash: str, params: dict) -> dict[str, str]:
    spec_hash = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    return {
        f"{TAG}model": model_key,
        f"{TAG}subset_hash": subset_hash,
        f"{TAG}spec_hash": spec_hash[:16],
    }


def log_training(
    mlf: MlFlow, model_key: str, subset_hash: str, params: dict, metrics: dict, artifacts: list[str]
) -> str:
    """Log a training into this Dagster run's MLflow run and return its id, or, if an earlier run
    logged this very training (model, subset manifest, spec), discard this one and return that.

    The tags that say which training a run holds go last: a run killed while it logged is never
    found as one that holds it. A found run whose process died before it ended is ended here."""
    client, run_id = mlf.tracking_client, mlf.active_run().info.run_id
    tags = _training_tags(model_key, subset_hash, params)
    found = [
        r
        for r in client.search_runs(
            [mlf.experiment.experiment_id],
            " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
        )  # keys are validated names: no quotes in them
        if r.info.run_id != run_id
    ]
    if found:
        discard_run(mlf)
        if found[0].info.status == "RUNNING":  # logged by a train killed before it ended its run
            client.set_terminated(found[0].info.run_id, "FINISHED")
        return found[0].info.run_id
    record_training(
        client,
        run_id,
        model_key=model_key,
        subset_hash=subset_hash,
        params=params,
        metrics=metrics,
        artifacts=artifacts,
    )
    mlf.end_run()
    return run_id


def record_training(
    client,
    run_id: str,
    *,
    model_key: str,
    subset_hash: str,
    params: dict,
    metrics: dict,
    artifacts: list[str],
    run_name: str = "",
) -> None:
    """Log a training into MLflow run ``run_id``: its spec, curves (unless the job logged them
    live), test scores and files; the tags that say which training it holds go last."""
    client.set_tag(run_id, "mlflow.runName", run_name or model_key)
    for k, v in sorted(params.items()):
        client.log_param(run_id, k, v)
    logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}  # live, by the job
    for rec in metrics.get("history", []):
        if rec["epoch"] in logged:
            continue
        for k, v in rec.items():
            if k not in ("epoch", "seconds") and v == v:  # not NaN (no val split)
                client.log_metric(run_id, k, v, step=rec["epoch"])
    for k in ("test_accuracy", "test_map", "test_map50"):
        if k in metrics:
            client.log_metric(run_id, k, metrics[k])
    for c, ap in metrics.get("test_per_class", {}).items():
        client.log_metric(run_id, metric_name(f"test_ap_{c}"), ap)
    for path in artifacts:
        client.log_artifact(run_id, path)
    for k, v in _training_tags(model_key, subset_hash, params).items():
        client.set_tag(run_id, k, v)


def sweep_run(mlf: MlFlow, sweep: str, model_key: str) -> str:
    """The MLflow run of sweep ``sweep`` (its trials are nested under it): an earlier Dagster
    run's, if one made it (a killed sweep run again goes on in the same run; this Dagster run's
    is then discarded), else this Dagster run's, tagged."""
    client, run_id = mlf.tracking_client, mlf.active_run().info.run_id
    found = [
        r
        for r in client.search_runs(
            [mlf.experiment.experiment_id],
            f"tags.`{TAG}sweep` = '{sweep}' and tags.`{TAG}role` = 'sweep'",
        )
        if r.info.run_id != run_id
    ]
    if found:
        discard_run(mlf)
        return found[0].info.run_id
    for k, v in {
        "mlflow.runName": f"{model_key} sweep",
        f"{TAG}model": model_key,
        f"{TAG}sweep": sweep,
        f"{TAG}role": "sweep",
    }.items():
        client.set_tag(run_id, k, v)
    return run_id


def trial_run(client, *, experiment_id: str, parent: str, sweep: str, number: int) -> str:
    """A new MLflow run for trial ``number`` of ``sweep``, nested under run ``parent``. A run an
    earlier, killed attempt at this trial left is deleted first (its curve would be doubled)."""
    for r in client.search_runs(
        [experiment_id], f"tags.`{TAG}sweep` = '{sweep}' and tags.`{TAG}trial` = '{number}'"
    ):
        client.delete_run(r.info.run_id)
    run = client.create_run(
        experiment_id,
        tags={
            "mlflow.parentRunId": parent,
            f"{TAG}sweep": sweep,
            f"{TAG}trial": str(number),
            f"{TAG}role": "trial",
        },
    )
    return run.info.run_id


def discard_run(mlf: MlFlow) -> str:
    """End and delete this Dagster run's MLflow run, unless something was logged in it (a step
    before this one of the same Dagster run trained in it): nothing was made here. Returns ""."""
    run_id = mlf.active_run().info.run_id
    mlf.end_run()
    if f"{TAG}spec_hash" not in mlf.tracking_client.get_run(run_id).data.tags:
        mlf.tracking_client.delete_run(run_id)
    return ""


def register_version(mlf: MlFlow, name: str, run_id: str, tags: dict[str, str]) -> str:
    """The registered model ``name``'s version made from ``run_id`` (created, with ``tags``, the
    first time): each training of a model key is one version."""
    client = mlf.tracking_client
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, tags={f"{TAG}model": name})
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        return str(found[0].version)
    tags = {f"{TAG}{k}": str(v) for k, v in tags.items()}
    version = client.create_model_version(name, f"runs:/{run_id}", run_id=run_id, tags=tags)
    return str(version.version)


def version_weights(
    mlf: MlFlow, name: str, version: str | None, directory: Path, known: dict[str, str]
) -> dict:
    """The weights of registered version ``version`` of model ``name`` (None: its latest), the
    ``model.pt`` its training logged, downloaded into ``directory`` and checked against the
    sha256 the version is tagged with (``known``: ``{version: sha256}`` for versions registered
    before they were tagged, from the lake's record). ``{"model", "version", "run_id", "path",
    "model_sha256"}``; LookupError for what does not exist, ValueError for what does not check."""
    client = mlf.tracking_client
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise LookupError(f"no registered model {name!r}")
    numbers = sorted(int(v.version) for v in versions)
    wanted = str(numbers[-1]) if version is None else version
    mv = next((v for v in versions if str(v.version) == wanted), None)
    if mv is None:
        raise LookupError(f"model {name!r} has no version {wanted} (versions: {numbers})")
    expected = mv.tags.get(f"{TAG}model_sha256") or known.get(wanted)
    if not expected:
        raise ValueError(f"{name}@{wanted}: no model_sha256 to check its weights against")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one file: no bar on stderr
    path = Path(client.download_artifacts(mv.run_id, "model.pt", str(directory)))
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != expected:
        raise ValueError(
            f"{name}@{wanted}: its model.pt has sha256 {got[:12]}, not {expected[:12]}"
        )
    return {
        "model": name,
        "version": wanted,
        "run_id": mv.run_id,
        "path": str(path),
        "model_sha256": got,
        "params": client.get_run(mv.run_id).data.params,  # the spec it was trained with
    }


def log_exports(mlf: MlFlow, name: str, version: str, files: dict[str, str]) -> str:
    """Log the export files (``{format: local path}``) in this Dagster run's MLflow run, tagged
    with the model version they were made from, and tag the version with that run; returns it."""
    client, run_id = mlf.tracking_client, mlf.active_run().info.run_id
    if f"{TAG}spec_hash" not in client.get_run(run_id).data.tags:  # not the training's own run
        client.set_tag(run_id, "mlflow.runName", f"{name} v{version} exports")
        client.set_tag(run_id, f"{TAG}model", name)
    client.set_tag(run_id, f"{TAG}model_version", version)
    for fmt, path in sorted(files.items()):
        client.log_artifact(run_id, path, artifact_path=fmt)
    client.set_model_version_tag(name, version, f"{TAG}exports_run", run_id)
    mlf.end_run()
    return run_id


CHAMPION = "champion"


def log_evaluation(
    mlf: MlFlow, name: str, version: str, subset: str, scores: dict, files: list[str]
) -> str:
    """Log an evaluation of version ``version`` on ``subset`` in this Dagster run's MLflow run
    (metrics, per-class F1, the pictures and record), tagged with both; returns the run id."""
    client, run_id = mlf.tracking_client, mlf.active_run().info.run_id
    for k, v in {
        "mlflow.runName": f"{name} v{version} on {subset}",
        f"{TAG}model": name,
        f"{TAG}model_version": version,
        f"{TAG}eval_subset": subset,
    }.items():
        client.set_tag(run_id, k, v)
    metric = "map" if scores.get("task") == "detection" else "accuracy"
    if metric == "map":
        for k in ("map", "map50", "map75"):
            client.log_metric(run_id, k, scores[k])
        for c, ap in scores["per_class"].items():
            client.log_metric(run_id, metric_name(f"ap_{c}"), ap)
    else:
        client.log_metric(run_id, "accuracy", scores["accuracy"])
        client.log_metric(run_id, "macro_f1", scores["macro_f1"])
        for c, m in scores["per_class"].items():
            client.log_metric(run_id, metric_name(f"f1_{c}"), m["f1"])
    for path in files:
        client.log_artifact(run_id, path)
    client.set_model_version_tag(name, version, f"{TAG}eval.{subset}.{metric}", scores[metric])
    mlf.end_run()
    return run_id


def metric_name(name: str) -> str:
    """``name`` as an MLflow metric name can be (letters, digits, ``_-. /``; others ``_``)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def promote(
    mlf: MlFlow, name: str, version: str, subset: str, value: float, metric: str = "accuracy"
) -> dict:
    """The promotion rule: the alias ``champion`` moves to ``version`` when there is no champion
    yet, or the champion's ``metric`` (accuracy; a detector's mAP) on the same ``subset`` is
    lower. Returns the decision (``before``, ``after``, ``moved``, ``reason``)."""
    from mlflow.exceptions import MlflowException

    client = mlf.tracking_client
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        current = None
    theirs = (
        client.get_model_version(name, current).tags.get(f"{TAG}eval.{subset}.{metric}")
        if current and current != version
        else None
    )
    if current is None:
        moved, reason = True, "no champion yet"
    elif current == version:
        moved, reason = False, f"v{version} is the champion"
    elif theirs is None:
        moved, reason = False, f"champion v{current} has no evaluation on {subset} to compare"
    elif value > float(theirs):
        moved, reason = (
            True,
            f"{value:.4f} beats champion v{current}'s {float(theirs):.4f} on {subset}",
        )
    else:
        moved, reason = (
            False,
            f"{value:.4f} does not beat champion v{current}'s {float(theirs):.4f} on {subset}",
        )
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version)
        reason = f"{reason}: v{version} is now the champion"
    return {
        "before": current,
        "after": version if moved else current,
        "moved": moved,
        "reason": reason,
    }

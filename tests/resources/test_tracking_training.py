"""``resources.tracking.log_training``: a train run again after a kill finds the MLflow run that
holds its training only if that run was logged whole, and ends it if its process died first."""

import dagster as dg

from resources.tracking import log_training, mlflow_tracking

METRICS = {
    "history": [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.7}],
    "test_accuracy": 0.75,
}


def _log(tmp_path, monkeypatch, params: dict) -> str:
    """``log_training`` of model ``m`` with ``params`` in a Dagster run of its own; its run id."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking = mlflow_tracking.configured(
        {
            "experiment_name": "training",
            "mlflow_tracking_uri": uri,
            "artifact_location": (tmp_path / "artifacts").as_uri(),
        }
    )
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    out = {}

    @dg.op(required_resource_keys={"mlflow"})
    def train(context):
        out["run_id"] = log_training(
            context.resources.mlflow, "m", "subset-hash", params, METRICS, [str(model)]
        )

    @dg.job(resource_defs={"mlflow": tracking})
    def job():
        train()

    result = job.execute_in_process(raise_on_error=False)
    return out["run_id"] if result.success else ""


def test_a_run_killed_after_logging_is_found_and_ended(tmp_path, monkeypatch):
    import mlflow

    first = _log(tmp_path, monkeypatch, {"lr": 0.1})
    client = mlflow.MlflowClient()
    client.update_run(first, status="RUNNING")  # its process died before it ended the run
    again = _log(tmp_path, monkeypatch, {"lr": 0.1})
    assert again == first
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] == 0.75
    exp = client.get_experiment_by_name("training").experiment_id
    assert [r.info.run_id for r in client.search_runs([exp])] == [first]  # the re-run's: deleted


def test_a_run_killed_while_logging_is_not_taken_for_the_training(tmp_path, monkeypatch):
    import mlflow

    with monkeypatch.context() as m:
        m.setattr(mlflow.MlflowClient, "log_artifact", _killed)
        assert _log(tmp_path, monkeypatch, {"lr": 0.2}) == ""
    mlflow.end_run()  # the process that logged it is gone: its run stays RUNNING
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("training").experiment_id
    (partial,) = client.search_runs([exp])
    client.update_run(partial.info.run_id, status="RUNNING")
    again = _log(tmp_path, monkeypatch, {"lr": 0.2})
    assert again != partial.info.run_id
    run = client.get_run(again)
    assert run.data.tags["cvgraph.model"] == "m" and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(again)] == ["model.pt"]


def _killed(*_args, **_kwargs):
    raise RuntimeError("killed while logging artifacts")

"""``resources.tracking.end_mlflow_on_run_finished``: dagster-mlflow's hook, imported when it runs,
ends the step's MLflow run as FAILED when the step fails and as FINISHED after the last step."""

import dagster as dg
import pytest

from resources.tracking import end_mlflow_on_run_finished, mlflow_tracking


@pytest.mark.parametrize("fails", [True, False])
def test_the_hook_ends_the_mlflow_run_with_the_steps_outcome(tmp_path, monkeypatch, fails):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow.set_tracking_uri (dagster-mlflow calls it) exports the URI: the suite's comes back after
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking = mlflow_tracking.configured(
        {
            "experiment_name": "hooked",
            "mlflow_tracking_uri": uri,
            "artifact_location": (tmp_path / "artifacts").as_uri(),
        }
    )

    @dg.op(required_resource_keys={"mlflow"})
    def step(context):
        context.resources.mlflow.log_param("fails", fails)
        if fails:
            raise RuntimeError("on purpose")

    @dg.job(resource_defs={"mlflow": tracking}, hooks={end_mlflow_on_run_finished})
    def tracked():
        step()

    result = tracked.execute_in_process(raise_on_error=False)
    assert result.success is not fails
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hooked").experiment_id])
    assert run.data.params == {"fails": str(fails)}
    assert run.info.status == ("FAILED" if fails else "FINISHED")
    assert run.data.tags["dagster_run_id"] == result.run_id

"""Tracking role: MLflow (a local SQLite store, or a tracking server)."""

from __future__ import annotations

import dagster as dg


class MLflowTracking(dg.ConfigurableResource):
    tracking_uri: str
    experiment: str = "cvgraph"
    artifact_location: str | None = None

    def _client(self):
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):
            from pathlib import Path

            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is None:
            exp = mlflow.get_experiment(
                mlflow.create_experiment(self.experiment, artifact_location=self.artifact_location)
            )
        return mlflow.MlflowClient(self.tracking_uri), exp.experiment_id

    def log_training(
        self, model_key: str, subset_hash: str, params: dict, metrics: dict, artifacts: list[str]
    ) -> str:
        """One MLflow run per (model, subset manifest, spec); logging again returns the same run."""
        import hashlib
        import json

        client, exp_id = self._client()
        spec_hash = hashlib.sha256(
            json.dumps(params, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        tags = {
            "cvgraph.model": model_key,
            "cvgraph.subset_hash": subset_hash,
            "cvgraph.spec_hash": spec_hash,
        }
        found = client.search_runs(
            [exp_id], " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        )  # keys are validated: no quotes
        if found:
            return found[0].info.run_id
        run = client.create_run(exp_id, run_name=model_key, tags=tags)
        rid = run.info.run_id
        for k, v in sorted(params.items()):
            client.log_param(rid, k, v)
        for rec in metrics["history"]:
            for k in ("train_loss", "val_loss", "val_accuracy"):
                client.log_metric(rid, k, rec[k], step=rec["epoch"])
        client.log_metric(rid, "test_accuracy", metrics["test_accuracy"])
        for path in artifacts:
            client.log_artifact(rid, path)
        client.set_terminated(rid)
        return rid

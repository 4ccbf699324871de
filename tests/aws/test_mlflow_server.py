"""The tracking server that lasts (deploy/mlflow/serve.py, the entrypoint of the image the
tracking stack runs): a real ``mlflow server`` process on 127.0.0.1 with its metadata in
PostgreSQL (the session's throwaway cluster), artifacts proxied to S3 (moto), MLflow's basic auth
in front. A user's commands train, register, evaluate and promote through it; the server is
restarted (as ECS replaces a task) and every run, version, artifact and the champion are still
there. A SageMaker training job reads the server's credentials from Secrets Manager itself and
logs its live curves there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests

from tests.lake_state import SQL, cvgraph

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "deploy" / "mlflow" / "serve.py"
ARTIFACTS_BUCKET = "cvgraph-mlflow-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tracking_server(env: dict[str, str], port: int):
    """``python serve.py`` as the image runs it, until the block ends (SIGTERM, as ECS stops a
    task); yields its URL once /health answers."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVE)],
        env={**env, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the tracking server exited: {proc.stdout.read()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the tracking server did not answer /health"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def server_env(moto_endpoint, postgres_database, request) -> dict[str, str]:
    """What the tracking stack's task definition gives serve.py: a new database, an artifacts
    destination in S3, a generated admin password."""
    from tests.aws.conftest import CREDENTIALS

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, **_keys(CREDENTIALS))
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=ARTIFACTS_BUCKET)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        **CREDENTIALS,
        "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,  # the server's own S3 client: moto
        # the parts the stack gives (the RDS secret's keys); trust auth ignores the password,
        # which is there to be quoted into the URI
        **_database_parts(postgres_database(f"mlflow_{request.node.name[5:40]}")),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{ARTIFACTS_BUCKET}/lake/mlflow",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(16) + "%&@:",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }


def _database_parts(url: str) -> dict[str, str]:
    from urllib.parse import urlparse

    u = urlparse(url)
    return {
        "MLFLOW_DB_HOST": u.hostname,
        "MLFLOW_DB_PORT": str(u.port),
        "MLFLOW_DB_NAME": u.path.lstrip("/"),
        "MLFLOW_DB_USER": u.username,
        "MLFLOW_DB_PASSWORD": "p@ss:w/rd%40#",
    }


def _keys(credentials: dict) -> dict:
    return {
        "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
        "region_name": credentials["AWS_DEFAULT_REGION"],
    }


def test_mlflow_server_keeps_runs_versions_artifacts_and_the_champion_across_a_restart(
    server_env, moto_endpoint, user_env, tmp_path
):
    from cvgraph.demo_packs import digit_members, zip_bytes
    from tests.aws.conftest import CREDENTIALS

    port = _free_port()
    user = {
        **user_env(tmp_path / "home"),
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": server_env["MLFLOW_AUTH_ADMIN_PASSWORD"],
    }
    pack = tmp_path / "digits.zip"
    pack.write_bytes(zip_bytes(digit_members(size=32, limit=90, classes=(0, 1, 2))))
    with tracking_server(server_env, port) as url:
        user["MLFLOW_TRACKING_URI"] = url
        # no credentials, a wrong password: refused (the health check alone is open)
        assert (
            requests.get(f"{url}/api/2.0/mlflow/experiments/search", timeout=5).status_code == 401
        )
        wrong = {**user, "MLFLOW_TRACKING_PASSWORD": "not-it"}
        cvgraph(user, "upload", str(pack))
        cvgraph(user, "sync")
        cvgraph(user, "freeze", "s", SQL)
        refused = cvgraph(wrong, "train", "m", "--subset", "s", "--epochs", "1", check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        first = json.loads(
            cvgraph(user, "train", "m", "--subset", "s", "--epochs", "1", "--json").stdout
        )
        one = json.loads(cvgraph(user, "evaluate", "m", "s", "--json").stdout)
        second = json.loads(
            cvgraph(
                user, "train", "m", "--subset", "s", "--epochs", "3", "--seed", "1", "--json"
            ).stdout
        )
        two = json.loads(cvgraph(user, "evaluate", "m", "s", "--json").stdout)
    assert (first["mlflow_model_version"], second["mlflow_model_version"]) == ("1", "2")
    assert first["model_sha256"] != second["model_sha256"]
    assert one["champion"]["after"] == "1"
    champion = "2" if two["scores"]["accuracy"] > one["scores"]["accuracy"] else "1"
    assert two["champion"]["after"] == champion, two["champion"]

    with tracking_server(server_env, port) as url:  # ECS replaced the task
        import mlflow

        os.environ.update(
            MLFLOW_TRACKING_USERNAME="admin",
            MLFLOW_TRACKING_PASSWORD=server_env["MLFLOW_AUTH_ADMIN_PASSWORD"],
        )
        try:
            client = mlflow.MlflowClient(url)
            assert client.get_model_version_by_alias("m", "champion").version == champion
            versions = {v.version: v for v in client.search_model_versions("name = 'm'")}
            assert sorted(versions) == ["1", "2"]
            for rec in (first, second):
                run = client.get_run(rec["mlflow_run_id"])
                assert run.info.status == "FINISHED"
                # the live curve: one train_loss per epoch, logged by the training as it went
                epochs = rec["spec"]["epochs"]
                assert len(client.get_metric_history(run.info.run_id, "train_loss")) == epochs
                # the weights went through the server to S3, and come back the same bytes
                got = Path(client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path)))
                assert hashlib.sha256(got.read_bytes()).hexdigest() == rec["model_sha256"]
            eval_runs = client.search_runs(
                [client.get_experiment_by_name("cvgraph").experiment_id],
                "tags.`cvgraph.eval_subset` = 's'",
            )
            assert sorted(r.data.tags["cvgraph.model_version"] for r in eval_runs) == ["1", "2"]
        finally:
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(k, None)
        # the artifacts are in the bucket, under the destination: no client wrote there directly
        s3 = boto3.client("s3", endpoint_url=moto_endpoint, **_keys(CREDENTIALS))
        keys = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=ARTIFACTS_BUCKET, Prefix="lake/mlflow/"
            )
            for o in page.get("Contents", [])
        ]
        assert sum(k.endswith("/model.pt") for k in keys) == 2, keys
        # and a user's command after the restart logs through it (the exports of v2)
        user["MLFLOW_TRACKING_URI"] = url
        exported = json.loads(cvgraph(user, "export", "m", "--json").stdout)
        assert exported["model_version"] == "2"
        onnx = s3.get_object(
            Bucket=ARTIFACTS_BUCKET,
            Key=f"lake/mlflow/1/{exported['mlflow_run_id']}/artifacts/onnx/model.onnx",
        )["Body"].read()
        assert hashlib.sha256(onnx).hexdigest() == exported["formats"]["onnx"]["sha256"]


def test_a_sagemaker_job_logs_live_curves_to_the_mlflow_server_with_its_secrets_credentials(
    shards_on_s3, aws, server_env
):
    """The job gets the tracking URI, its run and the ARN of the server's credentials (the
    secret the stack made), never the password: it reads the secret with its own role. Each
    epoch reaches the server as it ends."""
    import mlflow

    from tests.aws.test_sagemaker import HP, in_asset, trainer

    lake, _, _ = shards_on_s3
    password = server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    arn = boto3.client("secretsmanager").create_secret(
        Name="cvgraph/mlflow-admin",
        SecretString=json.dumps({"username": "admin", "password": password}),
    )["ARN"]
    with tracking_server(server_env, _free_port()) as url:
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        try:
            client = mlflow.MlflowClient(url)
            run_id = client.create_run(client.create_experiment("live")).info.run_id
        finally:  # the job's process inherits none of it (the harness passes this environment)
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(k)
        live = {"mlflow_tracking_uri": url, "mlflow_run_id": run_id}
        result, _ = in_asset(
            lambda ctx: trainer(tracking_secret_arn=arn).train(
                ctx, lake, "cvgraph-live-abc", "subsets/all/shards/resized", "live", {**HP, **live}
            )
        )
        assert result.success
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        try:
            history = mlflow.MlflowClient(url).get_metric_history(run_id, "train_loss")
        finally:
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(k)
    assert [m.step for m in history] == list(range(1, HP["epochs"] + 1))
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName="cvgraph-live-abc-0")
    assert job["HyperParameters"]["mlflow_secret_arn"] == arn
    assert password not in json.dumps(job, default=str)

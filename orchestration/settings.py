"""The settings every process starts from, read without importing Dagster (so ``cvgraph upload``
starts fast). The rest of the settings are read by ``orchestration.profiles``, beside the
resources they configure; every one is in the README's settings table."""

from __future__ import annotations

import os
from pathlib import Path

PROFILES = ("local", "aws")


class SettingError(ValueError):
    """A setting missing or wrong: the CLI prints its one line (README, Settings)."""


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def profile() -> str:
    """CVGRAPH_PROFILE: which resources play each role (``orchestration.profiles``)."""
    p = env("CVGRAPH_PROFILE", "local")
    if p not in PROFILES:
        raise SettingError(f"CVGRAPH_PROFILE={p!r}: expected one of {sorted(PROFILES)}")
    return p


def home() -> Path:
    """CVGRAPH_HOME: the embedded lake, the Dagster instance, MLflow's store, scratch space."""
    return Path(env("CVGRAPH_HOME", ".cvgraph")).resolve()


def lake_url(profile_name: str | None = None) -> str:
    """CVGRAPH_LAKE_URL: a directory (default CVGRAPH_HOME/lake) or, on AWS, s3://bucket/prefix."""
    if (profile_name or profile()) == "aws":
        url = os.environ.get("CVGRAPH_LAKE_URL", "")
        if not url.startswith("s3://"):
            raise SettingError("CVGRAPH_PROFILE=aws needs CVGRAPH_LAKE_URL=s3://bucket/prefix")
        return url
    return env("CVGRAPH_LAKE_URL", str(home() / "lake"))


def endpoint_url() -> str | None:
    """AWS_ENDPOINT_URL: where boto3 sends AWS requests (unset: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL") or None


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI: MLflow's tracking store and model registry (default: SQLite under
    CVGRAPH_HOME/mlflow)."""
    return env("MLFLOW_TRACKING_URI", f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}")


def is_server_uri(tracking_uri: str) -> bool:
    """Whether ``tracking_uri`` is a tracking server (which outlives the process), not a store on
    this machine's disk (SQLite, a directory)."""
    return tracking_uri.startswith(("http://", "https://", "databricks"))


def check_tracking(tracking_uri: str, profile_name: str) -> None:
    """On the aws profile every run is a task of its own (ECS, EcsRunLauncher) whose disk goes
    with it: a tracking store on that disk would lose every MLflow run, registered version and
    champion. So the aws profile needs a tracking server (deploy/cloudformation/tracking.yaml),
    unless CVGRAPH_ALLOW_LOCAL_TRACKING=true (a try from a laptop, whose disk stays)."""
    if profile_name != "aws" or is_server_uri(tracking_uri):
        return
    if env("CVGRAPH_ALLOW_LOCAL_TRACKING", "false").lower() == "true":
        return
    raise SettingError(
        f"CVGRAPH_PROFILE=aws needs MLFLOW_TRACKING_URI=http(s)://<tracking server>, not "
        f"{tracking_uri.split('?')[0]!r} (a run's disk goes with it; "
        "CVGRAPH_ALLOW_LOCAL_TRACKING=true allows it on a laptop; README, Running on AWS)"
    )

"""The one place that reads the environment and picks each role's resource per profile.

Every setting is documented in the README's settings table.
"""

from __future__ import annotations

import os
from pathlib import Path

from resources.catalog import DuckDBCatalog
from resources.compute import LocalProcessPool
from resources.settings import ImageSettings
from resources.storage import LakeResource
from resources.tracking import MLflowTracking
from resources.training import LocalTrainer

PROFILES = ("local", "aws")


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def profile() -> str:
    p = env("CVGRAPH_PROFILE", "local")
    if p not in PROFILES:
        raise ValueError(f"CVGRAPH_PROFILE={p!r}: expected one of {PROFILES}")
    return p


def home() -> Path:
    """CVGRAPH_HOME: the embedded lake, the Dagster instance, MLflow's store, scratch space."""
    return Path(env("CVGRAPH_HOME", ".cvgraph")).resolve()


def dagster_home() -> Path:
    """The Dagster instance directory (DAGSTER_HOME, default CVGRAPH_HOME/dagster), created with a dagster.yaml."""
    d = Path(env("DAGSTER_HOME", str(home() / "dagster"))).resolve()
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("telemetry:\n  enabled: false\n")
    return d


def image_settings() -> ImageSettings:
    return ImageSettings(
        size=int(env("CVGRAPH_IMAGE_SIZE", "64")),
        jpeg_quality=int(env("CVGRAPH_JPEG_QUALITY", "90")),
        edge_low=int(env("CVGRAPH_EDGE_LOW", "50")),
        edge_high=int(env("CVGRAPH_EDGE_HIGH", "150")),
    )


def resources_for(name: str | None = None) -> dict:
    name = name or profile()
    if name == "aws":
        raise NotImplementedError("CVGRAPH_PROFILE=aws: the AWS resources are not built yet (issue 3); use the local profile")
    h = home()
    lake = LakeResource(url=env("CVGRAPH_LAKE_URL", str(h / "lake")))
    return {
        "lake": lake,
        "image_compute": LocalProcessPool(
            max_workers=int(env("CVGRAPH_WORKERS", str(os.cpu_count() or 2))),
            threads_per_worker=int(env("CVGRAPH_IMAGE_THREADS", "4")),
        ),
        "trainer": LocalTrainer(work_dir=str(h / "training")),
        "catalog": DuckDBCatalog(lake=lake),
        "tracking": MLflowTracking(
            tracking_uri=env("MLFLOW_TRACKING_URI", f"sqlite:///{h / 'mlflow' / 'mlflow.db'}"),
            artifact_location=env("CVGRAPH_MLFLOW_ARTIFACTS", (h / "mlflow" / "artifacts").as_uri()),
        ),
        "image_settings": image_settings(),
    }

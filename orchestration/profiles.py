"""Each role's resource per profile, side by side, and the settings that configure them (the
few every process starts from are in ``orchestration.settings``). Every setting is in the
README's settings table.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from orchestration.settings import (
    SettingError,
    check_tracking,
    endpoint_url,
    env,
    home,
    is_server_uri,
    lake_url,
    mlflow_tracking_uri,
    profile,
)
from resources.batch import BatchArrayClient
from resources.catalog import AthenaCatalog, DuckDBCatalog
from resources.compute import ImageCompute, LocalProcessPool
from resources.events import IncomingListing, PackEvents
from resources.labeller import Labeller
from resources.settings import CostSettings, ImageSettings
from resources.storage import LakeResource
from resources.tables import PyArrowTableWriter, TableWriter
from resources.tracking import mlflow_tracking
from resources.training import LocalTrainer, SageMakerTrainer
from workloads.layout import check_name


def image_settings() -> ImageSettings:
    return ImageSettings(
        size=int(env("CVGRAPH_IMAGE_SIZE", "64")),
        jpeg_quality=int(env("CVGRAPH_JPEG_QUALITY", "90")),
        edge_low=int(env("CVGRAPH_EDGE_LOW", "50")),
        edge_high=int(env("CVGRAPH_EDGE_HIGH", "150")),
        shard_images=int(env("CVGRAPH_SHARD_IMAGES", "20000")),
    )


def cost_settings() -> CostSettings:
    """Rates and prices of estimates; defaults: ``workloads.costs`` (README, Cost before work)."""
    d = CostSettings()
    num = lambda name, default: float(env(name, str(default)))
    return CostSettings(
        images_per_vcpu_s=num("CVGRAPH_PLAN_IMAGES_PER_VCPU_S", d.images_per_vcpu_s),
        task_start_s=num("CVGRAPH_PLAN_TASK_START_S", d.task_start_s),
        task_vcpus=num("CVGRAPH_PLAN_TASK_VCPUS", d.task_vcpus),
        task_memory_gb=num("CVGRAPH_PLAN_TASK_MEMORY_GB", d.task_memory_gb),
        child_work_s=num("CVGRAPH_PLAN_CHILD_WORK_S", d.child_work_s),
        max_children=int(num("CVGRAPH_PLAN_MAX_CHILDREN", d.max_children)),
        prefix_task_s=num("CVGRAPH_PLAN_PREFIX_TASK_S", d.prefix_task_s),
        record_speedup=num("CVGRAPH_PLAN_RECORD_SPEEDUP", d.record_speedup),
        vcpu_hour_usd=num("CVGRAPH_PRICE_VCPU_HOUR", d.vcpu_hour_usd),
        gb_hour_usd=num("CVGRAPH_PRICE_GB_HOUR", d.gb_hour_usd),
        s3_put_per_1000_usd=num("CVGRAPH_PRICE_S3_PUT_1000", d.s3_put_per_1000_usd),
        s3_get_per_1000_usd=num("CVGRAPH_PRICE_S3_GET_1000", d.s3_get_per_1000_usd),
    )


def labeller() -> Labeller:
    """CVGRAPH_LABELLER: the model key whose champion's export scores every pack
    (``pack_predictions``); unset: none. Its champion is read from the MLflow registry."""
    model = os.environ.get("CVGRAPH_LABELLER") or None
    if model:
        try:
            check_name("model", model)
        except ValueError as e:
            raise SettingError(f"CVGRAPH_LABELLER: {e}") from None
    return Labeller(model=model, tracking_uri=mlflow_tracking_uri())


def _required(*names: str) -> dict[str, str]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise SettingError(
            f"CVGRAPH_PROFILE=aws needs {', '.join(missing)} (see README, Running on AWS)"
        )
    return {n: os.environ[n] for n in names}


def _listed(name: str) -> list[str]:
    """A comma-separated setting as a list (unset: empty)."""
    return [v for v in os.environ.get(name, "").split(",") if v]


def tracking_config(h: Path, profile_name: str) -> dict:
    """The tracking resource's configuration. A tracking server keeps the artifacts itself
    (proxied to its ``--artifacts-destination``) unless CVGRAPH_MLFLOW_ARTIFACTS says where; a
    store on disk puts them beside it."""
    uri = mlflow_tracking_uri()
    check_tracking(uri, profile_name)
    beside = None if is_server_uri(uri) else (h / "mlflow" / "artifacts").as_uri()
    return {
        "experiment_name": env("CVGRAPH_MLFLOW_EXPERIMENT", "cvgraph"),
        "mlflow_tracking_uri": uri,
        "artifact_location": os.environ.get("CVGRAPH_MLFLOW_ARTIFACTS") or beside,
    }


def _tracking(h: Path, profile_name: str) -> dg.ResourceDefinition:
    """dagster-mlflow's resource (``resources.tracking.mlflow_tracking``), configured."""
    return mlflow_tracking.configured(tracking_config(h, profile_name))


def table_writer(compute: ImageCompute) -> TableWriter:
    """CVGRAPH_TABLE_WRITER=pyarrow (default: the tables workload, where ``compute`` runs tasks) or
    spark (dagster-pyspark, lazily started)."""
    kind = env("CVGRAPH_TABLE_WRITER", "pyarrow")
    if kind == "pyarrow":
        return PyArrowTableWriter(compute=compute)
    if kind == "spark":
        from dagster_pyspark import LazyPySparkResource

        from resources.spark import SparkTableWriter

        return SparkTableWriter(
            spark=LazyPySparkResource(
                spark_config={
                    "spark.master": env("CVGRAPH_SPARK_MASTER", "local[2]"),
                    "spark.sql.session.timeZone": "UTC",
                    "spark.ui.enabled": "false",
                    "spark.sql.shuffle.partitions": "16",
                }
            )
        )
    raise SettingError(f"CVGRAPH_TABLE_WRITER={kind!r}: expected pyarrow or spark")


def local_resources() -> dict:
    """Everything on this machine: a directory lake, worker processes, DuckDB, local training."""
    h = home()
    lake = LakeResource(url=lake_url("local"))
    compute = LocalProcessPool(
        max_workers=int(env("CVGRAPH_WORKERS", str(os.cpu_count() or 2))),
        threads_per_worker=int(env("CVGRAPH_IMAGE_THREADS", "4")),
    )
    return {
        "lake": lake,
        "image_compute": compute,
        "table_writer": table_writer(compute),
        "trainer": LocalTrainer(
            work_dir=str(h / "training"),
            sweep_storage=env("CVGRAPH_SWEEP_STORAGE", f"sqlite:///{h / 'sweeps' / 'optuna.db'}"),
        ),
        "catalog": DuckDBCatalog(lake=lake),
        "mlflow": _tracking(h, "local"),
        "image_settings": image_settings(),
        "cost_settings": cost_settings(),
        # A scan of a local directory is cheap: every tick, so a new zip never waits for a relist.
        "incoming_listing": IncomingListing(
            relist_seconds=float(env("CVGRAPH_SENSOR_RELIST_SECONDS", "0"))
        ),
        "pack_events": PackEvents(),  # a directory has no notifications: the listing alone
        "labeller": labeller(),
    }


def aws_resources() -> dict:
    """S3 lake, Batch array jobs, SageMaker training, Athena over Glue, SQS events."""
    v = _required(
        "CVGRAPH_LAKE_URL",
        "CVGRAPH_BATCH_JOB_QUEUE",
        "CVGRAPH_BATCH_JOB_DEFINITION",
        "CVGRAPH_SAGEMAKER_ROLE_ARN",
        "CVGRAPH_TRAINING_IMAGE",
        "CVGRAPH_GLUE_DATABASE",
    )
    lake = LakeResource(url=lake_url("aws"), endpoint_url=endpoint_url())
    compute = BatchArrayClient(
        job_queue=v["CVGRAPH_BATCH_JOB_QUEUE"],
        job_definition=v["CVGRAPH_BATCH_JOB_DEFINITION"],
        poll_seconds=float(env("CVGRAPH_BATCH_POLL_SECONDS", "10")),
        start_timeout_seconds=float(env("CVGRAPH_BATCH_START_TIMEOUT_SECONDS", "3600")),
    )
    return {
        "lake": lake,
        "image_compute": compute,
        "table_writer": table_writer(compute),
        "trainer": SageMakerTrainer(
            role_arn=v["CVGRAPH_SAGEMAKER_ROLE_ARN"],
            training_image=v["CVGRAPH_TRAINING_IMAGE"],
            instance_types=env(
                "CVGRAPH_TRAINING_INSTANCE_TYPES", "ml.m5.large,ml.c5.xlarge,ml.m5.xlarge"
            ).split(","),
            use_spot=env("CVGRAPH_TRAINING_SPOT", "true").lower() == "true",
            max_runtime_seconds=int(env("CVGRAPH_TRAINING_MAX_RUNTIME", "3600")),
            poll_seconds=float(env("CVGRAPH_SAGEMAKER_POLL_SECONDS", "15")),
            start_timeout_seconds=float(env("CVGRAPH_SAGEMAKER_START_TIMEOUT_SECONDS", "3600")),
            pipes_interval=float(env("CVGRAPH_PIPES_INTERVAL", "10")),
            tracking_secret_arn=os.environ.get("CVGRAPH_MLFLOW_SECRET_ARN") or None,
            # a run's disk goes with its task: in memory unless a database is given (the lake
            # keeps every finished trial; a re-run draws the same trials)
            sweep_storage=os.environ.get("CVGRAPH_SWEEP_STORAGE", ""),
            subnets=_listed("CVGRAPH_TRAINING_SUBNETS"),
            security_group_ids=_listed("CVGRAPH_TRAINING_SECURITY_GROUPS"),
            # a sweep: one SageMaker tuning job (false: trials Optuna draws, one job each)
            tuning_jobs=env("CVGRAPH_SAGEMAKER_TUNING_JOBS", "true").lower() == "true",
            tuning_strategy=env("CVGRAPH_SAGEMAKER_TUNING_STRATEGY", "Bayesian"),
        ),
        "catalog": AthenaCatalog(
            lake=lake,
            database=v["CVGRAPH_GLUE_DATABASE"],
            workgroup=env("CVGRAPH_ATHENA_WORKGROUP", "primary"),
            output_location=os.environ.get("CVGRAPH_ATHENA_OUTPUT") or None,
            poll_seconds=float(env("CVGRAPH_ATHENA_POLL_SECONDS", "1")),
            timeout_seconds=float(env("CVGRAPH_ATHENA_TIMEOUT_SECONDS", "1800")),
        ),
        "mlflow": _tracking(home(), "aws"),
        "image_settings": image_settings(),
        "cost_settings": cost_settings(),
        # SQS notifications are the primary path on AWS; the full listing is the safety net.
        "incoming_listing": IncomingListing(
            relist_seconds=float(env("CVGRAPH_SENSOR_RELIST_SECONDS", "300"))
        ),
        # CVGRAPH_SQS_QUEUE_URL unset: the listing sensor alone.
        "pack_events": PackEvents(queue_url=os.environ.get("CVGRAPH_SQS_QUEUE_URL") or None),
        "labeller": labeller(),
    }


# Side by side, as Dagster's project_fully_featured keys resources by deployment: every profile
# gives the same resource keys, so the assets are the same in each.
RESOURCES_BY_PROFILE = {"local": local_resources, "aws": aws_resources}


def resources_for(name: str | None = None) -> dict:
    return RESOURCES_BY_PROFILE[name or profile()]()

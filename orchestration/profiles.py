"""Each role's resource per profile, side by side, and the settings that configure them (the
few every process starts from are in ``orchestration.settings``). Every setting is in the
README's settings table.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pydantic

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

R = TypeVar("R", bound=dg.ConfigurableResource)


# The settings of each resource: {field: variable}. A variable the environment sets configures
# its field (pydantic converts the text: "4", "0.5", "true"; a list field's is comma-separated);
# unset, the field keeps the resource's own default, written once on the resource (README's
# settings table shows it: tests/test_settings_documented.py compares them).
IMAGE_SETTINGS = {
    "size": "CVGRAPH_IMAGE_SIZE",
    "jpeg_quality": "CVGRAPH_JPEG_QUALITY",
    "edge_low": "CVGRAPH_EDGE_LOW",
    "edge_high": "CVGRAPH_EDGE_HIGH",
    "shard_images": "CVGRAPH_SHARD_IMAGES",
}
COST_SETTINGS = {
    "images_per_vcpu_s": "CVGRAPH_PLAN_IMAGES_PER_VCPU_S",
    "task_start_s": "CVGRAPH_PLAN_TASK_START_S",
    "task_vcpus": "CVGRAPH_PLAN_TASK_VCPUS",
    "task_memory_gb": "CVGRAPH_PLAN_TASK_MEMORY_GB",
    "child_work_s": "CVGRAPH_PLAN_CHILD_WORK_S",
    "max_children": "CVGRAPH_PLAN_MAX_CHILDREN",
    "prefix_task_s": "CVGRAPH_PLAN_PREFIX_TASK_S",
    "record_speedup": "CVGRAPH_PLAN_RECORD_SPEEDUP",
    "vcpu_hour_usd": "CVGRAPH_PRICE_VCPU_HOUR",
    "gb_hour_usd": "CVGRAPH_PRICE_GB_HOUR",
    "s3_put_per_1000_usd": "CVGRAPH_PRICE_S3_PUT_1000",
    "s3_get_per_1000_usd": "CVGRAPH_PRICE_S3_GET_1000",
}
LOCAL_POOL = {"max_workers": "CVGRAPH_WORKERS", "threads_per_worker": "CVGRAPH_IMAGE_THREADS"}
BATCH = {
    # the same setting as the local pool's: I/O-overlap threads of an image task
    "threads_per_job": "CVGRAPH_IMAGE_THREADS",
    "poll_seconds": "CVGRAPH_BATCH_POLL_SECONDS",
    "start_timeout_seconds": "CVGRAPH_BATCH_START_TIMEOUT_SECONDS",
}
SAGEMAKER = {
    "instance_types": "CVGRAPH_TRAINING_INSTANCE_TYPES",
    "use_spot": "CVGRAPH_TRAINING_SPOT",
    "max_runtime_seconds": "CVGRAPH_TRAINING_MAX_RUNTIME",
    "poll_seconds": "CVGRAPH_SAGEMAKER_POLL_SECONDS",
    "start_timeout_seconds": "CVGRAPH_SAGEMAKER_START_TIMEOUT_SECONDS",
    "pipes_interval": "CVGRAPH_PIPES_INTERVAL",
    "tracking_secret_arn": "CVGRAPH_MLFLOW_SECRET_ARN",
    # a run's disk goes with its task: in memory unless a database is given (the lake keeps
    # every finished trial; a re-run draws the same trials)
    "sweep_storage": "CVGRAPH_SWEEP_STORAGE",
    "subnets": "CVGRAPH_TRAINING_SUBNETS",
    "security_group_ids": "CVGRAPH_TRAINING_SECURITY_GROUPS",
    # a sweep: one SageMaker tuning job (false: trials Optuna draws, one job each)
    "tuning_jobs": "CVGRAPH_SAGEMAKER_TUNING_JOBS",
    "tuning_strategy": "CVGRAPH_SAGEMAKER_TUNING_STRATEGY",
}
ATHENA = {
    "workgroup": "CVGRAPH_ATHENA_WORKGROUP",
    "output_location": "CVGRAPH_ATHENA_OUTPUT",
    "poll_seconds": "CVGRAPH_ATHENA_POLL_SECONDS",
    "timeout_seconds": "CVGRAPH_ATHENA_TIMEOUT_SECONDS",
}
# Every resource configured from the environment, with its settings.
SETTINGS = (
    (ImageSettings, IMAGE_SETTINGS),
    (CostSettings, COST_SETTINGS),
    (LocalProcessPool, LOCAL_POOL),
    (BatchArrayClient, BATCH),
    (SageMakerTrainer, SAGEMAKER),
    (AthenaCatalog, ATHENA),
)


def configured(resource: type[R], settings: dict[str, str], **given) -> R:
    """``resource`` with ``given`` fields and those of its ``settings`` the environment sets; a
    value its field cannot take is a SettingError naming the variable."""
    fields = {}
    for field, name in settings.items():
        if value := os.environ.get(name):
            listed = typing.get_origin(resource.model_fields[field].annotation) is list
            fields[field] = [v for v in value.split(",") if v] if listed else value
    try:
        return resource(**{**given, **fields})
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        raise SettingError(
            f"{settings.get(field, resource.__name__)}={fields.get(field, '')!s}: {error['msg']}"
        ) from None


def image_settings() -> ImageSettings:
    return configured(ImageSettings, IMAGE_SETTINGS)


def cost_settings() -> CostSettings:
    """Rates and prices of estimates; defaults: ``workloads.costs`` (README, Cost before work)."""
    return configured(CostSettings, COST_SETTINGS)


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
    compute = configured(LocalProcessPool, LOCAL_POOL, max_workers=os.cpu_count() or 2)
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
    compute = configured(
        BatchArrayClient,
        BATCH,
        job_queue=v["CVGRAPH_BATCH_JOB_QUEUE"],
        job_definition=v["CVGRAPH_BATCH_JOB_DEFINITION"],
    )
    return {
        "lake": lake,
        "image_compute": compute,
        "table_writer": table_writer(compute),
        "trainer": configured(
            SageMakerTrainer,
            SAGEMAKER,
            role_arn=v["CVGRAPH_SAGEMAKER_ROLE_ARN"],
            training_image=v["CVGRAPH_TRAINING_IMAGE"],
        ),
        "catalog": configured(
            AthenaCatalog, ATHENA, lake=lake, database=v["CVGRAPH_GLUE_DATABASE"]
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

"""Training role: run ``workloads.training.train`` with SageMaker's layout, bring the model back."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path

import dagster as dg
from pydantic import Field
from tqdm import tqdm

from resources.aws import (
    AwsResource,
    link_on_materializations,
    poll,
    sagemaker_console_url,
    stopped_on_interrupt,
)
from workloads.lake import LocalLake
from workloads.layout import PIPES, checkpoints_dir, model_keys
from workloads.training.byo import MODEL_FILE
from workloads.training.spec import check_spec
from workloads.training.sweep import (
    SweepPlan,
    Trial,
    objective,
    objective_name,
    parameter_ranges,
    trial_model_key,
    tuned_params,
    tuning_job_name,
)
from workloads.versions import sha256_hex


class TrainingFailed(Exception):
    pass


def pipes_hyperparameters(session) -> dict[str, str]:
    """A Pipes session's bootstrap parameters, passed as hyperparameters (see workloads.training.train)."""
    env = session.get_bootstrap_env_vars()
    return {
        "dagster_pipes_context": env["DAGSTER_PIPES_CONTEXT"],
        "dagster_pipes_messages": env["DAGSTER_PIPES_MESSAGES"],
    }


class Trainer(dg.ConfigurableResource, ABC):
    # Optuna's storage of sweeps' studies (``workloads.training.sweep``): a cache, since every
    # finished trial is in the lake and a trial's draw is seeded; "": in memory.
    sweep_storage: str = ""

    @abstractmethod
    def train(
        self,
        context: dg.AssetExecutionContext,
        lake,
        job_name: str,
        shards_key: str,
        model_key: str,
        hyperparameters: dict,
    ) -> dict:
        """Train on the subset's training shards under ``shards_key`` (their index and shards:
        ``workloads.layout.shard_keys``); ``hyperparameters["init_weights"]``, if set, is the
        lake key of the weights to start from. Store ``model.pt`` and ``metrics.json`` under
        ``models/<model_key>/`` in the lake; return the metrics."""

    def reaches(self, tracking_uri: str) -> bool:
        """Whether the training job can write to MLflow at ``tracking_uri`` (its live curves)."""
        return tracking_uri.startswith(("http://", "https://"))

    def runs_tuning_jobs(self) -> bool:
        """Whether a sweep is handed whole to the service's tuning jobs (``tune``) rather than
        drawn by cvgraph's Optuna study and trained trial by trial (``train``)."""
        return False

    def tune(
        self,
        context: dg.AssetExecutionContext,
        lake,
        *,
        plan: SweepPlan,
        shards_key: str,
        hyperparameters: dict,
    ) -> list[Trial]:
        """Run sweep ``plan`` as the service's tuning job: each trial's ``model.pt`` and
        ``metrics.json`` under its trial key; the trials in order (objective None: it did not
        finish)."""
        raise NotImplementedError(f"{type(self).__name__} runs no tuning jobs")


class LocalTrainer(Trainer):
    """A subprocess with SageMaker's file and env layout; its channels are the lake's own
    directories (the shards, the init weights' directory), read in place."""

    work_dir: str

    def reaches(self, tracking_uri: str) -> bool:
        return True  # a process on this host: SQLite or a server alike

    def train(self, context, lake, job_name, shards_key, model_key, hyperparameters):
        if not isinstance(lake, LocalLake):
            raise TrainingFailed(
                "LocalTrainer reads the shards in place and needs the local lake; use the aws profile's trainer for S3"
            )
        job = Path(self.work_dir) / job_name
        shutil.rmtree(job, ignore_errors=True)
        try:
            return self._train_in(
                job, context, lake, job_name, shards_key, model_key, hyperparameters
            )
        finally:  # the job's scratch (its config, checkpoints) is not kept, run or fail
            shutil.rmtree(job, ignore_errors=True)

    def _train_in(self, job: Path, context, lake, job_name, shards_key, model_key, hyperparameters):
        dirs = {
            name: job / name
            for name in (
                "input/config",
                "model",
                "output/data",
                "checkpoints",
            )
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        with dg.open_pipes_session(
            context, dg.PipesTempFileContextInjector(), dg.PipesTempFileMessageReader()
        ) as session:
            hp = {
                **hyperparameters,
                **pipes_hyperparameters(session),
                "checkpoint_dir": str(dirs["checkpoints"]),
            }
            self._run(context, lake, shards_key, dirs, hp, job_name, model_key)
        keys = model_keys(model_key)
        weights = output_key(model_key, hyperparameters)
        for name, key in ((Path(weights).name, weights), ("metrics.json", keys["metrics"])):
            if not (dirs["model"] / name).is_file():
                raise TrainingFailed(f"training job {job_name} wrote no {name} in SM_MODEL_DIR")
            lake.put_file(key, dirs["model"] / name)
        return json.loads((dirs["model"] / "metrics.json").read_text())

    def _run(
        self,
        context,
        lake,
        shards_key: str,
        dirs: dict[str, Path],
        hp: dict,
        job_name: str,
        model_key: str,
    ) -> None:
        init = hp.get("init_weights")
        if init:  # the init channel: the weights' directory; the entry reads its file there
            hp = {**hp, "init_weights": Path(init).name}
        manifest = hp.pop("manifest_key", "")
        entry = hp.get("entry_point")  # a script of the user's (workloads.training.byo)
        # SageMaker writes every hyperparameter as a string.
        (dirs["input/config"] / "hyperparameters.json").write_text(
            json.dumps({k: str(v) for k, v in hp.items()})
        )
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SM_INPUT_CONFIG_DIR": str(dirs["input/config"]),
            "SM_CHANNEL_SHARDS": str(lake.path(shards_key)),
            **({"SM_CHANNEL_MANIFEST": str(lake.path(manifest).parent)} if manifest else {}),
            **({"SM_CHANNEL_INIT": str(lake.path(init).parent)} if init else {}),
            "SM_MODEL_DIR": str(dirs["model"]),
            "SM_OUTPUT_DATA_DIR": str(dirs["output/data"]),
            "TRAINING_JOB_NAME": job_name,
        }
        context.log.info(
            f"training job {job_name}: { {k: v for k, v in hp.items() if not k.startswith('dagster_pipes')} }"
        )
        proc = subprocess.Popen(
            [sys.executable, entry]
            if entry
            else [sys.executable, "-m", "workloads.training.train"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        tail: list[str] = []
        bar = tqdm(
            total=int(hp.get("epochs", 0)),  # the entry says how many it runs (min_steps)
            desc=f"training {model_key}",
            unit="epoch",
            disable=None,
            leave=False,
        )
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                tail = (tail + [line])[-40:]
                planned = re.search(r" epochs=(\d+) ", line) if line.startswith("train=") else None
                if planned:
                    bar.total = int(planned.group(1))
                if line.startswith("epoch="):
                    bar.update(1)
                    bar.set_postfix_str(line.split(" ", 1)[1])
            proc.wait()
        except BaseException:  # any exit, not only a cancel: the job is this process's child
            proc.kill()
            raise
        finally:
            bar.close()
        if proc.returncode != 0:
            raise TrainingFailed(
                f"training job {job_name} exited {proc.returncode}:\n" + "\n".join(tail)
            )


def output_key(model_key: str, hyperparameters: dict) -> str:
    """Where a training's weights go in the lake: ``model.pt`` from the built-in entry, the
    ``model.onnx`` of an entry point of the user's (``workloads.training.byo``)."""
    if hyperparameters.get("entry_point"):
        return f"models/{model_key}/{MODEL_FILE}"
    return model_keys(model_key)["model"]


def job_base_name(job_name: str) -> str:
    """SageMaker job names: letters, digits and hyphens, at most 63 characters. Long names keep
    their tail (the spec hash), so two specs never share a name or a checkpoint path."""
    slug = re.sub(r"[^A-Za-z0-9-]", "-", job_name)
    return slug if len(slug) <= 50 else f"{slug[:41]}{slug[-9:]}"


CAPACITY_MARKERS = (
    "CapacityError",
    "InsufficientInstanceCapacity",
    "ResourceLimitExceeded",
    "insufficient capacity",
)


class SageMakerTrainer(Trainer, AwsResource):
    """SageMaker ``CreateTrainingJob``: managed spot with S3 checkpoints, instance-type fallback.

    The resource holds the configuration; ``get_runner`` gives the ``SageMakerTrainingRunner``
    and ``get_tuning_runner`` the ``SageMakerTuningRunner`` that create and wait for the jobs
    (as dagster-aws's ``S3Resource.get_client`` gives a client).

    The ``shards`` channel is the subset's training shards' prefix in ``FastFile`` mode: the
    job starts without copying its input, and reads each ~150 MB shard as a stream (a few
    ranged GETs per shard, none per image). ``init`` (File) holds the weights a fine-tune
    starts from. The channels' files sit where the local trainer's do, so the training entry
    is the same code.
    """

    role_arn: str
    training_image: str
    instance_types: list[str] = Field(
        ["ml.m5.large", "ml.c5.xlarge", "ml.m5.xlarge"],
        description="tried in this order on capacity errors",
    )
    use_spot: bool = Field(True, description="managed spot training (checkpoints in S3)")
    max_runtime_seconds: int = Field(3600, description="a training job's MaxRuntimeInSeconds")
    max_wait_seconds: int = 7200
    volume_gb: int = 10
    poll_seconds: float = Field(
        15.0, description="how often a step describes its training or tuning job"
    )
    start_timeout_seconds: float = Field(
        3600.0,
        description="a job still Starting this long (no instance) is stopped and the step fails; 0: no bound",
    )
    pipes_interval: float = Field(
        10.0,
        description="seconds between a job's Dagster Pipes message chunks (its log lines in the run)",
    )
    # (the SageMaker role may read it: the credentials are in no request or job description)
    tracking_secret_arn: str | None = Field(
        None,
        description="a Secrets Manager secret (JSON username, password) of the tracking server the job reads itself",
    )
    subnets: list[str] = Field(
        [],
        description="the job's VPC subnets (VpcConfig), where the internal tracking server is; empty: no VPC",
    )
    security_group_ids: list[str] = Field([], description="the job's security groups, with subnets")
    # A sweep as a SageMaker hyperparameter tuning job (this strategy: Bayesian, Random or
    # Hyperband; early stopping Auto but with Hyperband's own); False: trials drawn by cvgraph's
    # Optuna study, each a training job of its own.
    tuning_jobs: bool = Field(
        True,
        description="a sweep is one SageMaker tuning job; False: trials cvgraph's Optuna study draws, a job each",
    )
    tuning_strategy: str = Field(
        "Bayesian", description="the tuning job's strategy: Bayesian, Random or Hyperband"
    )

    def get_runner(self) -> SageMakerTrainingRunner:
        return SageMakerTrainingRunner(self._client("sagemaker"), config=self)

    def get_tuning_runner(self) -> SageMakerTuningRunner:
        return SageMakerTuningRunner(self._client("sagemaker"), config=self)

    def train(self, context, lake, job_name, shards_key, model_key, hyperparameters):
        _on_s3(lake)
        return self.get_runner().run(
            context=context,
            lake=lake,
            job_name=job_name,
            shards_key=shards_key,
            model_key=model_key,
            hyperparameters=hyperparameters,
        )

    def runs_tuning_jobs(self) -> bool:
        return self.tuning_jobs

    def tune(self, context, lake, *, plan, shards_key, hyperparameters):
        _on_s3(lake)
        return self.get_tuning_runner().run(
            context=context,
            lake=lake,
            plan=plan,
            shards_key=shards_key,
            hyperparameters=hyperparameters,
        )


def _on_s3(lake) -> None:
    """SageMaker reads its channels from S3 and writes its model there: a local lake is refused
    (before any client is made: no region is needed to say so)."""
    if not lake.url.startswith("s3://"):
        raise TrainingFailed("SageMakerTrainer needs the lake on S3")


def training_request(
    config: SageMakerTrainer,
    *,
    name: str,
    lake,
    channels: dict[str, tuple[dict, str]],  # name: (S3DataSource, InputMode)
    model_key: str,
    base_job: str,
    instance_type: str,
    hyperparameters: dict,
) -> dict:
    """The CreateTrainingJob request of ``config`` (a function of its own, so its exact shape is
    tested)."""
    req = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {
            "TrainingImage": hyperparameters.get("training_image") or config.training_image,
            "TrainingInputMode": "File",
            "MetricDefinitions": [
                {"Name": "train_loss", "Regex": r"train_loss=([0-9.]+)"},
                {"Name": "val_accuracy", "Regex": r"val_accuracy=([0-9.]+)"},
                {"Name": "test_accuracy", "Regex": r"test_accuracy=([0-9.]+)"},
                {"Name": "val_map", "Regex": r"val_map=([0-9.]+)"},
                {"Name": "test_map", "Regex": r"test_map=([0-9.]+)"},
                {"Name": "test_map50", "Regex": r"test_map50=([0-9.]+)"},
            ],
        },
        "RoleArn": config.role_arn,
        "HyperParameters": {
            k: str(v)
            for k, v in {**hyperparameters, "checkpoint_dir": "/opt/ml/checkpoints"}.items()
        },
        "InputDataConfig": [
            {
                "ChannelName": ch,
                "DataSource": {
                    "S3DataSource": {**spec, "S3DataDistributionType": "FullyReplicated"}
                },
                "InputMode": mode,
            }
            for ch, (spec, mode) in channels.items()
        ],
        "OutputDataConfig": {"S3OutputPath": lake.uri(model_keys(model_key)["sagemaker_output"])},
        "ResourceConfig": {
            "InstanceType": instance_type,
            "InstanceCount": 1,
            "VolumeSizeInGB": config.volume_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": config.max_runtime_seconds},
        "CheckpointConfig": {
            "S3Uri": lake.uri(checkpoints_dir(model_key, base_job)),
            "LocalPath": "/opt/ml/checkpoints",
        },
        "Tags": [{"Key": "cvgraph:model", "Value": model_key}],
    }
    if config.subnets:
        req["VpcConfig"] = {
            "Subnets": list(config.subnets),
            "SecurityGroupIds": list(config.security_group_ids),
        }
    if config.tracking_secret_arn and hyperparameters.get("mlflow_run_id"):
        req["HyperParameters"]["mlflow_secret_arn"] = config.tracking_secret_arn
    if config.use_spot:
        req["EnableManagedSpotTraining"] = True
        req["StoppingCondition"]["MaxWaitTimeInSeconds"] = max(
            config.max_wait_seconds, config.max_runtime_seconds
        )
    return req


def job_channels(lake, shards_key: str, hyperparameters: dict) -> tuple[dict, dict]:
    """The job's input channels, and its hyperparameters as the job reads them."""
    channels = {
        "shards": (
            {"S3DataType": "S3Prefix", "S3Uri": lake.uri(shards_key.rstrip("/") + "/")},
            "FastFile",
        )
    }
    if init := hyperparameters.get("init_weights"):  # one object: the channel's one file
        channels["init"] = ({"S3DataType": "S3Prefix", "S3Uri": lake.uri(init)}, "File")
        hyperparameters = {**hyperparameters, "init_weights": init.rsplit("/", 1)[-1]}
    if manifest := hyperparameters.get("manifest_key"):  # the subset's manifest.parquet
        channels["manifest"] = ({"S3DataType": "S3Prefix", "S3Uri": lake.uri(manifest)}, "File")
    if entry := hyperparameters.get("entry_point"):
        # SageMaker script mode: the image's training toolkit fetches the folder and runs it
        hyperparameters = {
            **hyperparameters,
            "sagemaker_program": Path(entry).name,
            "sagemaker_submit_directory": lake.uri(hyperparameters["source_key"]),
        }
    hyperparameters = {
        k: v
        for k, v in hyperparameters.items()
        if k not in ("manifest_key", "source_key", "entry_point")
    }
    return channels, hyperparameters


def bring_back(lake, final: dict, model_key: str, entry: str | None) -> dict:
    """A completed job's ``model.tar.gz``: its weights and ``metrics.json`` into the lake
    under ``model_key``; the metrics."""
    import io
    import tarfile

    artifact = final["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, _, key = artifact[len("s3://") :].partition("/")
    blob = lake.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    out = model_keys(model_key)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        files = {
            m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()
        }
    weights = output_key(model_key, {"entry_point": entry})
    for name in (Path(weights).name, "metrics.json"):
        if name not in files:
            raise TrainingFailed(f"training job of {model_key} wrote no {name} in SM_MODEL_DIR")
    lake.put(weights, files[Path(weights).name])
    lake.put(out["metrics"], files["metrics.json"])
    return json.loads(files["metrics.json"])


def tuning_request(
    config: SageMakerTrainer,
    lake,
    *,
    plan: SweepPlan,
    attempt: int,
    channels: dict,
    static: dict,
    trials: int,
) -> dict:
    """CreateHyperParameterTuningJob for ``trials`` more trials of ``plan`` (kept separate so
    its exact shape is tested): the training job ``train`` would start, the space's fields
    tuned, the instance types in order of preference, early stopping Auto; warm-started from
    the sweep's earlier (stopped) tuning jobs, if any."""
    name = tuning_job_name(plan, attempt)
    sweep_job = name.rsplit("-", 1)[0]  # every attempt's: the trials' checkpoints' folder
    base = training_request(
        config,
        name="",
        lake=lake,
        channels=channels,
        model_key=f"{plan.model}/trials/{plan.name}",
        base_job=sweep_job,
        instance_type=config.instance_types[0],
        hyperparameters={**static, "tuning_job": sweep_job},
    )
    definition = {
        k: base[k]
        for k in (
            "AlgorithmSpecification",
            "RoleArn",
            "InputDataConfig",
            "OutputDataConfig",
            "StoppingCondition",
            "CheckpointConfig",
            "EnableManagedSpotTraining",
            "VpcConfig",
        )
        if k in base
    }
    definition["StaticHyperParameters"] = base["HyperParameters"]
    definition["HyperParameterTuningResourceConfig"] = {
        "InstanceConfigs": [
            {"InstanceType": t, "InstanceCount": 1, "VolumeSizeInGB": config.volume_gb}
            for t in config.instance_types
        ],
        "AllocationStrategy": "Prioritized",  # the next type when one has no capacity
    }
    req = {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {
            "Strategy": config.tuning_strategy,
            "HyperParameterTuningJobObjective": {
                "Type": "Maximize",
                "MetricName": objective_name(plan.base),
            },
            "ResourceLimits": {
                "MaxNumberOfTrainingJobs": trials,
                "MaxParallelTrainingJobs": plan.parallel,
            },
            "ParameterRanges": parameter_ranges(plan.space),
            # Hyperband stops trials its own way and takes no other early stopping
            "TrainingJobEarlyStoppingType": (
                "Off" if config.tuning_strategy == "Hyperband" else "Auto"
            ),
            "RandomSeed": plan.seed,
        },
        "TrainingJobDefinition": definition,
        "Tags": [
            {"Key": "cvgraph:model", "Value": plan.model},
            {"Key": "cvgraph:sweep", "Value": plan.name},
        ],
    }
    if attempt:  # at most 5 parents: the latest
        req["WarmStartConfig"] = {
            "ParentHyperParameterTuningJobs": [
                {"HyperParameterTuningJobName": tuning_job_name(plan, a)}
                for a in range(max(0, attempt - 5), attempt)
            ],
            "WarmStartType": "IdenticalDataAndAlgorithm",
        }
    return req


class _SageMakerRunner:
    """What both runners share: the boto3 SageMaker client (in the constructor, as
    dagster-aws's Pipes clients take theirs) and the resource's configuration."""

    def __init__(self, client, *, config: SageMakerTrainer):
        self.client, self.config = client, config

    def _linked(self, context, kind: str, name: str) -> None:
        """Log job ``name``'s console page and link it on the step's materializations (a link
        a job: a fallback's or a sweep's jobs each keep theirs)."""
        url = sagemaker_console_url(self.client.meta.region_name, kind, name)
        what = kind.replace("-", " ").removesuffix("s")
        context.log.info(f"SageMaker {what} {name}: {url}")
        link_on_materializations(context, {f"sagemaker {what} {name}": url})

    def _found(self, describe, codes: tuple[str, ...] = ("ResourceNotFound",)) -> dict | None:
        """``describe(sagemaker client)``, or None if SageMaker has no such job (an error
        saying so, or one of ``codes``)."""
        from botocore.exceptions import ClientError

        try:
            return describe(self.client)
        except ClientError as e:
            if "Could not find" in str(e) or e.response.get("Error", {}).get("Code") in codes:
                return None
            raise


class SageMakerTrainingRunner(_SageMakerRunner):
    """A training job to its end: created on the first instance type with capacity, waited for
    (stopped if the Dagster run is cancelled), its model brought into the lake."""

    def run(self, *, context, lake, job_name, shards_key, model_key, hyperparameters) -> dict:
        """Train as ``Trainer.train`` says; the job's metrics."""
        from dagster_aws.pipes import PipesS3ContextInjector, PipesS3MessageReader

        entry = hyperparameters.get("entry_point")
        channels, hyperparameters = job_channels(lake, shards_key, hyperparameters)
        injector = PipesS3ContextInjector(
            bucket=lake.bucket, client=lake.client, key_prefix=f"{lake.prefix}/{PIPES}".lstrip("/")
        )
        reader = PipesS3MessageReader(
            bucket=lake.bucket, client=lake.client, interval=self.config.pipes_interval
        )
        with dg.open_pipes_session(context, injector, reader) as session:
            hp = {
                **hyperparameters,
                **pipes_hyperparameters(session),
                "pipes_interval": self.config.pipes_interval,
            }
            final = self._run_with_fallback(context, lake, job_name, channels, model_key, hp)
        return bring_back(lake, final, model_key, entry)

    def _describe(self, name: str) -> dict | None:
        """The training job ``name``, or None if there is none."""
        return self._found(lambda sm: sm.describe_training_job(TrainingJobName=name))

    def _wait(self, context, name: str) -> dict:
        """Poll the job until it ends; stop it if the run is cancelled meanwhile."""
        sm = self.client
        last = {}

        def stop() -> None:
            sm.stop_training_job(TrainingJobName=name)
            context.log.warning(f"stopped training job {name}")

        def log_change(d: dict) -> None:
            state = (d["TrainingJobStatus"], d.get("SecondaryStatus"))
            if last.get("state") != state:
                context.log.info(f"training job {name}: {state[0]} / {state[1]}")
                last["state"], last["since"] = state, time.monotonic()
            if (
                state == ("InProgress", "Starting")
                and self.config.start_timeout_seconds
                and time.monotonic() - last["since"] >= self.config.start_timeout_seconds
            ):
                stop()
                said = (d.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage")
                raise TrainingFailed(
                    f"training job {name} stayed Starting {self.config.start_timeout_seconds:g} s "
                    f"(CVGRAPH_SAGEMAKER_START_TIMEOUT_SECONDS): {said or 'no status message'}; "
                    "stopped"
                )

        with stopped_on_interrupt(stop):
            return poll(
                lambda: sm.describe_training_job(TrainingJobName=name),
                lambda d: d["TrainingJobStatus"] in ("Completed", "Failed", "Stopped"),
                self.config.poll_seconds,
                log_change,
            )

    def _run_with_fallback(
        self, context, lake, job_name: str, channels: dict, model_key: str, hyperparameters: dict
    ) -> dict:
        """Each instance type in order until one has capacity; the completed job's description."""
        from botocore.exceptions import ClientError

        base = job_base_name(job_name)
        for attempt, instance_type in enumerate(self.config.instance_types):
            name = f"{base}-{attempt}"
            prior = self._describe(name)  # names are never reusable on SageMaker
            if prior and prior["TrainingJobStatus"] == "Completed":
                context.log.info(f"training job {name} already completed; reusing its model")
                return prior
            if prior and prior["TrainingJobStatus"] in ("InProgress", "Stopping"):
                context.log.info(f"training job {name} is still running; waiting for it")
                self._linked(context, "jobs", name)
                prior = self._wait(context, name)
                if prior["TrainingJobStatus"] == "Completed":
                    return prior
            if prior:  # failed or stopped before: a fresh name, the same checkpoints to resume from
                name = f"{base}-{attempt}-{context.run.run_id[:8]}"
            try:
                self.client.create_training_job(
                    **training_request(
                        self.config,
                        name=name,
                        lake=lake,
                        channels=channels,
                        model_key=model_key,
                        base_job=base,
                        instance_type=instance_type,
                        hyperparameters=hyperparameters,
                    )
                )
            except ClientError as e:
                if any(m in str(e) for m in CAPACITY_MARKERS):
                    context.log.warning(
                        f"{instance_type}: no capacity ({e}); trying the next instance type"
                    )
                    continue
                raise
            self._linked(context, "jobs", name)
            d = self._wait(context, name)
            if d["TrainingJobStatus"] == "Completed":
                return d
            reason = d.get("FailureReason", d["TrainingJobStatus"])
            if d["TrainingJobStatus"] == "Failed" and any(m in reason for m in CAPACITY_MARKERS):
                context.log.warning(f"{instance_type}: {reason}; trying the next instance type")
                continue
            raise TrainingFailed(f"training job {name} on {instance_type}: {reason}")
        raise TrainingFailed(f"no capacity for any of {self.config.instance_types}")


class SageMakerTuningRunner(_SageMakerRunner):
    """A sweep as SageMaker hyperparameter tuning jobs, to its end: its trials' models brought
    into the lake."""

    def run(self, *, context, lake, plan, shards_key, hyperparameters) -> list[Trial]:
        """The sweep as tuning jobs named after it: an existing one is waited for or read (an
        orchestrator killed meanwhile finds it again); one stopped before all its trials ran is
        followed by another, warm-started from it, for the rest. Its trials are its training
        jobs in the order it started them, after the earlier jobs' (a job the stop cut short is
        not one)."""
        channels, static = job_channels(lake, shards_key, hyperparameters)
        static = {k: v for k, v in static.items() if k not in plan.space}
        jobs: list[dict] = []
        attempt = 0
        while len(jobs) < plan.trials:
            name = tuning_job_name(plan, attempt)
            d = self._describe_tuning(name)
            ours = d is None
            if ours:
                req = tuning_request(
                    self.config,
                    lake,
                    plan=plan,
                    attempt=attempt,
                    channels=channels,
                    static=static,
                    trials=plan.trials - len(jobs),
                )
                self.client.create_hyper_parameter_tuning_job(**req)
                context.log.info(
                    f"sweep {plan.name}: tuning job {name}, {plan.trials - len(jobs)} trials"
                )
                self._linked(context, "hyper-tuning-jobs", name)
            if ours or d["HyperParameterTuningJobStatus"] in ("InProgress", "Stopping"):
                if not ours:  # an orchestrator killed meanwhile left it running
                    context.log.info(f"sweep {plan.name}: tuning job {name} is running; waiting")
                    self._linked(context, "hyper-tuning-jobs", name)
                d = self._wait_tuning(context, name)
            status = d["HyperParameterTuningJobStatus"]
            ran = self._tuning_jobs_of(name)
            if status != "Completed":  # jobs a stop cut short are not trials
                ran = [j for j in ran if j["TrainingJobStatus"] in ("Completed", "Failed")]
            jobs += ran[: plan.trials - len(jobs)]
            if status == "Completed":
                break
            if ours:
                raise TrainingFailed(
                    f"tuning job {name}: {status}: {d.get('FailureReason') or 'no reason given'}"
                )
            attempt += 1
        return [self._trial(context, lake, plan, n, j) for n, j in enumerate(jobs)]

    def _describe_tuning(self, name: str) -> dict | None:
        return self._found(
            lambda sm: sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name),
            ("ResourceNotFound", "ValidationException"),
        )

    def _tuning_jobs_of(self, name: str) -> list[dict]:
        """The training jobs of tuning job ``name``, in the order it started them."""
        sm, out, token = self.client, [], None
        while True:
            page = sm.list_training_jobs_for_hyper_parameter_tuning_job(
                HyperParameterTuningJobName=name,
                MaxResults=100,
                **({"NextToken": token} if token else {}),
            )
            out += page["TrainingJobSummaries"]
            if not (token := page.get("NextToken")):
                return sorted(out, key=lambda j: (j["CreationTime"], j["TrainingJobName"]))

    def _wait_tuning(self, context, name: str) -> dict:
        """Poll tuning job ``name`` until it ends, logging its trials as they finish; stop it if
        the run is cancelled meanwhile."""
        sm = self.client
        seen: dict[str, str] = {}

        def log_change(d: dict) -> None:
            if d["HyperParameterTuningJobStatus"] != seen.get(""):
                seen[""] = d["HyperParameterTuningJobStatus"]
                context.log.info(f"tuning job {name}: {seen['']}")
            for j in self._tuning_jobs_of(name):
                if seen.get(j["TrainingJobName"]) != j["TrainingJobStatus"]:
                    seen[j["TrainingJobName"]] = j["TrainingJobStatus"]
                    final = j.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
                    context.log.info(
                        f"tuning job {name}: {j['TrainingJobName']} {j['TrainingJobStatus']} "
                        f"{j['TunedHyperParameters']}"
                        + (f" → {final['MetricName']} {final['Value']:.4f}" if final else "")
                    )

        def stop() -> None:
            sm.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
            context.log.warning(f"stopped tuning job {name}")

        with stopped_on_interrupt(stop):
            return poll(
                lambda: sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name),
                lambda d: d["HyperParameterTuningJobStatus"] in ("Completed", "Failed", "Stopped"),
                self.config.poll_seconds,
                log_change,
            )

    def _trial(self, context, lake, plan: SweepPlan, number: int, job: dict) -> Trial:
        """Trial ``number``, the tuning job's training ``job``: its weights and metrics brought
        into the lake (once) under its trial key."""
        params = tuned_params(job["TunedHyperParameters"], plan.space)
        spec = check_spec({**plan.base, **params})
        tkey = trial_model_key(plan.model, plan.name, number)
        keys = model_keys(tkey)
        trial = Trial(number=number, params=params, spec=spec, training_job=job["TrainingJobName"])
        if lake.exists(keys["metrics"]) and lake.exists(keys["model"]):
            metrics = json.loads(lake.get(keys["metrics"]))
        else:
            d = self.client.describe_training_job(TrainingJobName=job["TrainingJobName"])
            try:
                if d["TrainingJobStatus"] != "Completed":  # failed, or stopped early: not kept
                    raise TrainingFailed(d.get("FailureReason") or "stopped early")
                metrics = bring_back(lake, d, tkey, None)
            except TrainingFailed as e:
                context.log.warning(
                    f"sweep {plan.name}: trial {number} ({job['TrainingJobName']}, "
                    f"{job['TrainingJobStatus']}): {e}"
                )
                return trial
        return replace(
            trial,
            objective=objective(metrics, spec),
            model_sha256=sha256_hex(lake.get(keys["model"])),
        )

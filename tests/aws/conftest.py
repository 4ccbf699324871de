"""AWS paths against a moto server on 127.0.0.1, with test-side executors.

moto accepts Batch, SageMaker and Athena requests but runs nothing. The
executors below replace that part of the emulator *inside the test harness* (they patch
moto internals, never project code): a Batch job runs its submitted command locally (array
index in AWS_BATCH_JOB_ARRAY_INDEX, N_TO_N honoured, terminate kills it); a SageMaker job
runs the training entry with SageMaker's layout, syncs checkpoints with S3, can be stopped,
and can be made to hit a capacity error or a spot interruption; an Athena query runs in
DuckDB over the Glue tables' Parquet in the moto S3.
"""

import copy
import hashlib
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import boto3
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
BUCKET = "cvgraph-lake"
LAKE_URL = f"s3://{BUCKET}/lake"
ROLE = "arn:aws:iam::123456789012:role/cvgraph-sagemaker"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


class Harness:
    """What the executors did, for assertions, and knobs for failure injection."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint  # moto itself: what the executors below call
        self.client_endpoint = endpoint  # what the workload processes they start call
        self.batch_runs: list[dict] = []  # one per child/job actually executed
        self.training_runs: list[dict] = []  # one per training attempt actually executed
        self.tuning_jobs: list[dict] = []  # one per tuning job created: its request, its trials
        self.no_capacity: set[str] = set()  # instance types that fail with a CapacityError
        self.interrupt_after_epochs: int | None = None  # spot reclaim once, after this many epochs
        self.athena_queries: list[str] = []
        # Batch jobs stay RUNNABLE with this status reason (no capacity, a misconfigured compute
        # environment) until terminated; SageMaker jobs stay Starting while hold_training is set.
        self.runnable_reason: str | None = None
        self.hold_training = False
        self.oom_prefixes: set[str] = (
            set()
        )  # Batch children for these prefixes die as if out of memory

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": self.client_endpoint,
            "PYTHONPATH": str(REPO),
        }


HARNESS = Harness("")  # the session's moto endpoint once the server is up
CONCURRENCY = threading.Semaphore(
    3
)  # "instances": children queue for one of these, as on a real CE


# -- Batch ---------------------------------------------------------------------------
def _batch_status(job) -> str:
    if job._child_jobs:
        statuses = [c.status for c in job._child_jobs]
        if all(s in ("SUCCEEDED", "FAILED") for s in statuses):
            return "FAILED" if "FAILED" in statuses else "SUCCEEDED"
        return "RUNNING"
    return job.status


def _batch_run(self) -> None:
    """Replaces moto.batch.models.Job.run: run the submitted command on this machine."""
    try:
        self.status = "RUNNABLE"
        while HARNESS.runnable_reason is not None:  # Batch never places it
            if self.stop:
                self._mark_stopped(success=False)
                return
            self.job_stopped_reason = HARNESS.runnable_reason  # describe's statusReason
            time.sleep(0.05)
        index = self.array_properties.get("index")
        for dep in self.depends_on or []:
            target = dep["jobId"] + (
                f":{index}" if dep.get("type") == "N_TO_N" and index is not None else ""
            )
            while (st := _batch_status(self.all_jobs[target])) not in ("SUCCEEDED", "FAILED"):
                if self.stop:
                    self._mark_stopped(success=False)
                    return
                time.sleep(0.05)
            if st == "FAILED":
                self.job_stopped_reason = f"Dependent Job failed: {target}"
                self._mark_stopped(success=False)
                return
        self.job_started_at = datetime.now()
        self.status = "RUNNING"
        self.log_stream_name = self._stream_name
        self._start_attempt()
        CONCURRENCY.acquire()
        try:
            self._run_command(index)
        finally:
            CONCURRENCY.release()
    except Exception as e:  # surface harness bugs as job failures
        self.job_stopped_reason = f"harness error: {e!r}"
        self._mark_stopped(success=False)


def _batch_run_command(self, index) -> None:
    if self.stop:
        self._mark_stopped(success=False)
        return
    command = list(self._get_container_property("command", []))
    command = [
        sys.executable if command[0] == "python" else command[0],
        *command[1:],
    ]  # the image's python
    env = HARNESS.env()
    env.update({e["name"]: e["value"] for e in self._get_container_property("environment", [])})
    if index is not None:
        env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
    record = {"job_id": self.job_id, "index": index, "command": command, "killed": False}
    HARNESS.batch_runs.append(record)
    prefixes = (
        command[command.index("--prefixes") + 1].split(",") if "--prefixes" in command else []
    )
    if index is not None and "--group-sizes" in command:  # the child's group of the tasks
        sizes = [int(n) for n in command[command.index("--group-sizes") + 1].split(",")]
        prefixes = prefixes[sum(sizes[:index]) : sum(sizes[: index + 1])]
    elif index is not None:
        prefixes = [prefixes[index]]
    record["prefixes"] = prefixes
    if HARNESS.oom_prefixes & set(prefixes):
        self.exit_code, self.job_stopped_reason = (
            137,
            "OutOfMemoryError: Container killed due to memory usage",
        )
        self._mark_stopped(success=False)
        return
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if self.stop:
                proc.kill()
                record["killed"] = True
            time.sleep(0.05)
        log.seek(0)
        record["output"] = log.read().decode(errors="replace")
    self.exit_code = proc.returncode
    if proc.returncode != 0 and not self.job_stopped_reason:
        self.job_stopped_reason = "Essential container in task exited"
    self._mark_stopped(success=proc.returncode == 0)


def _batch_describe(original):
    def describe(self):
        out = original(self)
        if self._child_jobs:
            out["status"] = _batch_status(self)
        elif "index" in self.array_properties:
            out["arrayProperties"] = {"index": self.array_properties["index"]}
        if self.job_stopped and "container" in out:  # moto drops these from the full description
            out["container"]["exitCode"] = self.exit_code
            out["container"]["reason"] = self.job_stopped_reason
        return out

    return describe


def _batch_terminate(original):
    def terminate_job(
        self, job_id, reason
    ):  # as AWS does: terminating an array parent stops its children
        original(self, job_id, reason)
        job = self.get_job_by_id(job_id)
        for child in (job._child_jobs or []) if job else []:
            child.terminate(reason)
        # A job no thread has picked up yet (SUBMITTED) ends FAILED at once, as on AWS.
        for j in [job, *((job._child_jobs or []) if job else [])]:
            if j is not None and not j._child_jobs and j.status in ("SUBMITTED", "PENDING"):
                j._mark_stopped(success=False)

    return terminate_job


# -- SageMaker ----------------------------------------------------------------------
def _s3():
    return boto3.client(
        "s3",
        endpoint_url=HARNESS.endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _sync_down(s3, uri: str, dest: Path) -> list[str]:
    bucket, prefix = _split(uri)
    got = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            p = dest / o["Key"][len(prefix) :].lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, o["Key"], str(p))
            got.append(o["Key"])
    return got


def _sync_up(s3, src: Path, uri: str) -> None:
    bucket, prefix = _split(uri)
    for p in src.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), bucket, prefix.rstrip("/") + "/" + p.relative_to(src).as_posix())


def _channel(s3, spec: dict, dest: Path) -> list[str]:
    """Lay channel ``spec`` out at ``dest``; the keys it read. A FastFile channel's files are
    read as the job opens them on SageMaker; here they are fetched first, the same keys (what
    the tests count is which objects a job reads, not when)."""
    src = spec["DataSource"]["S3DataSource"]
    if src["S3DataType"] == "ManifestFile":
        bucket, key = _split(src["S3Uri"])
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        base_bucket, base = _split(manifest[0]["prefix"])
        for rel in manifest[1:]:
            p = dest / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(base_bucket, base + rel, str(p))
        return [base + rel for rel in manifest[1:]]
    bucket, key = _split(src["S3Uri"])
    if key.endswith("/"):
        return _sync_down(s3, src["S3Uri"], dest)
    dest.mkdir(parents=True, exist_ok=True)
    s3.download_file(bucket, key, str(dest / key.rsplit("/", 1)[1]))
    return [key]


def _train(job) -> None:
    s3 = _s3()
    itype = job.resource_config["InstanceType"]
    record = {
        "name": job.training_job_name,
        "instance_type": itype,
        "attempts": 0,
        "output": "",
        "spot": job.enable_managed_spot_training,
        "channels": {},  # name: {"mode", "read": the keys the job read}
    }
    HARNESS.training_runs.append(record)
    while HARNESS.hold_training and not job._stop:  # SageMaker never provisions the instance
        time.sleep(0.05)
    if job._stop:
        job.training_job_status, job.secondary_status = "Stopped", "Stopped"
        return
    try:
        if itype in HARNESS.no_capacity:
            job.failure_reason = "CapacityError: Unable to provision requested ML compute capacity. Please retry using a different ML instance type."
            job.training_job_status, job.secondary_status = "Failed", "Failed"
            return
        with tempfile.TemporaryDirectory(prefix="sm-") as tmp:
            ml = Path(tmp)
            (ml / "input/config").mkdir(parents=True)
            (ml / "input/config/hyperparameters.json").write_text(
                json.dumps({**job.hyper_parameters, "checkpoint_dir": str(ml / "checkpoints")})
            )
            env = HARNESS.env()
            for ch in job.input_data_config:
                record["channels"][ch["ChannelName"]] = {
                    "mode": ch.get("InputMode", "File"),
                    "read": _channel(s3, ch, ml / "input/data" / ch["ChannelName"]),
                }
                env[f"SM_CHANNEL_{ch['ChannelName'].upper()}"] = str(
                    ml / "input/data" / ch["ChannelName"]
                )
            env.update(
                SM_INPUT_CONFIG_DIR=str(ml / "input/config"),
                SM_MODEL_DIR=str(ml / "model"),
                SM_OUTPUT_DATA_DIR=str(ml / "output/data"),
                TRAINING_JOB_NAME=job.training_job_name,
            )
            interrupt = HARNESS.interrupt_after_epochs
            while True:
                record["attempts"] += 1
                shutil_rm(ml / "checkpoints")
                if job.checkpoint_config:
                    _sync_down(s3, job.checkpoint_config["S3Uri"], ml / "checkpoints")
                job.secondary_status = "Training"
                command = [sys.executable, "-m", "workloads.training.train"]
                program = job.hyper_parameters.get("sagemaker_program")
                if program:  # script mode: the toolkit fetches the sources and runs the program
                    code = ml / "code"
                    shutil_rm(code)
                    code.mkdir(parents=True)
                    bucket, key = _split(job.hyper_parameters["sagemaker_submit_directory"])
                    blob = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
                        tar.extractall(code, filter="data")
                    command = [sys.executable, str(code / program)]
                    record["image"] = job.algorithm_specification["TrainingImage"]
                proc = subprocess.Popen(
                    command,
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                job._proc = proc
                epochs = 0
                for line in proc.stdout:
                    record["output"] += line
                    if line.startswith("epoch="):
                        epochs += 1
                        if interrupt and epochs >= interrupt and job.enable_managed_spot_training:
                            proc.kill()  # the reclaim: the last synced checkpoint survives
                            break
                proc.wait()
                if job.checkpoint_config and (ml / "checkpoints").exists():
                    _sync_up(s3, ml / "checkpoints", job.checkpoint_config["S3Uri"])
                if getattr(job, "_stop", False):
                    job.training_job_status, job.secondary_status = "Stopped", "Stopped"
                    return
                if interrupt and epochs >= interrupt and record["attempts"] == 1:
                    job.secondary_status = "Interrupted"
                    interrupt = None
                    continue  # managed spot restarts the job on new capacity
                break
            if proc.returncode != 0:
                job.failure_reason = (
                    f"AlgorithmError: training exited {proc.returncode}: {record['output'][-500:]}"
                )
                job.training_job_status, job.secondary_status = "Failed", "Failed"
                return
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                for p in sorted((ml / "model").iterdir()):
                    tar.add(p, arcname=p.name)
            bucket, key = _split(job.model_artifacts["S3ModelArtifacts"])
            s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
            job.training_job_status, job.secondary_status = "Completed", "Completed"
    except Exception as e:
        job.failure_reason = f"harness error: {e!r}"
        job.training_job_status, job.secondary_status = "Failed", "Failed"


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _create_training_job(original):
    def create(self, *args, **kwargs):
        job = original(self, *args, **kwargs)
        job.training_job_status, job.secondary_status = "InProgress", "Starting"
        job._stop = False
        threading.Thread(target=_train, args=(job,), daemon=True).start()
        return job

    return create


def _stop_training_job(self):
    name = self._get_param("TrainingJobName")
    job = self.sagemaker_backend.training_jobs[name]
    job._stop = True
    job.training_job_status, job.secondary_status = "Stopping", "Stopping"
    if getattr(job, "_proc", None) is not None:
        job._proc.kill()
    from moto.core.responses import EmptyResult

    return EmptyResult()


# -- SageMaker tuning jobs -------------------------------------------------------------
# moto stores a tuning job as Completed at once with a made-up best job. Here it runs: its
# trials are training jobs (run as above), MaxParallelTrainingJobs at once, each drawing the
# ranges at random (seeded by the job's RandomSeed, name and trial number: SageMaker's Bayesian
# search is its own); the objective is the metric definition's last match in a trial's output.
# The first instance type with capacity is used (AllocationStrategy Prioritized). Early
# stopping is SageMaker's: here every trial runs to its end.
def _draw(ranges: dict, rng: random.Random) -> dict[str, str]:
    out = {}
    for r in ranges.get("ContinuousParameterRanges", []):
        lo, hi = float(r["MinValue"]), float(r["MaxValue"])
        if r.get("ScalingType") == "Logarithmic":
            out[r["Name"]] = str(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        else:
            out[r["Name"]] = str(rng.uniform(lo, hi))
    for r in ranges.get("IntegerParameterRanges", []):
        out[r["Name"]] = str(rng.randint(int(r["MinValue"]), int(r["MaxValue"])))
    for r in ranges.get("CategoricalParameterRanges", []):
        out[r["Name"]] = rng.choice(r["Values"])
    return out


def _final_objective(tuning, job, metric: str) -> float | None:
    # the definition's metrics (moto's training job keeps a made-up list of its own)
    spec = tuning.training_job_definition["AlgorithmSpecification"]
    regex = next(m["Regex"] for m in spec["MetricDefinitions"] if m["Name"] == metric)
    output = "".join(
        r["output"] for r in HARNESS.training_runs if r["name"] == job.training_job_name
    )
    found = re.findall(regex, output)
    return float(found[-1]) if found else None


def _trial_summary(tuning, job) -> dict:
    metric = tuning.hyper_parameter_tuning_job_config["HyperParameterTuningJobObjective"]
    value = _final_objective(tuning, job, metric["MetricName"])
    out = {
        "TrainingJobName": job.training_job_name,
        "TrainingJobArn": job.arn,
        "TuningJobName": tuning.hyper_parameter_tuning_job_name,
        "CreationTime": job.creation_time,
        "TrainingJobStatus": job.training_job_status,
        "TunedHyperParameters": job._tuned,
        "ObjectiveStatus": "Succeeded" if value is not None else "Pending",
    }
    if value is not None:
        out["FinalHyperParameterTuningJobObjectiveMetric"] = {**metric, "Value": value}
    if getattr(job, "failure_reason", None):
        out["FailureReason"] = job.failure_reason
    return out


def _tune(tuning, backend) -> None:
    config = tuning.hyper_parameter_tuning_job_config
    d = tuning.training_job_definition
    limits = config["ResourceLimits"]
    types = [c["InstanceType"] for c in d["HyperParameterTuningResourceConfig"]["InstanceConfigs"]]
    itype = next((t for t in types if t not in HARNESS.no_capacity), types[0])
    name = tuning.hyper_parameter_tuning_job_name
    pending = list(range(limits["MaxNumberOfTrainingJobs"]))
    running: list = []
    while (pending or running) and not tuning._stop:
        running = [
            j for j in running if j.training_job_status not in ("Completed", "Failed", "Stopped")
        ]
        while pending and len(running) < limits["MaxParallelTrainingJobs"] and not tuning._stop:
            i = pending.pop(0)
            tuned = _draw(
                config.get("ParameterRanges", {}),
                random.Random(f"{config.get('RandomSeed', 0)}-{name}-{i}"),
            )
            digest = hashlib.sha256(json.dumps(tuned, sort_keys=True).encode()).hexdigest()[:8]
            job = backend.create_training_job(
                training_job_name=f"{name}-{i + 1:03d}-{digest}",
                hyper_parameters={**d.get("StaticHyperParameters", {}), **tuned},
                algorithm_specification=copy.deepcopy(d["AlgorithmSpecification"]),
                role_arn=d["RoleArn"],
                input_data_config=d.get("InputDataConfig", []),
                output_data_config=d["OutputDataConfig"],
                resource_config={"InstanceType": itype, "InstanceCount": 1, "VolumeSizeInGB": 10},
                vpc_config=d.get("VpcConfig"),
                stopping_condition=d["StoppingCondition"],
                tags=[],
                enable_network_isolation=False,
                enable_inter_container_traffic_encryption=False,
                enable_managed_spot_training=d.get("EnableManagedSpotTraining", False),
                checkpoint_config=d.get("CheckpointConfig"),
                debug_hook_config=None,
                debug_rule_configurations=None,
                tensor_board_output_config=None,
                experiment_config=None,
            )
            job._tuned = tuned
            tuning._jobs.append(job)
            running.append(job)
        time.sleep(0.05)
    if tuning._stop:  # stop what runs, then the tuning job is Stopped
        for job in tuning._jobs:
            if job.training_job_status == "InProgress":
                job._stop = True
                if getattr(job, "_proc", None) is not None:
                    job._proc.kill()
        while any(j.training_job_status == "InProgress" for j in tuning._jobs):
            time.sleep(0.05)
    counters = {
        "Completed": 0,
        "InProgress": 0,
        "RetryableError": 0,
        "NonRetryableError": 0,
        "Stopped": 0,
    }
    for job in tuning._jobs:
        status = job.training_job_status
        counters["NonRetryableError" if status == "Failed" else status] += 1
    summaries = [_trial_summary(tuning, j) for j in tuning._jobs]
    scored = [
        s
        for s in summaries
        if "FinalHyperParameterTuningJobObjectiveMetric" in s
        and s["TrainingJobStatus"] == "Completed"
    ]
    best = max(
        scored,
        key=lambda s: s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"],
        default=None,
    )
    tuning.best_training_job = tuning.OverallBestTrainingJob = best
    tuning.training_job_status_counters = counters
    tuning.objective_status_counters = {
        "Succeeded": len(scored),
        "Pending": 0,
        "Failed": len(summaries) - len(scored),
    }
    tuning.hyper_parameter_tuning_end_time = datetime.now()
    tuning.hyper_parameter_tuning_job_status = "Stopped" if tuning._stop else "Completed"


def _create_tuning_job(original):
    def create(self, *args, **kwargs):
        arn = original(self, *args, **kwargs)
        tuning = self.hyper_parameter_tuning_jobs[kwargs["hyper_parameter_tuning_job_name"]]
        tuning.hyper_parameter_tuning_job_status = "InProgress"
        tuning.best_training_job = tuning.OverallBestTrainingJob = None
        tuning.tuning_job_completion_details = {}
        tuning._stop, tuning._jobs = False, []
        HARNESS.tuning_jobs.append(
            {
                "name": tuning.hyper_parameter_tuning_job_name,
                "config": tuning.hyper_parameter_tuning_job_config,
                "definition": tuning.training_job_definition,
                "warm_start": tuning.warm_start_config,
                "trials": tuning._jobs,
            }
        )
        threading.Thread(target=_tune, args=(tuning, self), daemon=True).start()
        return arn

    return create


def _stop_tuning_job(self):
    tuning = self.sagemaker_backend.hyper_parameter_tuning_jobs[
        self._get_param("HyperParameterTuningJobName")
    ]
    if tuning.hyper_parameter_tuning_job_status == "InProgress":
        tuning._stop = True
        tuning.hyper_parameter_tuning_job_status = "Stopping"
    from moto.core.responses import EmptyResult

    return EmptyResult()


def _list_tuning_trials(self):
    from moto.core.responses import ActionResult

    tuning = self.sagemaker_backend.hyper_parameter_tuning_jobs[
        self._get_param("HyperParameterTuningJobName")
    ]
    return ActionResult(
        {"TrainingJobSummaries": [_trial_summary(tuning, j) for j in list(tuning._jobs)]}
    )


# -- Athena -------------------------------------------------------------------------
def _athena_run(backend, execution):
    """Run an execution's query as Athena would, over the Glue tables' files: its
    ``QueryResults``; DuckDB's errors propagate (the caller marks the query FAILED)."""
    import duckdb
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    from moto.athena.models import QueryResults
    from moto.glue.models import glue_backends

    HARNESS.athena_queries.append(execution.query)
    glue = glue_backends[backend.account_id][backend.region_name]
    host = HARNESS.endpoint.split("://", 1)[1]
    fs = pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region=REGION,
    )
    from workloads.predictions import PREDICTIONS_SCHEMA
    from workloads.table_rows import TABLES

    con = duckdb.connect()
    database = (
        execution.context["Database"] if isinstance(execution.context, dict) else execution.context
    )
    # images and objects always (a missing one fails the query, as Athena's would); predictions
    # once registered (an unpartitioned table: every Parquet object under its location)
    tables = {"images": True, "objects": True, "predictions": False}
    for name, required in tables.items():
        if not required and name not in {t.name for t in glue.get_tables(database, None)}:
            continue
        table = glue.get_table(database, name)
        version = table.get_version(str(table._current_version))
        location = version["StorageDescriptor"]["Location"].replace("s3://", "")
        part = (
            pads.partitioning(pa.schema([("prefix", pa.string())]), flavor="hive")
            if version.get("PartitionKeys")
            else None
        )
        try:
            files = [
                f.path
                for f in fs.get_file_info(pafs.FileSelector(location, recursive=True))
                if f.path.endswith(".parquet")
            ]
        except FileNotFoundError:
            files = []
        if files:
            con.register(
                name,
                pads.dataset(
                    files,
                    filesystem=fs,
                    format="parquet",
                    partitioning=part,
                    partition_base_dir=location.rstrip("/"),
                ),
            )
        else:  # as Athena reads a Glue table with no files yet: no rows
            schema = TABLES[name] if name in TABLES else PREDICTIONS_SCHEMA
            con.register(name, schema.empty_table())
    result = con.sql(execution.query).to_arrow_table()
    types = {
        pa.int32(): "integer",
        pa.int64(): "bigint",
        pa.float64(): "double",
        pa.bool_(): "boolean",
    }

    def athena_type(t):
        return "array" if pa.types.is_list(t) else types.get(t, "varchar")

    def render(v):
        if v is None:
            return {}
        if isinstance(v, list):
            return {"VarCharValue": "[" + ", ".join(map(str, v)) + "]"}
        if isinstance(v, bool):
            return {"VarCharValue": "true" if v else "false"}
        return {"VarCharValue": str(v)}

    info = [{"Name": f.name, "Label": f.name, "Type": athena_type(f.type)} for f in result.schema]
    rows = [{"Data": [{"VarCharValue": f.name} for f in result.schema]}]
    rows += [{"Data": [render(r[f.name]) for f in result.schema]} for r in result.to_pylist()]
    return QueryResults(rows=rows, column_info=info)


def _athena_get_query_execution(original):
    """The query runs when it reaches SUCCEEDED (moto's state manager can hold it in QUEUED or
    RUNNING first); an error the engine raises makes it FAILED, with the engine's message as
    ``StateChangeReason``."""

    def get_query_execution(self, exec_id):
        import duckdb
        from moto.glue.exceptions import EntityNotFoundException

        execution = original(self, exec_id)
        if execution.status == "SUCCEEDED" and exec_id not in self.query_results:
            try:
                self.query_results[exec_id] = _athena_run(self, execution)
            except (duckdb.Error, EntityNotFoundException) as e:  # a missing database fails too
                execution.status, execution.reason = "FAILED", str(e)
        return execution

    return get_query_execution


def _athena_reason(original):
    def get_query_execution(self):
        out = json.loads(original(self))
        execution = self.athena_backend.executions[self._get_param("QueryExecutionId")]
        if getattr(execution, "reason", None):
            out["QueryExecution"]["Status"]["StateChangeReason"] = execution.reason
        return json.dumps(out)

    return get_query_execution


def _install_executors() -> None:
    from moto.athena.models import AthenaBackend
    from moto.athena.responses import AthenaResponse
    from moto.batch.models import BatchBackend, Job
    from moto.sagemaker.models import SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse

    Job.run = _batch_run
    Job._run_command = _batch_run_command
    Job.describe = _batch_describe(Job.describe)
    BatchBackend.terminate_job = _batch_terminate(BatchBackend.terminate_job)
    SageMakerModelBackend.create_training_job = _create_training_job(
        SageMakerModelBackend.create_training_job
    )
    SageMakerResponse.stop_training_job = _stop_training_job
    SageMakerModelBackend.create_hyper_parameter_tuning_job = _create_tuning_job(
        SageMakerModelBackend.create_hyper_parameter_tuning_job
    )
    SageMakerResponse.stop_hyper_parameter_tuning_job = _stop_tuning_job
    SageMakerResponse.list_training_jobs_for_hyper_parameter_tuning_job = _list_tuning_trials
    AthenaBackend.get_query_execution = _athena_get_query_execution(
        AthenaBackend.get_query_execution
    )
    AthenaResponse.get_query_execution = _athena_reason(AthenaResponse.get_query_execution)


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.moto_api import state_manager
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    assert host == "127.0.0.1"
    HARNESS.__init__(endpoint)
    _install_executors()
    # Job status is whatever the executor sets, not moto's immediate SUCCEEDED.
    state_manager.set_transition("batch::job", {"progression": "manual", "times": 10**9})
    yield endpoint
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch, tmp_path):
    """A fresh moto account: the lake bucket with S3→SQS notifications, a Batch queue and
    job definition, and the aws profile's environment."""
    return fresh_account(moto_endpoint, monkeypatch, tmp_path)


@pytest.fixture
def fresh_aws(moto_endpoint, monkeypatch):
    """``fresh_aws(home)``: the ``aws`` fixture's account again, for a test that needs two."""
    return lambda home: fresh_account(moto_endpoint, monkeypatch, home)


def fresh_account(moto_endpoint, monkeypatch, tmp_path) -> Harness:
    """What the ``aws`` fixture gives, again: moto reset, the resources made anew, a new home."""
    from moto.moto_api import state_manager

    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)
    state_manager.set_transition("batch::job", {"progression": "manual", "times": 10**9})
    HARNESS.__init__(moto_endpoint)
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    sqs = boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName="cvgraph-incoming")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=BUCKET,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {
                        "Key": {
                            "FilterRules": [
                                {"Name": "prefix", "Value": "lake/incoming/"},
                                {"Name": "suffix", "Value": ".zip"},
                            ]
                        }
                    },
                }
            ]
        },
    )
    batch = boto3.client("batch")
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="cvgraph", Description="batch", VpcId=vpc)["GroupId"]
    iam = boto3.client("iam")
    service_role = iam.create_role(RoleName="batch-service", AssumeRolePolicyDocument="{}")["Role"][
        "Arn"
    ]
    ce = batch.create_compute_environment(
        computeEnvironmentName="cvgraph-spot",
        type="MANAGED",
        state="ENABLED",
        serviceRole=service_role,
        computeResources={
            "type": "FARGATE_SPOT",
            "maxvCpus": 256,
            "subnets": [subnet],
            "securityGroupIds": [sg],
        },
    )
    jq = batch.create_job_queue(
        jobQueueName="cvgraph",
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce["computeEnvironmentArn"]}],
    )
    jd = batch.register_job_definition(
        jobDefinitionName="cvgraph-worker",
        type="container",
        platformCapabilities=["FARGATE"],
        containerProperties={
            "image": "cvgraph-worker:latest",
            "command": ["python", "-m", "workloads.images", "--help"],
            "resourceRequirements": [
                {"type": "VCPU", "value": "1"},
                {"type": "MEMORY", "value": "2048"},
            ],
            "executionRoleArn": "arn:aws:iam::123456789012:role/exec",
        },
    )
    env = {
        "CVGRAPH_PROFILE": "aws",
        "CVGRAPH_LAKE_URL": LAKE_URL,
        "CVGRAPH_BATCH_JOB_QUEUE": jq["jobQueueArn"],
        "CVGRAPH_BATCH_JOB_DEFINITION": jd["jobDefinitionArn"],
        "CVGRAPH_BATCH_POLL_SECONDS": "0.2",
        "CVGRAPH_SAGEMAKER_ROLE_ARN": ROLE,
        "CVGRAPH_TRAINING_IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/cvgraph-training:latest",
        "CVGRAPH_TRAINING_INSTANCE_TYPES": "ml.m5.large,ml.c5.xlarge",
        "CVGRAPH_SAGEMAKER_POLL_SECONDS": "0.2",
        "CVGRAPH_PIPES_INTERVAL": "1",
        "CVGRAPH_GLUE_DATABASE": "cvgraph",
        "CVGRAPH_ATHENA_WORKGROUP": "primary",
        "CVGRAPH_ATHENA_OUTPUT": f"s3://{BUCKET}/athena-results/",
        "CVGRAPH_ATHENA_POLL_SECONDS": "0.05",
        "CVGRAPH_SQS_QUEUE_URL": queue_url,
        "CVGRAPH_HOME": str(tmp_path / "home"),
        # a file store beside the home: the account's tests but the tracking server's
        # (tests/aws/test_mlflow_server.py) run as a laptop try would
        "CVGRAPH_ALLOW_LOCAL_TRACKING": "true",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    HARNESS.queue_url = queue_url
    return HARNESS


def digits_zip(n: int, classes=(0, 1)) -> bytes:
    """A small labelled pack of real digits (scikit-learn's), one folder per class."""
    from cvgraph.demo_packs import digit_members, zip_bytes

    return zip_bytes(digit_members(size=32, limit=n, classes=classes))


@pytest.fixture
def small_digits_pack():
    return digits_zip


@pytest.fixture
def indexed_lake(aws):
    """The S3 lake with one ingested, indexed pack of 40 digits; returns (lake, prefixes with images)."""
    from workloads.index import build_raw_index
    from workloads.ingest import ingest_pack
    from workloads.lake import open_lake
    from workloads.versions import HASH_PREFIXES

    lake = open_lake(LAKE_URL)
    lake.put("incoming/digits.zip", digits_zip(40))  # 40 images over ~37 prefixes
    ingest_pack(lake, "digits", "incoming/digits.zip")
    stats = build_raw_index(lake, list(HASH_PREFIXES))
    return lake, sorted(p for p, s in stats.items() if s["images"])


@pytest.fixture
def subset_on_s3(indexed_lake):
    """Resized images, tables and a subset manifest of every image, all in the S3 lake."""
    from resources.catalog import DuckDBCatalog
    from resources.storage import LakeResource
    from workloads.image_params import ImageParams
    from workloads.images import process_prefix
    from workloads.lake import write_parquet
    from workloads.tables import write_prefix_tables

    lake, busy = indexed_lake
    for p in busy:
        process_prefix(lake, p, ["resize", "edges"], ImageParams(), "prep")
        write_prefix_tables(lake, p, ImageParams())
    manifest = DuckDBCatalog(lake=LakeResource(url=LAKE_URL)).query(
        "SELECT * FROM images ORDER BY sha256"
    )
    write_parquet(lake, "subsets/all/manifest.parquet", manifest)
    return lake, manifest


@pytest.fixture
def shards_on_s3(subset_on_s3):
    """subset_on_s3's subset frozen (its record) and its resized training shards written, as
    the training_shards asset's job writes them; (lake, manifest, shards index)."""
    from workloads.layout import record_key
    from workloads.training.shards import build_subset_shards
    from workloads.versions import sha256_hex

    lake, manifest = subset_on_s3
    sha = sha256_hex(lake.get("subsets/all/manifest.parquet"))
    lake.put(record_key("subset", "all"), json.dumps({"manifest_sha256": sha}).encode())
    return lake, manifest, build_subset_shards(lake, "all", "resized", say=lambda line: None)

"""A sweep on the aws profile is a SageMaker hyperparameter tuning job: its request, its trials
brought back, an orchestrator killed meanwhile, a run cancelled meanwhile."""

import _thread
import hashlib
import json
import re
import threading
import time

import boto3
import pytest
from botocore.stub import Stubber
from test_sagemaker import in_asset, trainer

from resources.training import SageMakerTrainer, job_channels, tuning_request
from workloads.s3lake import S3Lake
from workloads.training.spec import check_spec, task_defaults
from workloads.training.sweep import (
    SweepPlan,
    objective,
    parse_space,
    trial_model_key,
    tuning_job_name,
)

SHARDS = "subsets/all/shards/resized"


def plan(trials: int, parallel: int, epochs: int = 2) -> SweepPlan:
    return SweepPlan(
        model="digits_cnn",
        subset_manifest_sha256="ab" * 32,
        base=check_spec(
            {
                **task_defaults("classification"),
                "epochs": epochs,
                "batch_size": 16,
                "input_size": 32,
                "variant": "resized",
            }
        ),
        space=parse_space({"lr": {"low": 0.001, "high": 0.02, "log": True}}, "classification"),
        trials=trials,
        parallel=parallel,
    )


def tune(lake, p: SweepPlan):
    """``trainer().tune`` of ``p`` in an asset step: (the step's result, {"value": trials, ...})."""
    return in_asset(
        lambda ctx: trainer().tune(
            ctx, lake, plan=p, shards_key=SHARDS, hyperparameters=dict(p.base)
        )
    )


def test_tuning_job_request_shape_pinned_with_stubber(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    lake = S3Lake("s3://bucket/lake", endpoint_url="http://127.0.0.1:1")
    p = SweepPlan(
        model="m",
        subset_manifest_sha256="ab" * 32,
        base=task_defaults("classification"),
        space=parse_space(None, "classification"),
        trials=8,
        parallel=2,
        seed=3,
    )
    t = SageMakerTrainer(
        role_arn="arn:aws:iam::1:role/r",
        training_image="img:1",
        instance_types=["ml.m5.large", "ml.c5.xlarge"],
        subnets=["subnet-1"],
        security_group_ids=["sg-1"],
    )
    channels, static = job_channels(lake, SHARDS, dict(p.base))
    static = {k: v for k, v in static.items() if k not in p.space}
    name = tuning_job_name(p, 1)
    assert len(name) <= 32 and name.endswith("-1") and name.startswith("cvg-m-")
    req = tuning_request(t, lake, plan=p, attempt=1, channels=channels, static=static, trials=5)
    config = req["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {
        "Type": "Maximize",
        "MetricName": "val_accuracy",
    }
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 5, "MaxParallelTrainingJobs": 2}
    assert config["TrainingJobEarlyStoppingType"] == "Auto" and config["RandomSeed"] == 3
    assert config["ParameterRanges"] == {
        "ContinuousParameterRanges": [
            {
                "Name": "label_smoothing",
                "MinValue": "0.0",
                "MaxValue": "0.2",
                "ScalingType": "Linear",
            },
            {"Name": "lr", "MinValue": "0.0005", "MaxValue": "0.01", "ScalingType": "Logarithmic"},
            {
                "Name": "weight_decay",
                "MinValue": "1e-05",
                "MaxValue": "0.01",
                "ScalingType": "Logarithmic",
            },
        ],
        "CategoricalParameterRanges": [{"Name": "batch_size", "Values": ["32", "64", "128"]}],
    }
    d = req["TrainingJobDefinition"]
    # what is tuned is not static; each trial keeps its checkpoints in a folder of its own
    assert not set(p.space) & set(d["StaticHyperParameters"])
    assert d["StaticHyperParameters"]["tuning_job"] == name[:-2]
    assert d["StaticHyperParameters"]["epochs"] == str(p.base["epochs"])
    assert d["HyperParameterTuningResourceConfig"] == {
        "InstanceConfigs": [
            {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 10},
            {"InstanceType": "ml.c5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
        ],
        "AllocationStrategy": "Prioritized",
    }
    assert "ResourceConfig" not in d and d["EnableManagedSpotTraining"] is True
    assert d["VpcConfig"] == {"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}
    assert d["OutputDataConfig"]["S3OutputPath"].startswith(
        f"s3://bucket/lake/models/m/trials/{p.name}/"
    )
    # the objective's metric is one the trainer's lines define
    assert "val_accuracy" in {m["Name"] for m in d["AlgorithmSpecification"]["MetricDefinitions"]}
    assert (
        req["WarmStartConfig"]
        == {  # attempt 1 goes on from attempt 0
            "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": name[:-1] + "0"}],
            "WarmStartType": "IdenticalDataAndAlgorithm",
        }
    )
    sm = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(sm) as stub:  # botocore validates the whole request against the service model
        stub.add_response(
            "create_hyper_parameter_tuning_job",
            {
                "HyperParameterTuningJobArn": f"arn:aws:sagemaker:us-east-1:1:hyper-parameter-tuning-job/{name}"
            },
            req,
        )
        sm.create_hyper_parameter_tuning_job(**req)
        stub.assert_no_pending_responses()


def harness_objective(run: dict) -> float:
    """A trial's objective as SageMaker reads it: the last ``val_accuracy=`` in its output."""
    return float(re.findall(r"val_accuracy=([0-9.]+)", run["output"])[-1])


def test_a_sweep_is_one_tuning_job_whose_trials_come_back_to_the_lake(shards_on_s3, aws):
    lake, _, _ = shards_on_s3
    p = plan(trials=3, parallel=2)
    result, out = tune(lake, p)
    assert result.success, out["logs"]
    trials = out["value"]
    [job] = aws.tuning_jobs
    assert job["name"] == tuning_job_name(p, 0) and job["warm_start"] is None
    runs = {r["name"]: r for r in aws.training_runs}
    assert len(runs) == 3 and [t.number for t in trials] == [0, 1, 2]
    assert {t.training_job for t in trials} == set(runs)
    for t in trials:
        run = runs[t.training_job]
        assert 0.001 <= t.params["lr"] <= 0.02 and t.spec["lr"] == t.params["lr"]
        keys = {
            n: f"models/{trial_model_key(p.model, p.name, t.number)}/{n}"
            for n in ("model.pt", "metrics.json")
        }
        metrics = json.loads(lake.get(keys["metrics.json"]))
        assert metrics["hyperparameters"]["lr"] == pytest.approx(t.params["lr"])
        # the objective cvgraph keeps is the one SageMaker tuned on: the kept epoch's val score
        assert t.objective == objective(metrics, t.spec)
        assert t.objective == pytest.approx(harness_objective(run), abs=5e-5)
        assert t.model_sha256 == hashlib.sha256(lake.get(keys["model.pt"])).hexdigest()
    # the trials share the definition's checkpoint prefix, each in a folder of its own
    folders = {
        o.key.split("/")[-2] for o in lake.list(f"models/{p.model}/trials/{p.name}/checkpoints/")
    }
    assert folders == set(runs)
    assert any(m.startswith(f"tuning job {job['name']}: Completed") for m in out["logs"])

    # the orchestrator killed after the tuning job finished (or while it ran): run again, it
    # finds the job by its name and brings back the same trials; nothing trains again
    result, again = tune(lake, p)
    assert result.success
    assert [t.to_json() for t in again["value"]] == [t.to_json() for t in trials]
    assert len(aws.tuning_jobs) == 1 and len(aws.training_runs) == 3


def test_a_cancelled_sweep_stops_its_tuning_job_and_a_rerun_warm_starts_the_rest(shards_on_s3, aws):
    lake, _, _ = shards_on_s3
    p = plan(trials=3, parallel=1, epochs=6)

    def interrupt_once_a_trial_finished():
        deadline = time.time() + 180
        while time.time() < deadline and not (
            len(aws.training_runs) >= 2 and "epoch=" in aws.training_runs[1]["output"]
        ):
            time.sleep(0.05)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_a_trial_finished, daemon=True).start()
    result, out = tune(lake, p)
    assert not result.success
    sm = boto3.client("sagemaker")
    first = tuning_job_name(p, 0)
    deadline = time.time() + 60
    while (
        status := sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=first)[
            "HyperParameterTuningJobStatus"
        ]
    ) == "Stopping" and time.time() < deadline:
        time.sleep(0.1)
    assert status == "Stopped"
    ran = {j.training_job_name: j.training_job_status for j in aws.tuning_jobs[0]["trials"]}
    finished = sorted(name for name, status in ran.items() if status == "Completed")
    assert 1 <= len(finished) < 3 and "Stopped" in ran.values()  # the stop cut one short

    result, again = tune(lake, p)
    assert result.success, again["logs"]
    trials = again["value"]
    assert [j["name"] for j in aws.tuning_jobs] == [first, tuning_job_name(p, 1)]
    second = aws.tuning_jobs[1]
    assert second["warm_start"] == {
        "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": first}],
        "WarmStartType": "IdenticalDataAndAlgorithm",
    }
    # the rest of the trials; the stopped job's finished ones are the first trials, the job it
    # cut short is no trial
    assert second["config"]["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 3 - len(finished)
    assert [t.training_job for t in trials] == finished + [
        j.training_job_name for j in second["trials"]
    ]
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.objective is not None for t in trials)

import _thread
import json
import threading
import time

import boto3
import dagster as dg
import pytest
from botocore.exceptions import EndpointConnectionError
from botocore.stub import Stubber

from resources.training import SageMakerTrainer, SageMakerTrainingRunner, training_request
from workloads.s3lake import S3Lake

HP = {"epochs": 4, "lr": 0.003, "batch_size": 16, "input_size": 32, "variant": "resized", "seed": 0}


def trainer(**kw) -> SageMakerTrainer:
    import os

    return SageMakerTrainer(
        role_arn=os.environ["CVGRAPH_SAGEMAKER_ROLE_ARN"],
        training_image=os.environ["CVGRAPH_TRAINING_IMAGE"],
        instance_types=["ml.m5.large", "ml.c5.xlarge"],
        poll_seconds=0.2,
        pipes_interval=1.0,
        **kw,
    )


def status_after_stop(name: str, seconds: float = 30) -> str:
    """The job's status once it has left Stopping (or after ``seconds``)."""
    sm = boto3.client("sagemaker")
    deadline = time.time() + seconds
    while (status := sm.describe_training_job(TrainingJobName=name)["TrainingJobStatus"]) in (
        "InProgress",
        "Stopping",
    ) and time.time() < deadline:
        time.sleep(0.1)
    return status


def in_asset(fn):
    """Run ``fn(context)`` inside a real asset step (Pipes sessions need one); returns (result, value)."""
    out = {}

    @dg.asset
    def training_probe(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        out["value"] = fn(context)
        return dg.MaterializeResult()

    with dg.instance_for_test() as instance:
        result = dg.materialize([training_probe], raise_on_error=False, instance=instance)
        out["logs"] = [e.user_message for e in instance.all_logs(result.run_id)]
    return result, out


def test_create_training_job_request_shape_pinned_with_stubber(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    lake = S3Lake("s3://bucket/lake", endpoint_url="http://127.0.0.1:1")
    t = SageMakerTrainer(
        role_arn="arn:aws:iam::1:role/r",
        training_image="img:1",
        max_runtime_seconds=3600,
        max_wait_seconds=600,
    )
    channels = {
        "shards": (
            {"S3DataType": "S3Prefix", "S3Uri": "s3://bucket/lake/subsets/s/shards/resized/"},
            "FastFile",
        ),
        "init": ({"S3DataType": "S3Prefix", "S3Uri": "s3://bucket/lake/models/m/init.pt"}, "File"),
    }
    req = training_request(
        t,
        name="job-0",
        lake=lake,
        channels=channels,
        model_key="m",
        base_job="job",
        instance_type="ml.m5.large",
        hyperparameters={"epochs": 3},
    )
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 3600,
        "MaxWaitTimeInSeconds": 3600,
    }  # MaxWait >= MaxRuntime
    assert req["CheckpointConfig"] == {
        "S3Uri": "s3://bucket/lake/models/m/checkpoints/job/",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert req["HyperParameters"] == {
        "epochs": "3",
        "checkpoint_dir": "/opt/ml/checkpoints",
    }  # strings, as SageMaker wants
    assert [
        (c["ChannelName"], c["DataSource"]["S3DataSource"]["S3DataType"], c["InputMode"])
        for c in req["InputDataConfig"]
    ] == [("shards", "S3Prefix", "FastFile"), ("init", "S3Prefix", "File")]
    sm = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(sm) as stub:  # botocore validates the whole request against the service model
        stub.add_response(
            "create_training_job",
            {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/job-0"},
            req,
        )
        sm.create_training_job(**req)
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    "error, stopped",
    [
        (dg.DagsterExecutionInterruptedError(), True),  # the run was cancelled
        (EndpointConnectionError(endpoint_url="http://127.0.0.1"), False),  # past its retries
    ],
)
def test_only_a_cancel_stops_the_training_job_not_a_failed_poll(aws, error, stopped):
    """The runner's public run on a stubbed SageMaker client (the lake on the moto server, for
    Pipes): no job yet, one created, then the first describe of its wait raises ``error``. The
    Stubber holds exactly the calls the runner may make after it (a StopTrainingJob on a cancel,
    nothing otherwise)."""
    from workloads.lake import open_lake

    sm = boto3.client("sagemaker", region_name="us-east-1")
    describes = []

    def raise_on_the_wait(**kwargs):
        describes.append(kwargs)
        if len(describes) > 1:  # the first: is there a job of that name already
            raise error

    sm.meta.events.register(
        "provide-client-params.sagemaker.DescribeTrainingJob", raise_on_the_wait
    )
    runner = SageMakerTrainingRunner(
        sm, config=SageMakerTrainer(role_arn="arn:aws:iam::1:role/r", training_image="img:1")
    )
    caught = {}

    def train(context):
        try:
            runner.run(
                context=context,
                lake=open_lake("s3://cvgraph-lake/lake"),
                job_name="job",
                shards_key="subsets/s/shards/resized",
                model_key="m",
                hyperparameters={"epochs": 1},
            )
        except BaseException as e:
            caught["error"] = e

    with Stubber(sm) as stub:
        stub.add_client_error(
            "describe_training_job", "ValidationException", "Could not find job-0"
        )
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:x"})
        if stopped:
            stub.add_response("stop_training_job", {}, {"TrainingJobName": "job-0"})
        in_asset(train)
        stub.assert_no_pending_responses()
    assert type(caught["error"]) is type(error)


def test_capacity_fallback_and_spot_interruption_resume_from_checkpoint(shards_on_s3, aws):
    lake, manifest, index = shards_on_s3
    aws.no_capacity = {"ml.m5.large"}
    aws.interrupt_after_epochs = 2
    result, out = in_asset(
        lambda ctx: trainer().train(
            ctx,
            lake,
            "cvgraph-digits_cnn-abc",
            "subsets/all/shards/resized",
            "digits_cnn",
            {**HP, "epochs": 30},
        )
    )
    assert result.success
    metrics = out["value"]
    assert any(m.startswith("epoch=") for m in out["logs"]), (
        "the job's log lines reach Dagster through Pipes on S3"
    )
    first, second = aws.training_runs
    assert (first["instance_type"], first["attempts"]) == (
        "ml.m5.large",
        0,
    )  # capacity error: never ran
    assert (
        second["instance_type"] == "ml.c5.xlarge" and second["name"] == "cvgraph-digits-cnn-abc-1"
    )
    assert second["attempts"] == 2
    resumed = int(second["output"].split("resumed from checkpoint at epoch ")[1].split()[0])
    assert (
        2 <= resumed < 30
    )  # killed after epoch 2 was checkpointed; the restart went on from there
    after = second["output"].split("resumed from checkpoint")[1]
    assert after.split("epoch=")[1].split()[0] == str(resumed + 1)  # no epoch trained twice
    # the restarted container rejoins the Pipes session: every line it logged reaches Dagster
    logged = {
        int(m.split()[0].split("=")[1].split("/")[0]) for m in out["logs"] if m.startswith("epoch=")
    }
    assert set(range(resumed + 1, 31)) <= logged, sorted(logged)
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 31))
    assert lake.get("models/digits_cnn/model.pt")[:2] == b"PK"  # torch zip format
    # the step links the jobs it created (the fallback's too) to their console pages
    [event] = result.asset_materializations_for_node("training_probe")
    console = "https://us-east-1.console.aws.amazon.com/sagemaker/home?region=us-east-1#/jobs/"
    assert {k: v for k, v in event.metadata.items() if k.startswith("sagemaker")} == {
        f"sagemaker job {n}": dg.MetadataValue.url(console + n)
        for n in ("cvgraph-digits-cnn-abc-0", "cvgraph-digits-cnn-abc-1")
    }
    assert json.loads(lake.get("models/digits_cnn/metrics.json"))["classes"] == ["0", "1"]
    # the job's input: the shards (FastFile: streamed, nothing copied first), not an object
    # per image; every image of the subset is in them
    shard_objects = [
        f"lake/subsets/all/shards/resized/{e['key']}"
        for s in index["splits"].values()
        for e in s["shards"]
    ]
    assert second["channels"] == {
        "shards": {
            "mode": "FastFile",
            "read": sorted(["lake/subsets/all/shards/resized/index.json", *shard_objects]),
        }
    }
    assert len(shard_objects) == 3  # one a split: a small subset
    images = {k.rsplit("/", 1)[-1].split(".")[0] for k in manifest["resized_key"].to_pylist()}
    assert sum(s["count"] for s in index["splits"].values()) == len(images)
    ckpts = [o.key for o in lake.list("models/digits_cnn/checkpoints/")]
    assert ckpts == ["models/digits_cnn/checkpoints/cvgraph-digits-cnn-abc/checkpoint.pt"]


def test_cancelling_the_run_stops_the_training_job(shards_on_s3, aws):
    lake, _, _ = shards_on_s3

    def interrupt_when_training():
        deadline = time.time() + 120
        while (
            not (aws.training_runs and "epoch=" in aws.training_runs[0]["output"])
            and time.time() < deadline
        ):
            time.sleep(0.05)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_when_training, daemon=True).start()
    result, _ = in_asset(
        lambda ctx: trainer(use_spot=False).train(
            ctx, lake, "cancel-me", "subsets/all/shards/resized", "m2", {**HP, "epochs": 200}
        )
    )
    assert not result.success
    assert status_after_stop("cancel-me-0") == "Stopped"
    assert not lake.exists("models/m2/model.pt")


def test_a_restarted_job_continues_the_pipes_chunks_instead_of_overwriting_them(aws):
    """A spot restart rejoins the same Pipes session: its chunks follow the ones already written."""
    import dagster_pipes as dp

    from workloads.training.train import ContinuingS3MessageWriter

    s3 = boto3.client("s3", region_name="us-east-1")
    bucket, prefix = "cvgraph-lake", "lake/_pipes_session/messages"
    first = [
        b'{"__dagster_pipes_version": "0.1", "method": "opened", "params": {}}',
        b'{"method": "log", "params": {"message": "epoch=1"}}',
    ]
    for i, body in enumerate(first, start=1):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{i}.json", Body=body)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/notes.txt", Body=b"not a chunk")
    s3.put_object(
        Bucket=bucket, Key=f"{prefix}/other/99.json", Body=b"{}"
    )  # not this session's chunk
    writer = ContinuingS3MessageWriter(s3, interval=0.1)
    writer._client = OneObjectPerPage(s3)  # chunks past the first page of a listing count too
    channel = writer.make_channel({"bucket": bucket, "key_prefix": prefix})
    with channel.buffered_upload_loop():
        channel.write_message(
            {
                "__dagster_pipes_version": dp.PIPES_PROTOCOL_VERSION,
                "method": "log",
                "params": {"message": "epoch=3", "level": "INFO"},
            }
        )
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]
    )
    assert keys == [
        f"{prefix}/1.json",
        f"{prefix}/2.json",
        f"{prefix}/3.json",
        f"{prefix}/notes.txt",
        f"{prefix}/other/99.json",
    ]
    assert [
        s3.get_object(Bucket=bucket, Key=f"{prefix}/{i}.json")["Body"].read() for i in (1, 2)
    ] == first
    assert b"epoch=3" in s3.get_object(Bucket=bucket, Key=f"{prefix}/3.json")["Body"].read()


class OneObjectPerPage:
    """The S3 client, with listings paged one object at a time (as 1,000 at a time would be)."""

    def __init__(self, s3):
        self._s3 = s3

    def __getattr__(self, name):
        return getattr(self._s3, name)

    def get_paginator(self, name):
        paginator = self._s3.get_paginator(name)

        class Paged:
            def paginate(self, **kw):
                return paginator.paginate(**kw, PaginationConfig={"PageSize": 1})

        return Paged()


def test_fault_a_training_job_held_in_starting_past_the_bound_is_stopped_and_the_step_fails(
    shards_on_s3, aws
):
    """SageMaker never provisions the instance: past the bound the job is stopped and the step
    fails naming the job and the setting; no model is written."""
    lake, _, _ = shards_on_s3
    aws.hold_training = True
    try:
        result, out = in_asset(
            lambda ctx: trainer(use_spot=False, start_timeout_seconds=1.0).train(
                ctx, lake, "held", "subsets/all/shards/resized", "m3", HP
            )
        )
    finally:
        aws.hold_training = False
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    err = failure.step_failure_data.error
    while err.cause is not None:  # Dagster's step error wraps the trainer's
        err = err.cause
    message = err.message
    assert message.startswith("resources.training.TrainingFailed: ")
    assert (
        "training job held-0 stayed Starting 1 s (CVGRAPH_SAGEMAKER_START_TIMEOUT_SECONDS)"
        in message
    )
    assert message.rstrip().endswith("stopped")
    assert status_after_stop("held-0") == "Stopped"
    assert [r["name"] for r in aws.training_runs] == ["held-0"]
    assert not lake.exists("models/m3/model.pt")


def test_a_detector_trains_on_sagemaker_from_its_shards_with_the_same_entry(aws):
    """``task=detection`` through the SageMaker trainer: the same entry reads the subset's
    original-variant shards (boxes in their json) in FastFile mode, its val mAP lines reach
    Dagster through Pipes, and the job's model and metrics are a detector's."""
    from bench.training import detection_subset
    from cvgraph.demo_packs import SHAPES
    from tests.aws.conftest import LAKE_URL
    from workloads.lake import open_lake
    from workloads.training.shards import SHARDS_FORMAT

    lake = open_lake(LAKE_URL)
    base = detection_subset(lake, 40, subset="shapes")
    index = json.loads(lake.get(f"{base}/index.json"))
    assert index["format"] == SHARDS_FORMAT and index["variant"] == "original"
    hp = {"task": "detection", "epochs": 2, "input_size": 64, "batch_size": 8, "width": 8}
    result, out = in_asset(
        lambda ctx: trainer().train(ctx, lake, "cvgraph-det-abc", base, "det", hp)
    )
    assert result.success
    assert any(m.startswith("epoch=2 ") and "val_map=" in m for m in out["logs"]), out["logs"]
    [run] = aws.training_runs
    shard_objects = [
        f"lake/{base}/{e['key']}" for s in index["splits"].values() for e in s["shards"]
    ]
    assert run["channels"] == {
        "shards": {"mode": "FastFile", "read": sorted([f"lake/{base}/index.json", *shard_objects])}
    }
    metrics = json.loads(lake.get("models/det/metrics.json"))
    assert metrics["task"] == "detection" and metrics["classes"] == sorted(SHAPES)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert 0.0 <= metrics["test_map"] <= metrics["test_map50"] <= 1.0
    assert metrics["boxes"]["train"] == sum(index["splits"]["train"]["categories"].values())
    assert out["value"]["test_map50"] == metrics["test_map50"]


def test_an_entry_point_of_the_users_trains_on_sagemaker_in_script_mode(shards_on_s3, aws):
    """A user's script (tests/cvgraph/byo_trainer) in SageMaker's script mode: its folder
    uploaded, named as sagemaker_program / sagemaker_submit_directory, run in the image the
    spec names with the shards and manifest channels; its model.onnx and metrics.json land in
    the lake and hold to the contract."""
    from pathlib import Path

    from workloads.training.byo import check_outputs, source_archive

    lake, manifest, _ = shards_on_s3
    script = Path(__file__).parents[1] / "cvgraph" / "byo_trainer" / "centroids.py"
    blob, sha = source_archive(str(script))
    lake.put(f"models/byo/source/{sha}.tar.gz", blob)
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/my-trainer:1"
    hp = {
        **HP,
        "input_size": 16,
        "entry_point": str(script),
        "training_image": image,
        "source_key": f"models/byo/source/{sha}.tar.gz",
        "manifest_key": "subsets/all/manifest.parquet",
    }
    result, out = in_asset(
        lambda ctx: trainer().train(
            ctx, lake, "cvgraph-byo-abc", "subsets/all/shards/resized", "byo", hp
        )
    )
    assert result.success
    metrics = out["value"]
    check_outputs(lake.get("models/byo/model.onnx"), metrics)
    assert metrics["manifest_rows"] == manifest.num_rows
    assert not lake.exists("models/byo/model.pt")
    (run,) = aws.training_runs
    assert run["image"] == image
    assert set(run["channels"]) == {"shards", "manifest"}
    assert run["channels"]["manifest"]["read"] == ["lake/subsets/all/manifest.parquet"]
    # the script's Pipes log line reached the Dagster run
    assert any(m.startswith("centroids of 2 classes") for m in out["logs"]), out["logs"][-5:]
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName="cvgraph-byo-abc-0")
    assert job["HyperParameters"]["sagemaker_program"] == "centroids.py"
    assert job["HyperParameters"]["sagemaker_submit_directory"].endswith(f"{sha}.tar.gz")
    assert "entry_point" not in job["HyperParameters"]

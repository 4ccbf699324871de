import _thread
import os
import threading
import time

import boto3
import dagster as dg
import pytest
from botocore.exceptions import EndpointConnectionError
from botocore.stub import Stubber

from resources.batch import (
    BATCH_RETRY,
    ArrayJob,
    BatchArrayClient,
    BatchArrayRunner,
    BatchChildrenFailed,
    ChildFailure,
)
from resources.compute import WorkloadFailed
from workloads.image_params import ImageParams
from workloads.layout import result_key


def client(aws_env=None) -> BatchArrayClient:
    import os

    return BatchArrayClient(
        job_queue=os.environ["CVGRAPH_BATCH_JOB_QUEUE"],
        job_definition=os.environ["CVGRAPH_BATCH_JOB_DEFINITION"],
        poll_seconds=0.2,
    )


def parents():
    from moto.batch.models import batch_backends

    jobs = batch_backends["123456789012"]["us-east-1"]._jobs
    return [j for jid, j in jobs.items() if ":" not in jid]


def test_request_shapes_pinned_with_stubber():
    """What moto does not validate: array size, N_TO_N, retry on spot reclaim only, the command,
    the names a dead run's jobs are found by; and each job's console page."""
    batch = boto3.client(
        "batch", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    runner = BatchArrayRunner(
        batch,
        job_queue="q",
        job_definition="jd",
        poll_seconds=0.01,
        start_timeout_seconds=0,
        max_array_size=3,
        environment={"CVGRAPH_INGEST_MAX_MB": "5"},
    )
    cmd = ["python", "-m", "workloads.images", "--prefixes", "00,01,02"]
    env = [{"name": "CVGRAPH_INGEST_MAX_MB", "value": "5"}]
    three = [["00"], ["01"], ["02"]]  # a prefix a child: no group arguments
    submits = [
        ("J1", "cvgraph-run1-resize-00-02", {"arrayProperties": {"size": 3}}),
        (
            "J2",
            "cvgraph-run1-edges-00-02",
            {"arrayProperties": {"size": 3}, "dependsOn": [{"jobId": "J1", "type": "N_TO_N"}]},
        ),
        ("J3", "cvgraph-run1-tables-00-00", {"dependsOn": [{"jobId": "J2"}]}),  # one: no array
    ]
    with Stubber(batch) as stub:
        for jid, name, extra in submits:
            stub.add_response(
                "submit_job",
                {"jobName": name, "jobId": jid},
                {
                    "jobName": name,
                    "jobQueue": "q",
                    "jobDefinition": "jd",
                    "containerOverrides": {"command": cmd, "environment": env},
                    "retryStrategy": BATCH_RETRY,
                    "propagateTags": True,
                    "tags": {"dagster/run_id": "run1"},
                    **extra,
                },
            )
        done = {"jobQueue": "q", "jobDefinition": "jd", "status": "SUCCEEDED", "startedAt": 1}
        stub.add_response(
            "describe_jobs",
            {
                "jobs": [
                    {
                        "jobId": j,
                        "jobName": n,
                        **done,
                        **({"arrayProperties": {"size": 3}} if j != "J3" else {}),
                    }
                    for j, n, _ in submits
                ]
            },
            {"jobs": ["J1", "J2", "J3"]},
        )
        for jid in ("J1", "J2"):  # an array's failed children are listed: none
            stub.add_response(
                "list_jobs", {"jobSummaryList": []}, {"arrayJobId": jid, "jobStatus": "FAILED"}
            )
        ran = runner.run(
            context=dg.build_asset_context(),
            run_id="run1",
            jobs=[
                ArrayJob("resize", cmd, three),
                ArrayJob("edges", cmd, three),
                ArrayJob("tables", cmd, [["00"]]),
            ],
        )
        stub.assert_no_pending_responses()
    assert ran.failures == [] and ran.jobs == {"J1": "resize", "J2": "edges", "J3": "tables"}
    assert ran.urls["J2"] == (
        "https://eu-west-1.console.aws.amazon.com/batch/home?region=eu-west-1#jobs/detail/J2"
    )
    assert BatchArrayClient.model_fields["max_array_size"].default == 10_000  # Batch's limit
    assert BATCH_RETRY["evaluateOnExit"][0] == {"onStatusReason": "Host EC2*", "action": "RETRY"}
    assert BATCH_RETRY["evaluateOnExit"][-1] == {"onReason": "*", "action": "EXIT"}
    with pytest.raises(WorkloadFailed, match="4 children exceed the Batch array limit of 3"):
        runner.run(
            context=dg.build_asset_context(),
            run_id="run2",
            jobs=[ArrayJob("resize", cmd, [*three, ["03"]])],
        )


def test_prefixes_with_work_are_one_array_job_per_stage_in_chunks_of_the_array_limit(
    indexed_lake, aws
):
    lake, busy = indexed_lake
    params = ImageParams()
    ctx = dg.build_asset_context()
    client().run_image_stages(ctx, lake.url, "run1", ["resize", "edges"], busy, params)
    jobs = parents()
    assert len(jobs) == 2  # one submit_job per stage
    resize, edges = sorted(jobs, key=lambda j: "-resize-" not in j.job_name)
    assert resize.job_name.startswith("cvgraph-run1-resize-") and edges.job_name.startswith(
        "cvgraph-run1-edges-"
    )
    assert len(resize._child_jobs) == len(edges._child_jobs) == len(busy)
    assert edges.depends_on == [{"jobId": resize.job_id, "type": "N_TO_N"}]
    children = [r for r in aws.batch_runs if r["index"] is not None]
    assert len(children) == 2 * len(busy) and all(
        r["command"][1:3] == ["-m", "workloads.images"] for r in children
    )
    import json

    for p in busy:  # every prefix has its result record; each processed its images on "Batch"
        rec = json.loads(lake.get(result_key("run1", "resize", p)))
        assert rec["failed"] == [] and rec["processed"] == rec["images"] > 0
    assert sum(1 for _ in lake.list("resized/")) == sum(1 for _ in lake.list("edges/")) == 40
    # past the array limit, prefixes go in chunks: one array job per chunk and stage
    small = BatchArrayClient(
        job_queue=os.environ["CVGRAPH_BATCH_JOB_QUEUE"],
        job_definition=os.environ["CVGRAPH_BATCH_JOB_DEFINITION"],
        poll_seconds=0.2,
        max_array_size=len(busy) - 1,
    )
    small.run_image_stages(ctx, lake.url, "run2", ["resize"], busy, params)
    chunks = sorted(
        len(j._child_jobs or [None]) for j in parents() if j.job_name.startswith("cvgraph-run2-")
    )
    assert chunks == [1, len(busy) - 1]
    assert (
        json.loads(lake.get(result_key("run2", "resize", busy[0])))["skipped"] > 0
    )  # done: from the hash index


def test_failed_children_are_reported_with_prefix_reason_and_log_then_rerun_does_only_the_rest(
    indexed_lake, aws
):
    import json

    lake, busy = indexed_lake
    bad = busy[1]
    aws.oom_prefixes = {bad}
    with pytest.raises(WorkloadFailed) as err:
        client().run_image_stages(
            dg.build_asset_context(), lake.url, "r1", ["resize"], busy, ImageParams()
        )
    # the failure as data: which child, which prefix, how it ended
    [failure] = err.value.failures
    assert isinstance(err.value, BatchChildrenFailed) and isinstance(failure, ChildFailure)
    assert (failure.stage, failure.prefix, failure.index, failure.exit_code) == (
        "resize",
        bad,
        busy.index(bad),
        137,
    )
    msg = str(err.value)
    assert (
        f"resize prefix {bad}: OutOfMemoryError: Container killed due to memory usage (exit 137, log stream cvgraph-worker/default/"
        in msg
    )
    assert msg.startswith("1 batch children failed")
    assert all(
        lake.exists(result_key("r1", "resize", p)) for p in busy if p != bad
    ) and not lake.exists(result_key("r1", "resize", bad))
    aws.oom_prefixes = set()
    before = len(aws.batch_runs)
    client().run_image_stages(
        dg.build_asset_context(), lake.url, "r2", ["resize"], [bad], ImageParams()
    )  # what the step re-runs
    rerun = aws.batch_runs[before:]
    assert (
        len(rerun) == 1
        and rerun[0]["index"] is None
        and f"--prefixes {bad}" in " ".join(rerun[0]["command"])
    )
    assert json.loads(lake.get(result_key("r2", "resize", bad)))["processed"] > 0


def test_cancelling_the_run_terminates_the_array_job(indexed_lake, aws):
    lake, busy = indexed_lake

    def interrupt_when_running():
        deadline = time.time() + 60
        while not aws.batch_runs and time.time() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()  # what Dagster does on cancel: an interrupt in the step

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        client().run_image_stages(
            dg.build_asset_context(), lake.url, "rc", ["resize", "edges"], busy, ImageParams()
        )
    deadline = time.time() + 30
    children = [c for j in parents() for c in j._child_jobs]
    while any(c.status not in ("SUCCEEDED", "FAILED") for c in children) and time.time() < deadline:
        time.sleep(0.1)
    assert {p.job_stopped_reason for p in parents()} == {"Dagster run cancelled"}
    assert all(c.status in ("SUCCEEDED", "FAILED") for c in children)
    assert any(
        c.job_stopped_reason == "Dagster run cancelled" and c.status == "FAILED" for c in children
    )
    assert len([r for r in aws.batch_runs if r["index"] is not None]) < 2 * len(
        busy
    )  # not everything ran


def test_ingest_reads_an_unreadable_pack_from_the_exit_code_and_fails_loudly_otherwise(aws):
    """run_ingest in a real run: the child's exit code PACK_UNREADABLE is the pack's verdict (data
    from describe_jobs, not text); any other failure names the pack and the child's exit."""
    from workloads.lake import open_lake
    from workloads.tasks import PACK_UNREADABLE

    lake = open_lake("s3://cvgraph-lake/lake")
    lake.put("incoming/junk.zip", b"not a zip at all")
    out = {}

    @dg.asset
    def ingest_probe(context: dg.AssetExecutionContext, image_compute: BatchArrayClient) -> None:
        out["junk"] = image_compute.run_ingest(context, lake.url, "junk", "incoming/junk.zip")
        try:
            image_compute.run_ingest(context, lake.url, "gone", "incoming/gone.zip")
        except BatchChildrenFailed as e:
            out["gone"] = e

    result = dg.materialize([ingest_probe], resources={"image_compute": client()})
    assert result.success
    assert out["junk"] == PACK_UNREADABLE
    [failure] = out["gone"].failures
    # the step's materialization links the job's console page (the last ingest's)
    [event] = result.asset_materializations_for_node("ingest_probe")
    assert event.metadata["batch_job_ingest"] == dg.MetadataValue.url(
        "https://us-east-1.console.aws.amazon.com/batch/home?region=us-east-1"
        f"#jobs/detail/{failure.job_id}"
    )
    assert (failure.stage, failure.prefix, failure.index) == ("ingest", "gone", None)
    assert failure.exit_code not in (0, PACK_UNREADABLE, None)
    assert str(out["gone"]).startswith("ingest of pack gone (incoming/gone.zip) failed on Batch:")


def describe_jobs_raises(error: BaseException):
    """The aws profile's Batch client (on the moto server), whose describe_jobs raises ``error``."""
    batch = boto3.client("batch")

    def raise_error(**kwargs):
        raise error

    batch.meta.events.register("provide-client-params.batch.DescribeJobs", raise_error)
    return batch


@pytest.mark.parametrize(
    "error, terminated",
    [
        (dg.DagsterExecutionInterruptedError(), True),  # the run was cancelled
        (KeyboardInterrupt(), True),  # cancelled where no Dagster step runs the client
        (EndpointConnectionError(endpoint_url="http://127.0.0.1"), False),  # past its retries
    ],
)
def test_only_a_cancel_terminates_the_jobs_not_a_failed_poll(aws, error, terminated):
    compute = client().with_client(describe_jobs_raises(error))
    with pytest.raises(type(error)):
        compute.run_prefix_tasks(
            dg.build_asset_context(),
            "sleep",
            lambda prefixes: ["python", "-c", "import time; time.sleep(60)"],
            ["00"],
            "poll1234",
        )
    [job] = parents()
    if terminated:
        assert job.job_stopped_reason == "Dagster run cancelled"
    else:  # the job goes on: a describe that failed says nothing about it
        assert job.job_stopped_reason is None and not job.stop
        boto3.client("batch").terminate_job(jobId=job.job_id, reason="test over")


REASON = "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs more vCPUs than the environment offers"


@pytest.mark.parametrize("prefixes", [["00"], ["00", "01", "02"]], ids=["single", "array"])
def test_fault_jobs_held_runnable_past_the_start_timeout_are_terminated_and_the_step_names_why(
    aws, prefixes
):
    """Batch never places the jobs (no capacity, a misconfigured environment): past the bound
    the client terminates them and fails naming the queue, the job ids and Batch's reason."""
    from resources.batch import JobsNeverStarted

    aws.runnable_reason = REASON
    compute = client().model_copy(update={"start_timeout_seconds": 1.0})
    try:
        with pytest.raises(JobsNeverStarted) as e:
            compute.run_prefix_tasks(
                dg.build_asset_context(),
                "index",
                lambda ps: ["python", "-c", "print('never runs')"],
                prefixes,
                "held1234",
            )
    finally:
        aws.runnable_reason = None
    [job] = parents()
    message = str(e.value)
    assert message.startswith(
        f"batch jobs {job.job_id} on queue {os.environ['CVGRAPH_BATCH_JOB_QUEUE']} "
    )
    assert (
        "waited RUNNABLE/STARTING 1 s with none started (CVGRAPH_BATCH_START_TIMEOUT_SECONDS)"
        in message
    )
    assert f"Batch says: {REASON}; the run's jobs were terminated" in message
    assert job.stop and job.job_stopped_reason == "not started in time"
    assert aws.batch_runs == []  # nothing ran


def test_a_job_that_starts_within_the_bound_is_not_stopped(aws):
    """Waiting less than the bound (here: capacity arrives after a moment) is no failure."""
    aws.runnable_reason = REASON
    threading.Timer(0.5, lambda: setattr(aws, "runnable_reason", None)).start()
    compute = client().model_copy(update={"start_timeout_seconds": 30.0})
    compute.run_prefix_tasks(
        dg.build_asset_context(),
        "index",
        lambda ps: ["python", "-c", "print('ran')"],
        ["00"],
        "late1234",
    )
    [job] = parents()
    assert not job.stop and len(aws.batch_runs) == 1


def test_a_child_runs_its_group_of_prefixes_and_a_failed_group_is_all_a_rerun_redoes(
    indexed_lake, aws
):
    """Children take groups of prefix tasks (``workloads.costs.task_groups``); results stay per
    prefix, so a failed child's group is what the step's re-run finds unfinished."""
    import json

    lake, busy = indexed_lake
    groups = [busy[:10], busy[10:25], busy[25:]]
    bad = groups[1][3]
    aws.oom_prefixes = {bad}
    with pytest.raises(BatchChildrenFailed) as err:
        client().run_image_stages(
            dg.build_asset_context(),
            lake.url,
            "g1",
            ["resize", "edges"],
            busy,
            ImageParams(),
            groups,
        )
    resize, edges = sorted(
        (j for j in parents() if j.job_name.startswith("cvgraph-g1-")),
        key=lambda j: "-resize-" not in j.job_name,
    )
    assert len(resize._child_jobs) == len(edges._child_jobs) == 3  # a child a group, per stage
    assert edges.depends_on == [{"jobId": resize.job_id, "type": "N_TO_N"}]
    ran = {
        (r["command"][r["command"].index("--stages") + 1], r["index"]): r for r in aws.batch_runs
    }
    for i, g in enumerate(groups):
        assert ran[("resize", i)]["prefixes"] == g
    # the failed child names its group; edges of that group never started (N_TO_N)
    [oom, dep] = sorted(err.value.failures, key=lambda f: f.stage != "resize")
    assert (oom.stage, oom.index, oom.exit_code, oom.prefix) == (
        "resize",
        1,
        137,
        ",".join(groups[1]),
    )
    assert (dep.stage, dep.index, dep.prefix) == ("edges", 1, ",".join(groups[1]))
    unfinished = [p for p in busy if not lake.exists(result_key("g1", "edges", p))]
    assert unfinished == groups[1]
    assert all(lake.exists(result_key("g1", "resize", p)) for p in groups[0] + groups[2])
    aws.oom_prefixes = set()
    before = len(aws.batch_runs)
    client().run_image_stages(
        dg.build_asset_context(),
        lake.url,
        "g2",
        ["resize", "edges"],
        unfinished,
        ImageParams(),
        [unfinished],
    )
    rerun = aws.batch_runs[before:]
    assert [r["prefixes"] for r in rerun] == [unfinished, unfinished]  # one child a stage
    for p in unfinished:
        assert json.loads(lake.get(result_key("g2", "edges", p)))["processed"] > 0


def test_a_chain_is_one_array_job_whose_children_index_make_images_and_tables_of_their_group(
    aws, small_digits_pack
):
    """``run_chain``: one array job, a child a group; each child indexes its group, makes the
    images and writes the tables, every part leaving its result record; a failed child's group
    is exactly what has no record, and a re-run of that group finishes it."""
    import json

    from workloads.ingest import ingest_pack
    from workloads.lake import open_lake

    lake = open_lake("s3://cvgraph-lake/lake")
    lake.put("incoming/digits.zip", small_digits_pack(40))
    ingest_pack(lake, "digits", "incoming/digits.zip")
    touched = sorted(json.loads(lake.get("packs/digits/pack.json"))["prefixes"])
    groups = [touched[:12], touched[12:25], touched[25:]]
    aws.oom_prefixes = {groups[1][0]}
    with pytest.raises(BatchChildrenFailed) as err:
        client().run_chain(
            dg.build_asset_context(),
            lake.url,
            "c1",
            touched,
            ImageParams(),
            shard_images=10_000,
            tables=True,
            groups=groups,
        )
    [job] = [j for j in parents() if j.job_name.startswith("cvgraph-c1-chain-")]
    assert len(job._child_jobs) == 3 and len(parents()) == 1  # one array job, a child a group
    [failure] = err.value.failures
    assert (failure.stage, failure.index, failure.prefix) == ("chain", 1, ",".join(groups[1]))
    for stage in ("index", "resize", "edges", "tables"):
        done = [p for p in touched if lake.exists(result_key("c1", stage, p))]
        assert done == groups[0] + groups[2], stage
    assert json.loads(lake.get(result_key("c1", "resize", groups[0][0])))["processed"] >= 1
    aws.oom_prefixes = set()
    client().run_chain(
        dg.build_asset_context(),
        lake.url,
        "c2",
        groups[1],
        ImageParams(),
        shard_images=10_000,
        tables=True,
    )
    assert all(lake.exists(result_key("c2", "tables", p)) for p in groups[1])
    assert sum(1 for _ in lake.list("resized/")) == sum(1 for _ in lake.list("edges/")) == 40

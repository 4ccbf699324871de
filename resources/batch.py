"""Image compute on AWS Batch: one array job per stage per ranged run; child index → a group of
prefix tasks (``workloads.costs.task_groups``: about a minute of work a child)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from pydantic import Field

from resources.aws import (
    AwsResource,
    batch_console_url,
    link_on_materializations,
    poll,
    stopped_on_interrupt,
)
from resources.compute import (
    ImageCompute,
    WorkloadFailed,
    chain_command,
    images_command,
    ingest_command,
)
from workloads.image_params import IMAGE_THREADS
from workloads.tasks import VERDICTS, group_args

# Spot reclaims (the host went away) are retried; a non-zero exit of our code is not.
BATCH_RETRY = {
    "attempts": 3,
    "evaluateOnExit": [
        {"onStatusReason": "Host EC2*", "action": "RETRY"},  # EC2 Spot reclaim
        {
            "onStatusReason": "Your Spot Task was interrupted*",
            "action": "RETRY",
        },  # Fargate Spot reclaim
        {"onReason": "*", "action": "EXIT"},
    ],
}
TERMINAL = ("SUCCEEDED", "FAILED")


@dataclass(frozen=True)
class ChildFailure:
    """A Batch child (or single job) that ended FAILED, as ``describe_jobs`` tells it."""

    stage: str
    prefix: str  # the child's prefixes (its group), comma-joined; a single job's too
    job_id: str
    index: int | None  # the array index; None for a single job
    exit_code: int | None  # None when the container never exited (a failed dependency, a reclaim)
    reason: str
    log_stream: str | None

    def __str__(self) -> str:
        return f"{self.stage} prefix {self.prefix}: {self.reason} (exit {self.exit_code}, log stream {self.log_stream}, job {self.job_id})"


class BatchChildrenFailed(WorkloadFailed):
    """Batch children failed: ``failures`` holds each one, the message lists them."""

    def __init__(self, failures: list[ChildFailure], what: str | None = None):
        self.failures = tuple(failures)
        message = f"{len(failures)} batch children failed:\n" + "\n".join(map(str, failures))
        super().__init__(f"{what}: {message}" if what else message)


def _batches(items: list, n: int = 100):
    for i in range(0, len(items), n):
        yield items[i : i + n]


class JobsNeverStarted(WorkloadFailed):
    """Batch jobs sat RUNNABLE/STARTING past the bound with nothing started; terminated."""


def _start_counts(d: dict) -> tuple[int, int]:
    """(children waiting to be placed or started, children that did start) of job ``d``
    (the job itself if it is no array). PENDING is not waiting: it waits on a dependency."""
    summary = d.get("arrayProperties", {}).get("statusSummary")
    if summary is None:
        return int(d["status"] in ("RUNNABLE", "STARTING")), int(
            d["status"] in ("RUNNING", *TERMINAL)
        )
    started = sum(summary.get(s, 0) for s in ("RUNNING", *TERMINAL))
    return summary.get("RUNNABLE", 0) + summary.get("STARTING", 0), started


def _finished(d: dict) -> bool:
    """A job is over, or an array whose children all are (its own status can lag behind)."""
    summary = d.get("arrayProperties", {}).get("statusSummary")
    size = d.get("arrayProperties", {}).get("size", 1)
    return d["status"] in TERMINAL or (
        summary is not None and summary.get("SUCCEEDED", 0) + summary.get("FAILED", 0) >= size
    )


@dataclass(frozen=True)
class ArrayJob:
    """One submit_job of a step: ``command`` (plus the group arguments when a child takes more
    than one prefix) as an array of a child per group, or a single job for one group."""

    stage: str
    command: list[str]
    groups: list[list[str]]


@dataclass(frozen=True)
class BatchRun:
    """What ``BatchArrayRunner.run`` did: each job submitted (id → stage), its console page, and
    the children that failed."""

    jobs: dict[str, str]
    urls: dict[str, str]
    failures: list[ChildFailure]


class BatchArrayRunner:
    """Runs a step's array jobs on AWS Batch, shaped like dagster-aws's ``PipesECSClient``: the
    boto3 client comes in the constructor, ``run`` submits, polls to the end and reports the
    failed children, and a cancelled Dagster run terminates the jobs it submitted.

    Built by ``BatchArrayClient.get_runner`` from the resource's configuration."""

    def __init__(
        self,
        client,
        *,
        job_queue: str,
        job_definition: str,
        poll_seconds: float,
        start_timeout_seconds: float,
        max_array_size: int,
        environment: dict[str, str],
    ):
        self.client = client
        self.job_queue, self.job_definition = job_queue, job_definition
        self.poll_seconds, self.start_timeout_seconds = poll_seconds, start_timeout_seconds
        self.max_array_size = max_array_size
        self.environment = [{"name": k, "value": v} for k, v in sorted(environment.items())]

    def run(self, *, context, run_id: str, jobs: list[ArrayJob]) -> BatchRun:
        """Submit ``jobs`` in order (each N_TO_N on the one before), a child a group, and wait
        for all; returns what ran and which children failed (not raised: the caller knows what
        a failure means for its step).

        If the Dagster run is cancelled meanwhile every job submitted so far is terminated, as
        dagster-aws's Pipes clients stop their remote work; any other error leaves them running."""
        submitted: dict[str, tuple[str, list[list[str]]]] = {}
        previous = None
        with stopped_on_interrupt(lambda: self._terminate(context, run_id, submitted)):
            for job in jobs:
                name = re.sub(
                    r"[^A-Za-z0-9_-]",
                    "_",
                    f"{_name_prefix(run_id)}{job.stage}-{job.groups[0][0]}-{job.groups[-1][-1]}",
                )
                grouped = any(len(g) > 1 for g in job.groups)
                previous = self._submit(
                    name,
                    [*job.command, *group_args(job.groups)] if grouped else job.command,
                    len(job.groups),
                    depends_on=previous,
                    tags={"dagster/run_id": run_id},
                )
                submitted[previous] = (job.stage, job.groups)
                tasks = sum(map(len, job.groups))
                context.log.info(
                    f"submitted {job.stage} as batch job {previous} ({len(job.groups)} children, "
                    f"{tasks} prefix tasks): {self.url(previous)}"
                )
            descs = self._wait(context, submitted, run_id)
        return BatchRun(
            jobs={jid: stage for jid, (stage, _) in submitted.items()},
            urls={jid: self.url(jid) for jid in submitted},
            failures=self._failures(submitted, descs),
        )

    def url(self, job_id: str) -> str:
        return batch_console_url(self.client.meta.region_name, job_id)

    def stop(self, *, run_id: str, why: str) -> list[str]:
        """Terminate the jobs of run ``run_id`` (found by name: its process is gone) and wait
        (up to ``start_timeout_seconds``) until they have ended; returns their ids."""
        stopped = self._terminate_named(run_id, why)
        deadline = time.monotonic() + (self.start_timeout_seconds or 3600.0)
        while stopped and time.monotonic() < deadline:
            if all(_finished(d) for d in self._describe(stopped).values()):
                break
            time.sleep(self.poll_seconds)
        return stopped

    def _submit(
        self,
        name: str,
        command: list[str],
        size: int,
        depends_on: str | None = None,
        tags: dict | None = None,
    ) -> str:
        """One submit_job: an array of ``size`` children (or a single job when size is 1)."""
        if size > self.max_array_size:
            raise WorkloadFailed(
                f"{size} children exceed the Batch array limit of {self.max_array_size}"
            )
        kw = {
            "jobName": name[:128],
            "jobQueue": self.job_queue,
            "jobDefinition": self.job_definition,
            "containerOverrides": {"command": command, "environment": self.environment},
            "retryStrategy": BATCH_RETRY,
            "propagateTags": True,
            "tags": tags or {},
        }
        if size > 1:
            kw["arrayProperties"] = {"size": size}
        if depends_on:
            kw["dependsOn"] = [
                {"jobId": depends_on, "type": "N_TO_N"} if size > 1 else {"jobId": depends_on}
            ]
        return self.client.submit_job(**kw)["jobId"]

    def _describe(self, ids: list[str]) -> dict[str, dict]:
        return {
            d["jobId"]: d
            for chunk in _batches(ids)
            for d in self.client.describe_jobs(jobs=chunk)["jobs"]
        }

    def _wait(
        self, context, jobs: dict[str, tuple[str, list[str]]], run_id: str
    ) -> dict[str, dict]:
        """Poll ``describe_jobs`` (100 ids a call) until every job is terminal; terminate them
        all if one waits to start past ``start_timeout_seconds`` with no child starting."""
        last: dict[str, str] = {}
        waiting_since: dict[str, tuple[int, float]] = {}  # job → (children started, since when)

        def log_changes(descs: dict[str, dict]) -> None:
            for jid, d in descs.items():
                summary = d.get("arrayProperties", {}).get("statusSummary")
                state = f"{d['status']} {summary}" if summary else d["status"]
                if last.get(jid) != state:
                    context.log.info(
                        f"batch job {jid} ({jobs[jid][0]}, "
                        f"{sum(map(len, jobs[jid][1]))} prefixes): {state}"
                    )
                    last[jid] = state
            self._check_started(context, run_id, jobs, descs, waiting_since)

        return poll(
            lambda: self._describe(list(jobs)),
            # just-submitted jobs can be missing from a describe
            lambda descs: set(descs) >= set(jobs) and all(map(_finished, descs.values())),
            self.poll_seconds,
            log_changes,
        )

    def _check_started(self, context, run_id, jobs, descs, waiting_since) -> None:
        """Raise ``JobsNeverStarted`` (the run's jobs terminated) once a job has had children
        waiting to start for ``start_timeout_seconds`` while none of them started."""
        if not self.start_timeout_seconds:
            return
        now = time.monotonic()
        stuck = []
        for jid, d in descs.items():
            waiting, started = _start_counts(d)
            if not waiting:
                waiting_since.pop(jid, None)
                continue
            seen = waiting_since.get(jid)
            if seen is None or seen[0] != started:  # a child started: the wait begins anew
                waiting_since[jid] = (started, now)
            elif now - seen[1] >= self.start_timeout_seconds:
                stuck.append(jid)
        if not stuck:
            return
        reasons = sorted({self._waiting_reason(jid, descs[jid]) for jid in stuck})
        self._terminate(context, run_id, jobs, "not started in time")
        raise JobsNeverStarted(
            f"batch jobs {', '.join(stuck)} on queue {self.job_queue} waited RUNNABLE/STARTING "
            f"{self.start_timeout_seconds:g} s with none started "
            f"(CVGRAPH_BATCH_START_TIMEOUT_SECONDS); Batch says: {'; '.join(reasons)}; "
            "the run's jobs were terminated"
        )

    def _waiting_reason(self, jid: str, d: dict) -> str:
        """Batch's status reason for a waiting job: its own, or a waiting child's for an array."""
        if d.get("statusReason") or "arrayProperties" not in d:
            return d.get("statusReason") or "no status reason given"
        for status in ("RUNNABLE", "STARTING"):
            page = self.client.list_jobs(arrayJobId=jid, jobStatus=status, maxResults=1)
            for j in page.get("jobSummaryList", []):
                if j.get("statusReason"):
                    return j["statusReason"]
        return "no status reason given"

    def _terminate(
        self, context, run_id: str, jobs: dict, why: str = "Dagster run cancelled"
    ) -> None:
        """Terminate this run's jobs: those submitted, and by name any whose submit_job was in
        flight when the cancel landed."""
        found = self._terminate_named(run_id, why, set(jobs))
        context.log.warning(f"{why}: terminated batch jobs {found}")

    def _terminate_named(self, run_id: str, why: str, known: set[str] = frozenset()) -> list[str]:
        """Terminate ``known`` and every unfinished job named for run ``run_id``."""
        found = set(known)
        for page in self.client.get_paginator("list_jobs").paginate(
            jobQueue=self.job_queue,
            filters=[{"name": "JOB_NAME", "values": [_name_prefix(run_id) + "*"]}],
        ):
            found |= {j["jobId"] for j in page["jobSummaryList"] if j["status"] not in TERMINAL}
        for jid in sorted(found):
            self.client.terminate_job(jobId=jid, reason=why)
        return sorted(found)

    def _failed_children(self, d: dict) -> list[dict]:
        """The descriptions of job ``d``'s failed children (of ``d`` itself if it is no array)."""
        if "arrayProperties" in d and d["arrayProperties"].get("size", 0) > 1:
            ids = []
            for page in self.client.get_paginator("list_jobs").paginate(
                arrayJobId=d["jobId"], jobStatus="FAILED"
            ):
                ids += [j["jobId"] for j in page["jobSummaryList"]]
            return list(self._describe(ids).values())
        return [d] if d["status"] == "FAILED" else []

    def _failures(
        self, jobs: dict[str, tuple[str, list[list[str]]]], descs: dict[str, dict]
    ) -> list[ChildFailure]:
        """Each failed child with its prefixes, exit code, reason and log stream."""
        out = []
        for jid, (stage, groups) in jobs.items():
            for c in self._failed_children(descs[jid]):
                index = c.get("arrayProperties", {}).get("index")
                if index is None and ":" in c["jobId"]:  # array children are "<parent id>:<index>"
                    index = int(c["jobId"].rsplit(":", 1)[1])
                container = c.get("container", {})
                out.append(
                    ChildFailure(
                        stage=stage,
                        prefix=",".join(
                            groups[index] if index is not None else [p for g in groups for p in g]
                        ),
                        job_id=c["jobId"],
                        index=index,
                        exit_code=container.get("exitCode"),
                        reason=c.get("statusReason") or container.get("reason") or "unknown",
                        log_stream=container.get("logStreamName"),
                    )
                )
        return out


def _name_prefix(run_id: str) -> str:
    """What the names of run ``run_id``'s jobs start with (how a dead run's jobs are found)."""
    return f"cvgraph-{run_id[:8]}-"


class BatchArrayClient(ImageCompute, AwsResource):
    """AWS Batch: one array job per stage per ranged run; child index → a group of prefixes.

    The resource holds the configuration; ``get_runner`` gives the ``BatchArrayRunner`` that
    submits and waits (as dagster-aws's ``S3Resource.get_client`` gives a client). Results come
    back through the lake's result records.
    """

    job_queue: str
    job_definition: str
    poll_seconds: float = Field(10.0, description="how often a step describes its Batch jobs")
    # (no capacity, a misconfigured compute environment)
    start_timeout_seconds: float = Field(
        3600.0,
        description="a job whose children wait RUNNABLE/STARTING this long with none starting: "
        "the run's jobs are terminated; 0: no bound",
    )
    threads_per_job: int = Field(
        IMAGE_THREADS, description="threads a child overlaps its images' reads and writes with"
    )
    max_array_size: int = Field(10_000, description="Batch's limit of children an array job has")

    def get_runner(self) -> BatchArrayRunner:
        """A runner on this resource's Batch client and configuration. The children get the
        orchestrator's ``CVGRAPH_INGEST_*`` settings (an ingest's limits are the deployment's)."""
        return BatchArrayRunner(
            self._client("batch"),
            job_queue=self.job_queue,
            job_definition=self.job_definition,
            poll_seconds=self.poll_seconds,
            start_timeout_seconds=self.start_timeout_seconds,
            max_array_size=self.max_array_size,
            environment={k: v for k, v in os.environ.items() if k.startswith("CVGRAPH_INGEST_")},
        )

    def stop_run(self, run_id: str, why: str) -> list[str]:
        """Terminate the Batch jobs of run ``run_id`` whose orchestrating process is gone, and
        wait until they have ended: a killed command's jobs would otherwise go on beside the
        re-run that does their work, two tasks on one prefix."""
        return self.get_runner().stop(run_id=run_id, why=why)

    def _run_jobs(self, context, jobs: list[ArrayJob], run_id: str) -> list[ChildFailure]:
        """``jobs`` on the runner; their console pages on the step's materializations."""
        done = self.get_runner().run(context=context, run_id=run_id, jobs=jobs)
        link_on_materializations(
            context, {f"batch_job_{done.jobs[j]}": url for j, url in done.urls.items()}
        )
        return done.failures

    def _arrays(self, groups: list[list[str]]) -> list[list[list[str]]]:
        """Groups in chunks of at most ``max_array_size``: one array job each."""
        return [
            groups[i : i + self.max_array_size] for i in range(0, len(groups), self.max_array_size)
        ]

    def tasks_per_image_task(self, stages: list[str]) -> int:
        """A child per stage: an array job each."""
        return len(stages)

    def run_image_stages(self, context, lake_url, run_id, stages, prefixes, params, groups=None):
        """One array job per stage (and per chunk of ``max_array_size`` groups), each stage
        N_TO_N on the one before: child i of edges starts when child i of resize is done."""
        for chunk in self._arrays(groups or [[p] for p in prefixes]):
            tasks = [p for g in chunk for p in g]
            jobs = [
                ArrayJob(
                    stage,
                    images_command(lake_url, run_id, [stage], tasks, params, self.threads_per_job),
                    chunk,
                )
                for stage in stages
            ]
            if failures := self._run_jobs(context, jobs, run_id):
                raise BatchChildrenFailed(failures)

    def run_chain(
        self, context, lake_url, run_id, prefixes, params, *, shard_images, tables, groups=None
    ):
        """One array job: a child runs its group's whole chain."""
        self.run_prefix_tasks(
            context,
            "chain",
            lambda tasks: chain_command(
                lake_url,
                run_id,
                tasks,
                params,
                threads=self.threads_per_job,
                shard_images=shard_images,
                tables=tables,
            ),
            prefixes,
            run_id,
            groups,
        )

    def run_prefix_tasks(self, context, name, command, prefixes, run_id, groups=None):
        for chunk in self._arrays(groups or [[p] for p in prefixes]):
            tasks = [p for g in chunk for p in g]
            if failures := self._run_jobs(context, [ArrayJob(name, command(tasks), chunk)], run_id):
                raise BatchChildrenFailed(failures)

    def run_job(self, context, name, what, command):
        if failures := self._run_jobs(
            context, [ArrayJob(name, command, [[what]])], context.run.run_id
        ):
            raise BatchChildrenFailed(failures, f"{name} of {what} failed on Batch")

    def run_ingest(self, context, lake_url, pack_id, key):
        run_id = context.run.run_id
        command = ingest_command(lake_url, pack_id, key, run_id)
        failures = self._run_jobs(context, [ArrayJob("ingest", command, [[pack_id]])], run_id)
        if not failures:
            return 0
        if len(failures) == 1 and failures[0].exit_code in VERDICTS:  # the pack's, no failure
            return failures[0].exit_code
        raise BatchChildrenFailed(failures, f"ingest of pack {pack_id} ({key}) failed on Batch")

"""Image compute role: run the ``workloads`` CLIs over a range of prefixes or one pack."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import dagster as dg
from tqdm import tqdm

from workloads.images import ImageParams
from workloads.tasks import PACK_UNREADABLE


class WorkloadFailed(Exception):
    pass


def ingest_command(lake_url: str, pack_id: str, key: str, run_id: str | None = None) -> list[str]:
    return [
        "python",
        "-m",
        "workloads.ingest",
        "--lake",
        lake_url,
        "--pack-id",
        pack_id,
        "--key",
        key,
        *(["--run-id", run_id] if run_id else []),
    ]


def prefix_command(
    module: str, lake_url: str, run_id: str, prefixes: list[str], args: list[str]
) -> list[str]:
    """A prefix workload's command: the Docker image's command and the local pool's call."""
    return [
        "python",
        "-m",
        module,
        "--lake",
        lake_url,
        "--run-id",
        run_id,
        *args,
        "--prefixes",
        ",".join(prefixes),
    ]


def images_command(
    lake_url: str,
    run_id: str,
    stages: list[str],
    prefixes: list[str],
    params: ImageParams,
    threads: int,
) -> list[str]:
    return prefix_command(
        "workloads.images",
        lake_url,
        run_id,
        prefixes,
        ["--stages", ",".join(stages), "--threads", str(threads), *params.cli_args()],
    )


def merge_shards_command(
    lake_url: str, run_id: str, stages: list[str], prefixes: list[str], params: ImageParams
) -> list[str]:
    return prefix_command(
        "workloads.images",
        lake_url,
        run_id,
        prefixes,
        ["--merge", "--stages", ",".join(stages), *params.cli_args()],
    )


def index_command(lake_url: str, run_id: str, prefixes: list[str]) -> list[str]:
    return prefix_command("workloads.index", lake_url, run_id, prefixes, [])


def tables_command(
    lake_url: str, run_id: str, prefixes: list[str], params: ImageParams
) -> list[str]:
    return prefix_command("workloads.tables", lake_url, run_id, prefixes, params.cli_args())


class ImageCompute(dg.ConfigurableResource, ABC):
    """Runs the prefix workloads (index, image stages, tables) and ingest where the profile says:
    local processes or AWS Batch. Each prefix task leaves its result record in the lake; the
    step reads those records, never the data."""

    @abstractmethod
    def run_image_stages(
        self,
        context: dg.AssetExecutionContext,
        lake_url: str,
        run_id: str,
        stages: list[str],
        prefixes: list[str],
        params: ImageParams,
    ) -> None:
        """Run ``stages`` for every prefix; each prefix task leaves its result record in the lake."""

    @abstractmethod
    def run_prefix_tasks(
        self,
        context: dg.AssetExecutionContext,
        name: str,
        command: Callable[[list[str]], list[str]],
        prefixes: list[str],
        run_id: str,
    ) -> None:
        """Run ``command(prefixes of a task)`` over ``prefixes`` (one workload, e.g. the index)."""

    @abstractmethod
    def run_ingest(
        self, context: dg.AssetExecutionContext, lake_url: str, pack_id: str, key: str
    ) -> int:
        """Ingest one pack; returns the workload's exit code: 0 (read) or PACK_UNREADABLE.

        Outcomes are read from the lake (``pack.json``, ``rejects.parquet``), not from here."""


def _shard(items: list[str], n: int) -> list[list[str]]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


class LocalProcessPool(ImageCompute):
    """Runs the workload CLI in local processes: the same command a Batch child runs."""

    max_workers: int = 2
    threads_per_worker: int = 4

    def _env(self) -> dict[str, str]:
        # Large decode buffers: keep glibc from trimming and faulting pages back in (TESTING.md).
        return {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": "67108864",
            "MALLOC_TRIM_THRESHOLD_": "268435456",
            "PYTHONUNBUFFERED": "1",
        }

    def _run_all(self, context, commands: list[list[str]], on_line) -> list[tuple[int, str]]:
        procs = [
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._env()
            )
            for cmd in commands
        ]
        errs: list[list[str]] = [[] for _ in procs]

        def pump(i: int, p: subprocess.Popen) -> None:
            for line in p.stdout:
                on_line(line.strip())

        def drain(i: int, p: subprocess.Popen) -> None:
            for line in p.stderr:
                errs[i].append(line)

        threads = [
            threading.Thread(target=f, args=(i, p), daemon=True)
            for i, p in enumerate(procs)
            for f in (pump, drain)
        ]
        for t in threads:
            t.start()
        try:
            for p in procs:
                p.wait()
        except BaseException:  # run cancelled (DagsterExecutionInterruptedError) or killed
            for p in procs:
                p.kill()
            raise
        for t in threads:
            t.join()
        return [(p.returncode, "".join(errs[i][-30:])) for i, p in enumerate(procs)]

    max_attempts: int = (
        3  # a worker killed by a signal is run again, as Batch retries a reclaimed child
    )

    def _run_sharded(
        self,
        context,
        name: str,
        command: Callable[[list[str]], list[str]],
        prefixes: list[str],
        per_prefix: int,
    ) -> None:
        """``command`` over ``prefixes`` in up to ``max_workers`` processes; progress from the result
        lines they print. A process that dies by a signal (OOM killer, a native abort) is run again
        on its prefixes, up to ``max_attempts``: its finished prefixes are skipped as done, the rest
        redone, so the run converges as a Batch retry does. An exit with an error code fails."""
        if not prefixes:  # nothing to do: no process to start
            return
        done = {"n": 0}
        total = len(prefixes) * per_prefix
        lock = threading.Lock()
        # A terminal gets a bar (disable=None turns it off when stderr is not a TTY).
        bar = tqdm(total=total, desc=name, unit="prefix", disable=None, leave=False)

        def on_line(line: str) -> None:
            try:
                rec = json.loads(line)
            except ValueError:
                context.log.debug(line)
                return
            with lock:
                done["n"] += 1
                n = done["n"]
                bar.update(1)
            # Every 32nd prefix, not every one: each line is an event in the run's log, written
            # by this process while the workers want both cores.
            if n % 32 == 0 or n == total:
                context.log.info(
                    f"[{n}/{total}] {rec.get('stage', name)} {rec.get('prefix')}: "
                    + ", ".join(
                        f"{k} {rec[k]}"
                        for k in ("processed", "skipped", "changed", "seconds")
                        if k in rec
                    )
                )

        shards = _shard(prefixes, self.max_workers)
        context.log.info(
            f"{len(shards)} local worker(s) for {name} over {len(prefixes)} prefix(es)"
        )
        try:
            for attempt in range(1, self.max_attempts + 1):
                outcomes = self._run_all(
                    context, [[sys.executable, *command(shard)[1:]] for shard in shards], on_line
                )
                killed = [
                    (shard, code, err) for shard, (code, err) in zip(shards, outcomes) if code < 0
                ]
                for code, err in outcomes:
                    if code > 0:
                        raise WorkloadFailed(f"{name} exited {code}:\n{err}")
                if not killed:
                    return
                for shard, code, err in killed:
                    context.log.warning(
                        f"{name} worker for prefixes {shard[0]}..{shard[-1]} died by signal {-code} (attempt {attempt} of {self.max_attempts}): {err.strip()[-300:]}"
                    )
                shards = [shard for shard, _, _ in killed]
            shard, code, err = killed[0]
            raise WorkloadFailed(
                f"{name} worker for prefixes {shard[0]}..{shard[-1]} died by signal {-code} {self.max_attempts} times:\n{err}"
            )
        finally:
            bar.close()

    def run_image_stages(self, context, lake_url, run_id, stages, prefixes, params):
        self._run_sharded(
            context,
            "/".join(stages),
            lambda shard: images_command(
                lake_url, run_id, stages, shard, params, self.threads_per_worker
            ),
            prefixes,
            len(stages),
        )

    def run_prefix_tasks(self, context, name, command, prefixes, run_id):
        self._run_sharded(context, name, command, prefixes, 1)

    def run_ingest(self, context, lake_url, pack_id, key):
        cmd = [sys.executable, *ingest_command(lake_url, pack_id, key, context.run.run_id)[1:]]
        [(code, err)] = self._run_all(context, [cmd], context.log.debug)
        if code not in (0, PACK_UNREADABLE):
            raise WorkloadFailed(f"ingest of pack {pack_id} ({key}) exited {code}:\n{err}")
        return code


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


def _batches(items: list, n: int = 100):
    for i in range(0, len(items), n):
        yield items[i : i + n]


class BatchArrayClient(ImageCompute):
    """AWS Batch: one array job per stage per ranged run; child index → prefix.

    Written in the pattern of dagster-aws's Pipes clients (submit, poll, forward
    termination, report metadata); results come back through the lake's result records.
    """

    job_queue: str
    job_definition: str
    region_name: str | None = None
    poll_seconds: float = 10.0
    threads_per_job: int = 4
    max_array_size: int = 10_000

    def _batch(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "batch",
            region_name=self.region_name,
            config=Config(retries={"mode": "adaptive", "max_attempts": 10}),
        )

    def _environment(self) -> list[dict]:
        return [
            {"name": k, "value": v}
            for k, v in sorted(os.environ.items())
            if k.startswith("CVGRAPH_INGEST_")
        ]

    def submit(
        self,
        batch,
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
            "containerOverrides": {"command": command, "environment": self._environment()},
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
        return batch.submit_job(**kw)["jobId"]

    def wait(self, context, batch, jobs: dict[str, tuple[str, list[str]]]) -> dict[str, dict]:
        """Poll ``describe_jobs`` (100 ids a call) until every job is terminal."""
        last: dict[str, str] = {}
        while True:
            descs = {
                d["jobId"]: d
                for ids in _batches(list(jobs))
                for d in batch.describe_jobs(jobs=ids)["jobs"]
            }
            done = set(descs) >= set(jobs)  # just-submitted jobs can be missing from a describe
            for jid, d in descs.items():
                summary = d.get("arrayProperties", {}).get("statusSummary")
                size = d.get("arrayProperties", {}).get("size", 1)
                done &= d["status"] in TERMINAL or (
                    summary is not None
                    and summary.get("SUCCEEDED", 0) + summary.get("FAILED", 0) >= size
                )
                state = f"{d['status']} {summary}" if summary else d["status"]
                if last.get(jid) != state:
                    context.log.info(
                        f"batch job {jid} ({jobs[jid][0]}, {len(jobs[jid][1])} prefixes): {state}"
                    )
                    last[jid] = state
            if done:
                return descs
            time.sleep(self.poll_seconds)

    @staticmethod
    def _name_prefix(run_id: str) -> str:
        return f"cvgraph-{run_id[:8]}-"

    def run_jobs(
        self, context, batch, submissions: list[tuple[str, list[str], list[str]]], run_id: str
    ) -> dict[str, tuple[str, list[str]]]:
        """Submit ``(stage, command, prefixes)`` in order (each N_TO_N on the previous), wait for all.

        If the Dagster run is cancelled meanwhile (DagsterExecutionInterruptedError) every job
        submitted so far is terminated, as dagster-aws's Pipes clients stop their remote work."""
        jobs: dict[str, tuple[str, list[str]]] = {}
        previous = None
        try:
            for stage, command, prefixes in submissions:
                name = re.sub(
                    r"[^A-Za-z0-9_-]",
                    "_",
                    f"{self._name_prefix(run_id)}{stage}-{prefixes[0]}-{prefixes[-1]}",
                )
                previous = self.submit(
                    batch,
                    name,
                    command,
                    len(prefixes),
                    depends_on=previous,
                    tags={"dagster/run_id": run_id},
                )
                jobs[previous] = (stage, prefixes)
                context.log.info(
                    f"submitted {stage} as batch job {previous} ({len(prefixes)} children)"
                )
            descs = self.wait(context, batch, jobs)
        except BaseException:
            # A cancel can land while a submit_job is in flight: find this run's jobs by name too.
            found = set(jobs)
            for page in batch.get_paginator("list_jobs").paginate(
                jobQueue=self.job_queue,
                filters=[{"name": "JOB_NAME", "values": [self._name_prefix(run_id) + "*"]}],
            ):
                found |= {j["jobId"] for j in page["jobSummaryList"] if j["status"] not in TERMINAL}
            for jid in sorted(found):
                batch.terminate_job(jobId=jid, reason="Dagster run cancelled")
            context.log.warning(f"run cancelled: terminated batch jobs {sorted(found)}")
            raise
        if failed := self.failures(batch, jobs, descs):
            lines = [
                f"{f['stage']} prefix {f['prefix']}: {f['reason']} (exit {f['exit_code']}, log stream {f['log_stream']}, job {f['job_id']})"
                for f in failed
            ]
            raise WorkloadFailed(f"{len(failed)} batch children failed:\n" + "\n".join(lines))
        return jobs

    def failures(
        self, batch, jobs: dict[str, tuple[str, list[str]]], descs: dict[str, dict]
    ) -> list[dict]:
        """Each failed child with its prefix, reason and log stream."""
        out = []
        for jid, (stage, prefixes) in jobs.items():
            d = descs[jid]
            if "arrayProperties" in d and d["arrayProperties"].get("size", 0) > 1:
                ids = []
                for page in batch.get_paginator("list_jobs").paginate(
                    arrayJobId=jid, jobStatus="FAILED"
                ):
                    ids += [j["jobId"] for j in page["jobSummaryList"]]
                children = [
                    c for chunk in _batches(ids) for c in batch.describe_jobs(jobs=chunk)["jobs"]
                ]
            else:
                children = [d] if d["status"] == "FAILED" else []
            for c in children:
                index = c.get("arrayProperties", {}).get("index")
                if index is None and ":" in c["jobId"]:  # array children are "<parent id>:<index>"
                    index = int(c["jobId"].rsplit(":", 1)[1])
                container = c.get("container", {})
                out.append(
                    {
                        "stage": stage,
                        "prefix": prefixes[index] if index is not None else ",".join(prefixes),
                        "job_id": c["jobId"],
                        "reason": c.get("statusReason") or container.get("reason") or "unknown",
                        "exit_code": container.get("exitCode"),
                        "log_stream": container.get("logStreamName"),
                    }
                )
        return out

    def _arrays(self, prefixes: list[str]) -> list[list[str]]:
        """Prefixes in chunks of at most ``max_array_size``: one array job each."""
        return [
            prefixes[i : i + self.max_array_size]
            for i in range(0, len(prefixes), self.max_array_size)
        ]

    def run_image_stages(self, context, lake_url, run_id, stages, prefixes, params):
        """One array job per stage (and per chunk of ``max_array_size`` prefixes), each stage
        N_TO_N on the one before: child i of edges starts when child i of resize is done."""
        batch = self._batch()
        for chunk in self._arrays(prefixes):
            submissions = [
                (
                    stage,
                    images_command(lake_url, run_id, [stage], chunk, params, self.threads_per_job),
                    chunk,
                )
                for stage in stages
            ]
            self.run_jobs(context, batch, submissions, run_id)

    def run_prefix_tasks(self, context, name, command, prefixes, run_id):
        batch = self._batch()
        for chunk in self._arrays(prefixes):
            self.run_jobs(context, batch, [(name, command(chunk), chunk)], run_id)

    def run_ingest(self, context, lake_url, pack_id, key):
        try:
            self.run_jobs(
                context,
                self._batch(),
                [("ingest", ingest_command(lake_url, pack_id, key, context.run.run_id), [pack_id])],
                context.run.run_id,
            )
        except WorkloadFailed as e:
            if f"(exit {PACK_UNREADABLE}," in str(e):
                return PACK_UNREADABLE
            raise WorkloadFailed(f"ingest of pack {pack_id} ({key}) failed on Batch: {e}") from None
        return 0

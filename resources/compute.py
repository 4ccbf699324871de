"""Image compute role: run the ``workloads`` CLIs over a range of prefixes or one pack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

import dagster as dg
from pydantic import Field
from tqdm import tqdm

from workloads.image_params import IMAGE_THREADS, ImageParams
from workloads.tasks import VERDICTS


class WorkloadFailed(Exception):
    """A workload exited with an error. On Batch, a ``BatchChildrenFailed`` listing the children."""


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


def chain_command(
    lake_url: str,
    run_id: str,
    prefixes: list[str],
    params: ImageParams,
    *,
    threads: int,
    shard_images: int,
    tables: bool,
) -> list[str]:
    """Index, image stages and tables (unless not ``tables``) of ``prefixes`` in one task
    (``workloads.chain``)."""
    return prefix_command(
        "workloads.chain",
        lake_url,
        run_id,
        prefixes,
        [
            "--threads",
            str(threads),
            "--shard-images",
            str(shard_images),
            *params.cli_args(),
            *([] if tables else ["--no-tables"]),
        ],
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


def shards_command(lake_url: str, subset: str, variant: str, target_mb: float) -> list[str]:
    """The training shards of a subset's variant (``workloads.training.shards``)."""
    return [
        "python",
        "-m",
        "workloads.training.shards",
        "--lake",
        lake_url,
        "--subset",
        subset,
        "--variant",
        variant,
        "--target-mb",
        f"{target_mb:g}",
    ]


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

    def tasks_per_image_task(self, stages: list[str]) -> int:
        """Tasks one prefix (or shard) task of ``stages`` runs as: one, both stages fused."""
        return 1

    @abstractmethod
    def run_image_stages(
        self,
        context: dg.AssetExecutionContext,
        lake_url: str,
        run_id: str,
        stages: list[str],
        prefixes: list[str],
        params: ImageParams,
        groups: list[list[str]] | None = None,
    ) -> None:
        """Run ``stages`` for every prefix; each prefix task leaves its result record in the lake.
        ``groups``: the prefixes cut into the groups a remote task each runs
        (``workloads.costs.task_groups``); None: a prefix a task."""

    @abstractmethod
    def run_chain(
        self,
        context: dg.AssetExecutionContext,
        lake_url: str,
        run_id: str,
        prefixes: list[str],
        params: ImageParams,
        *,
        shard_images: int,
        tables: bool,
        groups: list[list[str]] | None = None,
    ) -> None:
        """Index, image stages and tables (unless not ``tables``) of every prefix in one task
        start (``chain_command``), ``groups`` as ``run_image_stages`` takes them."""

    @abstractmethod
    def run_prefix_tasks(
        self,
        context: dg.AssetExecutionContext,
        name: str,
        command: Callable[[list[str]], list[str]],
        prefixes: list[str],
        run_id: str,
        groups: list[list[str]] | None = None,
    ) -> None:
        """Run ``command(prefixes of a task)`` over ``prefixes`` (one workload, e.g. the index),
        ``groups`` as ``run_image_stages`` takes them."""

    @abstractmethod
    def run_job(
        self, context: dg.AssetExecutionContext, name: str, what: str, command: list[str]
    ) -> None:
        """Run one workload ``command`` (``name`` of ``what``, e.g. shards of a subset) to its
        end; WorkloadFailed if it fails. Its outcome is in the lake, where it wrote it."""

    def stop_run(self, run_id: str, why: str) -> list[str]:
        """Stop the remote work of run ``run_id`` whose process is gone; returns what was
        stopped. Local tasks are the dead process's children and went with its process group."""
        return []

    @abstractmethod
    def run_ingest(
        self, context: dg.AssetExecutionContext, lake_url: str, pack_id: str, key: str
    ) -> int:
        """Ingest one pack; returns the workload's exit code: 0 (read) or a verdict on the pack
        (``VERDICTS``: not a readable zip, or other bytes under an ingested pack's key).

        Outcomes are read from the lake (``pack.json``, ``rejects.parquet``), not from here."""


def _shard(items: list[str], n: int) -> list[list[str]]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


# A worker's glibc malloc: large decode buffers are mapped above 64 MiB and freed memory is kept
# up to 256 MiB, so pages are not trimmed and faulted back in for every image.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}


class Progress:
    """Progress of a local run from the result lines its workers print: a bar on a terminal and,
    for each stage, a line in the run's log every 32nd prefix and at its last (each line is an
    event, written by this process while the workers want both cores)."""

    def __init__(self, context, name: str, prefixes: int, per_prefix: int = 1):
        self.context, self.name, self.prefixes = context, name, prefixes
        self.done: dict[str, int] = {}  # result lines per stage
        self._lock = threading.Lock()
        # disable=None: no bar when stderr is not a TTY
        self._bar = tqdm(
            total=prefixes * per_prefix, desc=name, unit="prefix", disable=None, leave=False
        )

    def __call__(self, line: str) -> None:
        try:
            rec = json.loads(line)
        except ValueError:
            self.context.log.debug(line)
            return
        stage = rec.get("stage", self.name)
        with self._lock:
            n = self.done[stage] = self.done.get(stage, 0) + 1
            self._bar.update(1)
        if n % 32 == 0 or n == self.prefixes:
            self.context.log.info(
                f"[{n}/{self.prefixes}] {stage} {rec.get('prefix')}: "
                + ", ".join(
                    f"{k} {rec[k]}"
                    for k in ("processed", "skipped", "changed", "seconds")
                    if k in rec
                )
            )

    def close(self) -> None:
        self._bar.close()


class LocalProcessPool(ImageCompute):
    """Runs the workload CLI in local processes: the same command a Batch child runs."""

    max_workers: int = Field(2, description="worker processes at once")
    threads_per_worker: int = Field(
        IMAGE_THREADS, description="threads a worker overlaps its images' I/O with"
    )

    def _env(self) -> dict[str, str]:
        # Large decode buffers: keep glibc from trimming and faulting pages back in.
        return {**os.environ, **WORKER_MALLOC, "PYTHONUNBUFFERED": "1"}

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
        except BaseException:
            # Any exit, not only a cancel: these are this process's children, and a worker left
            # behind would go on using the cores with nothing to wait for it.
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
        progress = Progress(context, name, len(prefixes), per_prefix)
        shards = _shard(prefixes, self.max_workers)
        context.log.info(
            f"{len(shards)} local worker(s) for {name} over {len(prefixes)} prefix(es)"
        )
        try:
            for attempt in range(1, self.max_attempts + 1):
                outcomes = self._run_all(
                    context, [[sys.executable, *command(shard)[1:]] for shard in shards], progress
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
            progress.close()

    # the local pool shares the prefixes among its workers: the groups are Batch's
    def run_image_stages(self, context, lake_url, run_id, stages, prefixes, params, groups=None):
        self._run_sharded(
            context,
            "/".join(stages),
            lambda shard: images_command(
                lake_url, run_id, stages, shard, params, self.threads_per_worker
            ),
            prefixes,
            len(stages),
        )

    def run_chain(
        self, context, lake_url, run_id, prefixes, params, *, shard_images, tables, groups=None
    ):
        self._run_sharded(
            context,
            "chain",
            lambda shard: chain_command(
                lake_url,
                run_id,
                shard,
                params,
                threads=self.threads_per_worker,
                shard_images=shard_images,
                tables=tables,
            ),
            prefixes,
            4,  # index, resize, edges, tables: a line each
        )

    def run_prefix_tasks(self, context, name, command, prefixes, run_id, groups=None):
        self._run_sharded(context, name, command, prefixes, 1)

    def run_job(self, context, name, what, command):
        """One process, run again if a signal kills it (as Batch retries a reclaimed job)."""
        cmd = [sys.executable, *command[1:]]
        for attempt in range(1, self.max_attempts + 1):
            [(code, err)] = self._run_all(context, [cmd], context.log.info)
            if code == 0:
                return
            if code > 0 or attempt == self.max_attempts:
                raise WorkloadFailed(f"{name} of {what} exited {code}:\n{err}")
            context.log.warning(f"{name} of {what} died by signal {-code}; running it again")

    def run_ingest(self, context, lake_url, pack_id, key):
        cmd = [sys.executable, *ingest_command(lake_url, pack_id, key, context.run.run_id)[1:]]
        [(code, err)] = self._run_all(context, [cmd], context.log.debug)
        if code not in (0, *VERDICTS):
            raise WorkloadFailed(f"ingest of pack {pack_id} ({key}) exited {code}:\n{err}")
        return code

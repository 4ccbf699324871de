"""Whether a run's process still exists, and ending the runs whose process is gone.

A run the CLI or SDK executes in its own process (``orchestration.runs.materialize``) carries who
runs it: ``cvgraph/runner`` = ``<host>:<pid>:<process start>``. A killed command (SIGKILL, OOM, a
closed laptop) leaves its run ``STARTED`` for good, and Dagster counts its partitions as in
progress; the next command that looks finds the process gone and ends the run
(``report_run_failed``), saying so on one line. The start time (``/proc/<pid>/stat``'s field 22,
clock ticks since boot) tells a reused pid from the process that ran the run.

Runs the daemon launches on this machine (``LocalRunLauncher``) are checked the same way through
Dagster's own run monitoring, from the pid of the run worker's ``RUN_START`` event.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from workloads.versions import HASH_PREFIXES

RUNNER_TAG = "cvgraph/runner"
UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
# the job ``dg.materialize`` and ``orchestration.runs.materialize`` build: a run of it executes in
# the process that created it, so a run older than the runner tag is checked by its events' pid
IN_PROCESS_JOB = "__ephemeral_asset_job__"
# the tags a single-run range of partitions is launched with (one definition for runs and sensors)
RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


def start_ticks(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (the process's start, in clock ticks since boot); None
    where there is no such process. Where there is no /proc, ``"?"`` if the pid exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    # the command name (field 2) is in parentheses and may hold spaces
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie is a finished process its parent has not reaped
        return None
    return fields[19]


@dataclass(frozen=True)
class Runner:
    """The process that executes a run: host, pid and that process's start."""

    host: str
    pid: int
    started: str

    @classmethod
    def this_process(cls) -> Runner:
        return cls(socket.gethostname(), os.getpid(), start_ticks(os.getpid()) or "?")

    def to_tag(self) -> str:
        return f"{self.host}:{self.pid}:{self.started}"

    @classmethod
    def from_tag(cls, tag: str) -> Runner | None:
        host, _, rest = tag.rpartition(":")
        host, _, pid = host.rpartition(":")
        if not host or not pid.isdigit():
            return None
        return cls(host, int(pid), rest)

    def alive(self) -> bool | None:
        """True or False on this host; None for a process on another host (nothing here can tell)."""
        if self.host != socket.gethostname():
            return None
        now = start_ticks(self.pid)
        return now is not None and (now == self.started or "?" in (now, self.started))


def worker_pid(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The pid of the process that started executing ``run`` (its RUN_START event), if it did."""
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START):
        if entry.dagster_event is not None and entry.dagster_event.pid is not None:
            return entry.dagster_event.pid
    return None


def run_alive(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool | None:
    """Whether the process executing ``run`` (unfinished) still exists: None when nothing on this
    host can tell (another host's process, a run the daemon queued or launched elsewhere)."""
    tag = run.tags.get(RUNNER_TAG)
    runner = Runner.from_tag(tag) if tag else None
    if runner is not None:
        return runner.alive()
    if run.job_name == IN_PROCESS_JOB:  # executed in-process before runs carried the tag
        pid = worker_pid(instance, run)
        return None if pid is None else start_ticks(pid) is not None
    return None


def unfinished_runs(
    instance: dg.DagsterInstance, tags: dict[str, str] | None = None
) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED, tags=tags or {})))


def end_dead_runs(
    instance: dg.DagsterInstance,
    on_line: Callable[[str], None] | None = None,
    stop_remote: Callable[[str, str], list[str]] | None = None,
) -> list[str]:
    """Mark failed every unfinished run whose process is gone (``report_run_failed``), each said
    on one line to ``on_line``, after ``stop_remote(run id, why)`` stopped its remote work (its
    Batch jobs); returns their ids. Runs nothing here can judge are left as they are."""
    ended = []
    for run in unfinished_runs(instance):
        if run_alive(instance, run) is not False:
            continue
        runner = run.tags.get(RUNNER_TAG) or f"pid {worker_pid(instance, run)}"
        message = (
            f"run {run.run_id[:8]} ({_what(run)}) was left {run.status.value} by a process that is "
            f"gone ({runner}): marked failed"
        )
        stopped = (
            stop_remote(run.run_id, "its Dagster run's process is gone") if stop_remote else []
        )
        if stopped:
            message += f", its remote work stopped ({', '.join(stopped)})"
        instance.report_run_failed(run, message=message)
        ended.append(run.run_id)
        if on_line:
            on_line(message)
    return ended


def _what(run: dg.DagsterRun) -> str:
    start, end = (run.tags.get(t) for t in RANGE_TAGS)
    if start:
        return f"prefixes {start}-{end}"
    if "dagster/partition" in run.tags:
        return f"partition {run.tags['dagster/partition']}"
    return run.job_name


def held(inst: dg.DagsterInstance) -> dict[str, set[str]]:
    """``{step: partitions}`` that unfinished runs whose process is alive (or cannot be judged
    from here) are executing: what a sync leaves to them."""
    out: dict[str, set[str]] = {}
    for run in unfinished_runs(inst):
        if run_alive(inst, run) is False:
            continue
        start, end = (run.tags.get(t) for t in RANGE_TAGS)
        if start and end and start in HASH_PREFIXES and end in HASH_PREFIXES:
            keys = HASH_PREFIXES[HASH_PREFIXES.index(start) : HASH_PREFIXES.index(end) + 1]
        elif "dagster/partition" in run.tags:
            keys = [run.tags["dagster/partition"]]
        else:
            continue
        for step in steps(inst, run):
            out.setdefault(step, set()).update(keys)
    return out


def held_prefixes(taken: dict[str, set[str]], prefix_steps) -> set[str]:
    """The prefixes ``held`` says live runs execute any of ``prefix_steps`` for."""
    return set().union(*(taken.get(s, set()) for s in prefix_steps))


def steps(inst: dg.DagsterInstance, run: dg.DagsterRun):
    """The steps ``run``'s plan executes (a run of a selection job records no asset selection)."""
    plan = run.execution_plan_snapshot_id
    snapshot = inst.get_execution_plan_snapshot(plan) if plan else None
    return (snapshot.step_keys_to_execute or ()) if snapshot else ()

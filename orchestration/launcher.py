"""The local instance's run launcher: Dagster's own, telling its run monitoring whether a run's
worker process still exists.

``DefaultRunLauncher`` starts each run worker as a process on this machine and cannot say whether
it is alive, so a run whose worker was killed (``dagster dev`` or its daemon killed with SIGKILL,
an OOM) stays ``STARTED`` and its partitions count as in progress for good. With
``run_monitoring`` on (``orchestration.instance``), the daemon asks this launcher about every
started run; a run whose process is gone is marked failed, and what it owed is owed again
(``assets.owed``). Runs the CLI executes in its own process are judged the same way
(``orchestration.liveness``).
"""

from __future__ import annotations

import dagster as dg

from orchestration.liveness import RUNNER_TAG, run_alive, start_ticks, worker_pid
from resources.dagster_internals import CheckRunHealthResult, WorkerStatus


class LocalRunLauncher(dg.DefaultRunLauncher):
    """``DefaultRunLauncher`` whose runs Dagster's run monitoring can check."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        alive = run_alive(self._instance, run)
        if alive is None and RUNNER_TAG not in run.tags:
            # a run this launcher started: its worker is a process on this machine
            pid = worker_pid(self._instance, run)
            alive = None if pid is None else start_ticks(pid) is not None
        if alive is False:
            return CheckRunHealthResult(WorkerStatus.FAILED, "the run worker's process is gone")
        return CheckRunHealthResult(WorkerStatus.RUNNING)

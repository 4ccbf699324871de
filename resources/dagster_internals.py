"""Every name cvgraph takes from Dagster beyond its public API (``import dagster as dg``), in one
place, each with why. ``tests/resources/test_dagster_internals.py`` pins what the project relies
on of each, so a Dagster upgrade that changes one fails there, loudly, naming it; no other
module imports ``dagster._*`` (``tests/test_imports.py``).

- The local instance's event log (``orchestration.event_log``) is Dagster's SQLite event log
  with engines kept open and batched writes: it subclasses ``SqliteEventLogStorage`` and its
  watchdog, and writes the rows Dagster's own storage writes.
- The run launcher (``orchestration.launcher``) answers run monitoring's health check with the
  result types of the ``RunLauncher`` interface, exported only from ``dagster._core.launcher``.
- ``selected_asset_keys``: what a run selects, also for runs ``materialize`` and
  ``execute_in_process`` make (their run's ``asset_selection`` is empty; the job's asset layer
  holds it: ``JobDefinition.asset_layer`` is not underscored, but neither exported nor documented).
"""

from __future__ import annotations

import dagster as dg
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, BATCH_WRITABLE_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS

__all__ = [
    "ASSET_CHECK_EVENTS",
    "ASSET_EVENTS",
    "BATCH_WRITABLE_EVENTS",
    "INDEX_SHARD_NAME",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "CheckRunHealthResult",
    "DagsterInvariantViolationError",
    "EventLogEntry",
    "SqlEventLogStorageTable",
    "SqliteEventLogStorage",
    "SqliteEventLogStorageWatchdog",
    "WorkerStatus",
    "selected_asset_keys",
]


def selected_asset_keys(context: dg.AssetExecutionContext) -> set[dg.AssetKey]:
    """The assets the step's run selects: the run's selection, else (a run ``materialize`` or
    ``execute_in_process`` made) its job's."""
    return set(context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys)

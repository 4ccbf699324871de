"""The Dagster instance cvgraph's processes share: its directory, its dagster.yaml, and the
Dagster settings every process that runs cvgraph's steps needs (``make`` exports them too)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from orchestration.settings import env, home

# Automation tracks all 256 prefixes per partition (its default cap is 100), and a ranged step's
# materialisations are written to the event log as one batch (orchestration.event_log).
DAGSTER_ENV = {
    "DAGSTER_MAX_PARTITIONS_FOR_DA_TIMESTAMP_FETCH": "256",
    "DAGSTER_EVENT_BATCH_SIZE": "1024",
}

# What earlier versions wrote: such a file is ours to replace.
_OLD_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def instance_yaml() -> str:
    """dagster.yaml for the local instance: SQLite storage whose event log stays open
    (orchestration.event_log), under $DAGSTER_HOME/history/runs like Dagster's default."""
    return (
        f"{_OLD_INSTANCE_YAML}event_log_storage:\n"
        "  module: orchestration.event_log\n"
        "  class: LocalEventLogStorage\n"
    )


def dagster_home() -> Path:
    """The instance directory (DAGSTER_HOME, default CVGRAPH_HOME/dagster), created with a
    dagster.yaml. A dagster.yaml someone wrote is left as it is."""
    d = Path(env("DAGSTER_HOME", str(home() / "dagster"))).resolve()
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "dagster.yaml"
    if not cfg.exists() or cfg.read_text() == _OLD_INSTANCE_YAML:
        cfg.write_text(instance_yaml())
    return d


def instance() -> dg.DagsterInstance:
    """The instance ``make ui`` shows, with DAGSTER_ENV set (a value already set wins)."""
    os.environ["DAGSTER_HOME"] = str(dagster_home())
    for name, value in DAGSTER_ENV.items():
        os.environ.setdefault(name, value)
    return dg.DagsterInstance.get()

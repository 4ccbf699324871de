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

# Files this module wrote, which it rewrites when the settings change; a dagster.yaml someone
# else wrote is left as it is. The first two are what earlier versions wrote, without the mark.
MARK = "# Written by cvgraph (orchestration/instance.py) from the environment; edit it and it is yours.\n"
_TELEMETRY = "telemetry:\n  enabled: false\n"
_SQLITE = "event_log_storage:\n  module: orchestration.event_log\n  class: LocalEventLogStorage\n"
_OLD_INSTANCE_YAML = (_TELEMETRY, _TELEMETRY + _SQLITE)
PG_VARS = ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB")


def storage_yaml() -> str:
    """Runs, event log and schedules: on PostgreSQL (dagster-postgres, through
    ``orchestration.postgres_storage``) when CVGRAPH_DAGSTER_PG_URL or Dagster's DAGSTER_PG_*
    variables are set, else SQLite under $DAGSTER_HOME/history whose event log stays open
    (orchestration.event_log). The file names the variables, never their values, so no password
    is written to disk."""
    if os.environ.get("CVGRAPH_DAGSTER_PG_URL"):
        config = "    postgres_url:\n      env: CVGRAPH_DAGSTER_PG_URL\n"
    elif all(os.environ.get(v) for v in PG_VARS):
        fields = dict(zip(("username", "password", "hostname", "db_name"), PG_VARS))
        if os.environ.get("DAGSTER_PG_PORT"):
            fields["port"] = "DAGSTER_PG_PORT"
        config = "    postgres_db:\n" + "".join(
            f"      {k}:\n        env: {v}\n" for k, v in fields.items()
        )
    else:
        return _SQLITE
    return "".join(
        f"{key}:\n  module: orchestration.postgres_storage\n  class: {cls}\n  config:\n{config}"
        for key, cls in (
            ("run_storage", "PostgresRunStorage"),
            ("event_log_storage", "PostgresEventLogStorage"),
            ("schedule_storage", "PostgresScheduleStorage"),
        )
    )


# Runs whose worker process is gone are found and failed by the daemon (``make ui``): Dagster's run
# monitoring, asking the launcher (orchestration.launcher) whether each started run's process
# exists. A run that never starts within the timeout fails too. No resume: a run's steps are
# re-run by what the lake is then owed (assets.owed), not by restarting the dead worker.
_MONITORING = (
    "run_launcher:\n  module: orchestration.launcher\n  class: LocalRunLauncher\n"
    "run_monitoring:\n  enabled: true\n  start_timeout_seconds: 180\n"
    "  cancel_timeout_seconds: 180\n  max_resume_run_attempts: 0\n  poll_interval_seconds: 5\n"
)


def instance_yaml() -> str:
    """dagster.yaml for cvgraph's instance: its storage (``storage_yaml``), the run launcher and
    run monitoring that fail a run whose process is gone, no telemetry."""
    return MARK + _TELEMETRY + _MONITORING + storage_yaml()


def dagster_home() -> Path:
    """The instance directory (DAGSTER_HOME, default CVGRAPH_HOME/dagster), with a dagster.yaml
    for the settings as they are now. A dagster.yaml someone wrote is left as it is."""
    d = Path(env("DAGSTER_HOME", str(home() / "dagster"))).resolve()
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "dagster.yaml"
    text = cfg.read_text() if cfg.exists() else None
    if (
        text is None
        or text in _OLD_INSTANCE_YAML
        or (text.startswith(MARK) and text != instance_yaml())
    ):
        cfg.write_text(instance_yaml())
    return d


def instance() -> dg.DagsterInstance:
    """The instance ``make ui`` shows, with DAGSTER_ENV set (a value already set wins)."""
    os.environ["DAGSTER_HOME"] = str(dagster_home())
    for name, value in DAGSTER_ENV.items():
        os.environ.setdefault(name, value)
    return dg.DagsterInstance.get()

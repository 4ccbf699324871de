"""The instance's storage by setting: SQLite by default, PostgreSQL (dagster-postgres) when
CVGRAPH_DAGSTER_PG_URL or Dagster's DAGSTER_PG_* are set, against a real server (tests/conftest)."""

from urllib.parse import urlparse

import dagster as dg
import psycopg2
import pytest

from orchestration.instance import MARK, dagster_home, instance

abc = dg.StaticPartitionsDefinition(["a", "b", "c"])


@dg.asset(partitions_def=abc, backfill_policy=dg.BackfillPolicy.single_run())
def lettered(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(data_version=dg.DataVersion("v-" + "".join(context.partition_keys)))


RANGE = {"dagster/asset_partition_range_start": "a", "dagster/asset_partition_range_end": "c"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in ("CVGRAPH_DAGSTER_PG_URL", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return tmp_path / "dagster"


def _tables(url: str) -> set[str]:
    u = urlparse(url)
    with (
        psycopg2.connect(host=u.hostname, port=u.port, user=u.username, dbname=u.path[1:]) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in cur.fetchall()}


def test_a_postgres_url_puts_runs_events_and_schedules_on_the_server(
    home, postgres_url, monkeypatch
):
    monkeypatch.setenv("CVGRAPH_DAGSTER_PG_URL", postgres_url)
    inst = instance()
    assert type(inst.run_storage).__name__ == "PostgresRunStorage"
    assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(inst.schedule_storage).__name__ == "PostgresScheduleStorage"
    text = (home / "dagster.yaml").read_text()
    assert text.startswith(MARK) and "env: CVGRAPH_DAGSTER_PG_URL" in text
    assert postgres_url not in text  # the variable's name, never its value
    result = dg.materialize([lettered], instance=inst, tags=RANGE)
    assert result.success
    # what the run wrote is on the server: a second instance (another process's view) reads it
    other = dg.DagsterInstance.from_config(str(home))
    assert [r.run_id for r in other.get_runs()] == [result.run_id]
    assert other.get_materialized_partitions(lettered.key) == {"a", "b", "c"}
    assert {"runs", "event_logs", "jobs", "instigators"} <= _tables(postgres_url)
    assert not (home / "history").exists()  # nothing went to SQLite


def test_dagsters_postgres_variables_and_a_password_kept_off_disk(
    home, postgres_database, monkeypatch
):
    url = urlparse(postgres_database("t_pg_variables"))
    for var, value in {
        "DAGSTER_PG_USERNAME": url.username,
        "DAGSTER_PG_PASSWORD": "not-on-disk",  # trust auth: any password is let in
        "DAGSTER_PG_HOST": url.hostname,
        "DAGSTER_PG_DB": url.path[1:],
        "DAGSTER_PG_PORT": str(url.port),
    }.items():
        monkeypatch.setenv(var, value)
    inst = instance()
    assert type(inst.run_storage).__name__ == "PostgresRunStorage"
    assert dg.materialize([lettered], instance=inst, tags=RANGE).success
    text = (home / "dagster.yaml").read_text()
    assert "not-on-disk" not in text and "env: DAGSTER_PG_PASSWORD" in text


def test_postgres_unset_again_the_instance_is_sqlite_and_a_users_yaml_is_kept(
    home, postgres_url, monkeypatch
):
    monkeypatch.setenv("CVGRAPH_DAGSTER_PG_URL", postgres_url)
    dagster_home()
    monkeypatch.delenv("CVGRAPH_DAGSTER_PG_URL")
    text = (dagster_home() / "dagster.yaml").read_text()
    assert "LocalEventLogStorage" in text and "postgres" not in text  # ours: rewritten
    mine = "telemetry:\n  enabled: true\n"
    (home / "dagster.yaml").write_text(mine)
    monkeypatch.setenv("CVGRAPH_DAGSTER_PG_URL", postgres_url)
    assert (dagster_home() / "dagster.yaml").read_text() == mine

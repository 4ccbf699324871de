"""The local instance's event log: what profiles.dagster_home() configures, and that Dagster's
own SQLite storage reads what it writes (the webserver and daemon share the files)."""

import threading

import dagster as dg
import pytest
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from orchestration import event_log, profiles

letters = dg.StaticPartitionsDefinition(["a", "b", "c"])


@dg.asset(partitions_def=letters, backfill_policy=dg.BackfillPolicy.single_run())
def lettered(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    for key in context.partition_keys:
        context.add_asset_metadata({"letter": key}, partition_key=key)
    return dg.MaterializeResult(data_version=dg.DataVersion("v-" + "".join(context.partition_keys)))


@pytest.fixture
def instance_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return profiles.dagster_home()


def test_dagster_home_configures_the_local_event_log(instance_dir):
    text = (instance_dir / "dagster.yaml").read_text()
    assert "class: LocalEventLogStorage" in text and "enabled: false" in text
    with dg.DagsterInstance.from_config(str(instance_dir)) as inst:
        assert type(inst.event_log_storage) is event_log.LocalEventLogStorage
        assert inst.event_log_storage._base_dir == str(instance_dir / "history" / "runs")  # Dagster's default place


def test_an_earlier_default_yaml_is_upgraded_and_a_users_yaml_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "old"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert "LocalEventLogStorage" in (profiles.dagster_home() / "dagster.yaml").read_text()

    mine = "telemetry:\n  enabled: true\n"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "mine"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "dagster.yaml").write_text(mine)
    assert (profiles.dagster_home() / "dagster.yaml").read_text() == mine


def test_runs_read_back_through_dagsters_own_sqlite_storage(instance_dir):
    with dg.DagsterInstance.from_config(str(instance_dir)) as inst:
        first = dg.materialize([lettered], instance=inst, tags={"dagster/asset_partition_range_start": "a", "dagster/asset_partition_range_end": "c"})
        second = dg.materialize([lettered], instance=inst, partition_key="b")
        assert first.success and second.success
        ours = inst.fetch_materializations(lettered.key, limit=10).records
        first_logs = len(inst.all_logs(first.run_id))

    stock = SqliteEventLogStorage(str(instance_dir / "history" / "runs"))
    theirs = stock.fetch_materializations(lettered.key, limit=10).records
    assert [(r.run_id, r.partition_key, r.asset_materialization.metadata) for r in theirs] == [
        (r.run_id, r.partition_key, r.asset_materialization.metadata) for r in ours
    ]
    newest, *ranged = theirs
    assert (newest.run_id, newest.partition_key) == (second.run_id, "b")
    assert sorted(r.partition_key for r in ranged) == ["a", "b", "c"] and {r.run_id for r in ranged} == {first.run_id}
    assert all(r.asset_materialization.metadata["letter"].value == r.partition_key for r in theirs)
    assert newest.asset_materialization.tags["dagster/data_version"] == "v-b"
    assert {r.asset_materialization.tags["dagster/data_version"] for r in ranged} == {"v-abc"}
    # every planned partition of both runs is recorded per partition (in-progress / failed status)
    planned = stock.get_latest_asset_partition_materialization_attempts_without_materializations(lettered.key)
    assert planned == {}
    assert stock.get_materialized_partitions(lettered.key) == {"a", "b", "c"}
    assert len(stock.get_logs_for_run(first.run_id)) == first_logs


def test_old_run_shards_are_closed(tmp_path):
    storage = event_log.LocalEventLogStorage(str(tmp_path))
    with dg.instance_for_test() as inst:
        runs = [dg.materialize([lettered], instance=inst, partition_key="a").run_id for _ in range(event_log.OPEN_RUN_SHARDS + 3)]
        logs = {run_id: inst.all_logs(run_id) for run_id in runs}
    for run_id in runs:
        for entry in logs[run_id]:
            storage.store_event(entry)
    assert len(storage._engines) <= event_log.OPEN_RUN_SHARDS + 1 and "index" in storage._engines
    for run_id in runs:  # closed shards reopen on demand
        assert [e.message for e in storage.get_logs_for_run(run_id)] == [e.message for e in logs[run_id]]
    assert set(storage.get_materialized_partitions(lettered.key)) == {"a"}
    assert len(storage.fetch_materializations(lettered.key, limit=100).records) == len(runs)


def test_a_live_watcher_sees_every_event_while_the_writer_keeps_its_connections(tmp_path):
    """The UI follows a run through watch(); commits that only touch the WAL must reach it."""
    with dg.instance_for_test() as inst:
        run_id = dg.materialize([lettered], instance=inst, partition_key="a").run_id
        entries = inst.all_logs(run_id)
    writer, reader = event_log.LocalEventLogStorage(str(tmp_path)), event_log.LocalEventLogStorage(str(tmp_path))
    writer.store_event(entries[0])  # the run's database exists before anyone watches it
    seen, all_seen = [], threading.Event()

    def callback(entry, _cursor):
        seen.append(entry.message)
        if len(seen) == len(entries):
            all_seen.set()

    reader.watch(run_id, None, callback)
    try:
        for entry in entries[1:]:
            writer.store_event(entry)
        assert all_seen.wait(20), f"the watcher saw {len(seen)} of {len(entries)} events"
        assert seen == [e.message for e in entries]
    finally:
        reader.end_watch(run_id, callback)
        reader.dispose()
        writer.dispose()


def test_wipe_leaves_no_engine_on_deleted_files(tmp_path):
    with dg.instance_for_test() as inst:
        run_id = dg.materialize([lettered], instance=inst, partition_key="b").run_id
        entries = inst.all_logs(run_id)
    storage = event_log.LocalEventLogStorage(str(tmp_path))
    for entry in entries:
        storage.store_event(entry)
    storage.wipe()
    assert storage.get_logs_for_run(run_id) == [] and not storage.get_materialized_partitions(lettered.key)
    for entry in entries:
        storage.store_event(entry)
    assert len(storage.get_logs_for_run(run_id)) == len(entries)
    assert event_log.LocalEventLogStorage(str(tmp_path)).get_materialized_partitions(lettered.key) == {"b"}

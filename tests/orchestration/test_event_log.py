"""The local instance's event log: what dagster_home() configures, and that Dagster's
own SQLite storage reads what it writes (the webserver and daemon share the files)."""

import itertools
import sqlite3
import threading

import dagster as dg
import pytest

from orchestration import event_log
from orchestration.instance import DAGSTER_ENV, dagster_home
from resources.dagster_internals import BATCH_WRITABLE_EVENTS, SqliteEventLogStorage

letters = dg.StaticPartitionsDefinition(["a", "b", "c"])


@dg.asset(partitions_def=letters, backfill_policy=dg.BackfillPolicy.single_run())
def lettered(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    for key in context.partition_keys:
        context.add_asset_metadata({"letter": key}, partition_key=key)
    return dg.MaterializeResult(data_version=dg.DataVersion("v-" + "".join(context.partition_keys)))


@dg.asset(
    partitions_def=letters,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[lettered],
    check_specs=[dg.AssetCheckSpec("whole", asset="checked")],
)
def checked(context: dg.AssetExecutionContext):
    yield dg.MaterializeResult(metadata={"n": len(context.partition_keys)})
    yield dg.AssetCheckResult(check_name="whole", passed=True)


@dg.asset(partitions_def=letters, backfill_policy=dg.BackfillPolicy.single_run(), deps=[checked])
def broken(context: dg.AssetExecutionContext) -> None:
    raise RuntimeError("broken on purpose")


RANGE = {"dagster/asset_partition_range_start": "a", "dagster/asset_partition_range_end": "c"}


@pytest.fixture
def instance_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return dagster_home()


def test_dagster_home_configures_the_local_event_log(instance_dir):
    text = (instance_dir / "dagster.yaml").read_text()
    assert "class: LocalEventLogStorage" in text and "enabled: false" in text
    with dg.DagsterInstance.from_config(str(instance_dir)) as inst:
        assert type(inst.event_log_storage) is event_log.LocalEventLogStorage
        assert inst.event_log_storage._base_dir == str(
            instance_dir / "history" / "runs"
        )  # Dagster's default place


def test_an_earlier_default_yaml_is_upgraded_and_a_users_yaml_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "old"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert "LocalEventLogStorage" in (dagster_home() / "dagster.yaml").read_text()

    mine = "telemetry:\n  enabled: true\n"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "mine"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "dagster.yaml").write_text(mine)
    assert (dagster_home() / "dagster.yaml").read_text() == mine


def test_runs_read_back_through_dagsters_own_sqlite_storage(instance_dir):
    with dg.DagsterInstance.from_config(str(instance_dir)) as inst:
        first = dg.materialize(
            [lettered],
            instance=inst,
            tags={
                "dagster/asset_partition_range_start": "a",
                "dagster/asset_partition_range_end": "c",
            },
        )
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
    assert sorted(r.partition_key for r in ranged) == ["a", "b", "c"] and {
        r.run_id for r in ranged
    } == {first.run_id}
    assert all(r.asset_materialization.metadata["letter"].value == r.partition_key for r in theirs)
    assert newest.asset_materialization.tags["dagster/data_version"] == "v-b"
    assert {r.asset_materialization.tags["dagster/data_version"] for r in ranged} == {"v-abc"}
    # every planned partition of both runs is recorded per partition (in-progress / failed status)
    planned = stock.get_latest_asset_partition_materialization_attempts_without_materializations(
        lettered.key
    )
    assert planned == {}
    assert stock.get_materialized_partitions(lettered.key) == {"a", "b", "c"}
    assert len(stock.get_logs_for_run(first.run_id)) == first_logs


def test_old_run_shards_are_closed(tmp_path):
    storage = event_log.LocalEventLogStorage(str(tmp_path))
    with dg.instance_for_test() as inst:
        runs = [
            dg.materialize([lettered], instance=inst, partition_key="a").run_id
            for _ in range(event_log.OPEN_RUN_SHARDS + 3)
        ]
        logs = {run_id: inst.all_logs(run_id) for run_id in runs}
    for run_id in runs:
        for entry in logs[run_id]:
            storage.store_event(entry)
    assert len(storage._engines) <= event_log.OPEN_RUN_SHARDS + 1 and "index" in storage._engines
    for run_id in runs:  # closed shards reopen on demand
        assert [e.message for e in storage.get_logs_for_run(run_id)] == [
            e.message for e in logs[run_id]
        ]
    assert set(storage.get_materialized_partitions(lettered.key)) == {"a"}
    assert len(storage.fetch_materializations(lettered.key, limit=100).records) == len(runs)


def test_a_live_watcher_sees_every_event_while_the_writer_keeps_its_connections(tmp_path):
    """The UI follows a run through watch(); commits that only touch the WAL must reach it."""
    with dg.instance_for_test() as inst:
        run_id = dg.materialize([lettered], instance=inst, partition_key="a").run_id
        entries = inst.all_logs(run_id)
    writer, reader = (
        event_log.LocalEventLogStorage(str(tmp_path)),
        event_log.LocalEventLogStorage(str(tmp_path)),
    )
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
    assert storage.get_logs_for_run(run_id) == [] and not storage.get_materialized_partitions(
        lettered.key
    )
    for entry in entries:
        storage.store_event(entry)
    assert len(storage.get_logs_for_run(run_id)) == len(entries)
    assert event_log.LocalEventLogStorage(str(tmp_path)).get_materialized_partitions(
        lettered.key
    ) == {"b"}


# Set by the database to its clock when a row is written (second resolution): two writes of the
# same events a moment apart differ there and nowhere else.
WRITE_CLOCKS = ("create_timestamp", "update_timestamp")


def _tables(base) -> dict[str, list[tuple]]:
    """Every row of every table of every SQLite database under ``base`` (but the schema's
    migration bookkeeping, which records when each database was created, and the write clocks)."""
    out = {}
    for path in sorted(base.glob("*.db")):
        with sqlite3.connect(path) as conn:
            for (table,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT IN ('secondary_indexes', 'alembic_version') ORDER BY name"
            ):
                info = conn.execute(f"PRAGMA table_info({table})")
                cols = ", ".join(
                    f'"{r[1]}"' for r in info if r[1] not in WRITE_CLOCKS
                )  # `limit` is one
                out[f"{path.name}:{table}"] = conn.execute(
                    f"SELECT {cols} FROM {table} ORDER BY rowid"
                ).fetchall()
    return out


def test_a_batch_writes_exactly_the_rows_its_events_one_by_one_write(tmp_path):
    with dg.instance_for_test() as inst:
        result = dg.materialize(
            [lettered, checked, broken], instance=inst, tags=RANGE, raise_on_error=False
        )
        entries = inst.all_logs(result.run_id)
    assert not result.success
    one, batched = (
        event_log.LocalEventLogStorage(str(tmp_path / "one")),
        event_log.LocalEventLogStorage(str(tmp_path / "batched")),
    )
    batches = 0
    for writable, grouped in itertools.groupby(
        entries, key=lambda e: e.is_dagster_event and e.dagster_event_type in BATCH_WRITABLE_EVENTS
    ):
        group = list(grouped)
        for entry in group:
            one.store_event(entry)
        if (
            writable and len(group) > 1
        ):  # mixed kinds and assets: planned materialisations and checks, then each step's outputs
            batched.store_event_batch(group)
            batches += 1
        else:
            for entry in group:
                batched.store_event(entry)
    one.dispose()
    batched.dispose()
    assert batches >= 3
    rows_one, rows_batched = _tables(tmp_path / "one"), _tables(tmp_path / "batched")
    assert set(rows_one) == set(rows_batched) and len(rows_one["index.db:asset_keys"]) == 3
    for table, rows in rows_one.items():
        assert rows_batched[table] == rows, table

    # one batch holding every kind: an asset's planned, materialised and failed events together
    writable = [
        e for e in entries if e.is_dagster_event and e.dagster_event_type in BATCH_WRITABLE_EVENTS
    ]
    one, batched = (
        event_log.LocalEventLogStorage(str(tmp_path / "one_all")),
        event_log.LocalEventLogStorage(str(tmp_path / "batched_all")),
    )
    for entry in writable:
        one.store_event(entry)
    batched.store_event_batch(writable)
    one.dispose()
    batched.dispose()
    assert _tables(tmp_path / "one_all") == _tables(tmp_path / "batched_all")


def test_a_ranged_run_writes_its_events_in_batches_that_dagster_reads(instance_dir, monkeypatch):
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", DAGSTER_ENV["DAGSTER_EVENT_BATCH_SIZE"])
    sizes = []
    store_batch = event_log.LocalEventLogStorage.store_event_batch
    monkeypatch.setattr(
        event_log.LocalEventLogStorage,
        "store_event_batch",
        lambda self, events: sizes.append(len(events)) or store_batch(self, events),
    )
    with dg.DagsterInstance.from_config(str(instance_dir)) as inst:
        ok = dg.materialize([lettered, checked], instance=inst, tags=RANGE)
        failed = dg.materialize(
            [lettered, checked, broken],
            instance=inst,
            tags=RANGE,
            selection=[broken],
            raise_on_error=False,
        )
    assert ok.success and not failed.success
    assert sizes[:3] == [
        3 + 3 + 1,
        3,
        3,
    ]  # planned (two assets, one check), then each step's three partitions

    stock = SqliteEventLogStorage(str(instance_dir / "history" / "runs"))
    assert (
        stock.get_materialized_partitions(lettered.key)
        == {"a", "b", "c"}
        == stock.get_materialized_partitions(checked.key)
    )
    assert {
        r.partition_key: r.asset_materialization.metadata["letter"].value
        for r in stock.fetch_materializations(lettered.key, limit=10).records
    } == {"a": "a", "b": "b", "c": "c"}
    record = next(iter(stock.get_asset_records([checked.key])))
    assert (
        record.asset_entry.last_run_id == ok.run_id
        and record.asset_entry.last_materialization_record.partition_key in {"a", "b", "c"}
    )
    # the failed run's planned partitions stay without a materialisation: Dagster shows them failed
    attempts = stock.get_latest_asset_partition_materialization_attempts_without_materializations(
        broken.key
    )
    assert {p: run_id for p, (run_id, _) in attempts.items()} == {p: failed.run_id for p in "abc"}
    assert len(stock.get_logs_for_run(ok.run_id)) == len(
        dg.DagsterInstance.from_config(str(instance_dir)).all_logs(ok.run_id)
    )

"""What cvgraph relies on of Dagster's internals (``resources.dagster_internals``): an upgrade
that changes any of it fails here, naming it, before the storage or a step misbehaves."""

import inspect

import dagster as dg

from resources import dagster_internals as internals


def test_the_sqlite_event_log_has_what_the_local_storage_overrides_and_calls():
    """``orchestration.event_log.LocalEventLogStorage`` overrides these methods of Dagster's SQLite
    event log and calls the others; its watchdog subclass overrides two of the watchdog's."""
    storage = internals.SqliteEventLogStorage
    for name in (
        "_connect",
        "_initdb",
        "_event_to_row",
        "_store_asset_event_tags",
        "_store_asset_event",
        "_has_asset_key_col_on_connection",
        "conn_string_for_shard",
        "run_connection",
        "index_transaction",
        "store_asset_check_event",
        "store_event_batch",
        "has_table",
        "watch",
        "wipe",
        "upgrade",
        "dispose",
        "from_config_value",
    ):
        assert callable(getattr(storage, name, None)), f"SqliteEventLogStorage.{name} is gone"
    # its constructor's (base_dir, inst_data), and the state the local storage reads
    assert list(inspect.signature(storage.__init__).parameters)[:3] == [
        "self",
        "base_dir",
        "inst_data",
    ]
    # called positionally: (conn, events, their ids) and (conn, event, its id)
    assert len(inspect.signature(storage._store_asset_event_tags).parameters) == 4
    assert list(inspect.signature(storage._store_asset_event).parameters)[1:] == [
        "conn",
        "event",
        "event_id",
    ]
    init = inspect.getsource(storage.__init__)
    for attribute in ("_initialized_dbs", "_obs", "_watchers", "_base_dir"):
        assert f"self.{attribute}" in init, f"SqliteEventLogStorage no longer sets {attribute}"
    watchdog = internals.SqliteEventLogStorageWatchdog
    assert callable(getattr(watchdog, "_process_log", None)) and "on_modified" in vars(watchdog)
    assert "self._log_path" in inspect.getsource(watchdog.__init__)
    assert internals.INDEX_SHARD_NAME == "index"
    assert (
        "event" in internals.SqlEventLogStorageTable.c
        and "run_id" in internals.SqlEventLogStorageTable.c
    )


def test_batched_events_are_the_kinds_the_local_storage_writes_as_a_batch():
    kinds = internals.BATCH_WRITABLE_EVENTS
    assert dg.DagsterEventType.ASSET_MATERIALIZATION in kinds
    assert kinds <= {e for e in dg.DagsterEventType}
    assert dg.DagsterEventType.ASSET_MATERIALIZATION in internals.ASSET_EVENTS
    assert dg.DagsterEventType.ASSET_CHECK_EVALUATION in internals.ASSET_CHECK_EVENTS


def test_the_run_launchers_health_result_carries_a_status_and_a_message():
    failed = internals.CheckRunHealthResult(internals.WorkerStatus.FAILED, "gone")
    assert (failed.status, failed.msg) == (internals.WorkerStatus.FAILED, "gone")
    assert internals.CheckRunHealthResult(internals.WorkerStatus.RUNNING).status.name == "RUNNING"


def test_a_materialize_run_tells_its_steps_what_it_selects():
    """``materialize`` (and ``execute_in_process``) runs have no ``asset_selection``; the job's
    asset layer has it: what ``assets.images.chained`` decides a chain by."""
    seen = {}

    @dg.asset
    def a(context: dg.AssetExecutionContext) -> None:
        seen["a"] = internals.selected_asset_keys(context)

    @dg.asset(deps=[a])
    def b(context: dg.AssetExecutionContext) -> None:
        seen["b"] = internals.selected_asset_keys(context)

    @dg.asset(deps=[b])
    def c() -> None:
        pass

    assert dg.materialize([a, b, c], selection=[a, b]).success
    assert seen == {"a": {a.key, b.key}, "b": {a.key, b.key}}
    assert dg.materialize([a, b, c], selection=[a]).success
    assert seen["a"] == {a.key}

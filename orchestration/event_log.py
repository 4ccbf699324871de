"""The local instance's event log: Dagster's SQLite event log, kept open between writes.

Dagster's ``SqliteEventLogStorage`` builds a new engine and connection for every write
(and every schema probe), and closing the last connection of a WAL database checkpoints
it. A 256-prefix ranged run writes ~2,000 events (a planned and a materialised event per
asset partition), and at ~12 ms each that was most of the run. This storage keeps one
engine per shard (the index, and the newest runs), commits with ``synchronous=NORMAL``
(WAL: durable across a killed process, may lose the last commits on power loss) and
remembers schema probes, which change only with ``dagster instance migrate``. Same files,
same schema: the webserver and daemon read it as they read the default.

With connections kept open a commit touches only ``<run>.db-wal``, not ``<run>.db``, so
live log watchers (the UI's run view) watch both files.

With ``DAGSTER_EVENT_BATCH_SIZE`` set (``orchestration.instance.DAGSTER_ENV``) Dagster hands a
ranged step's materialisations and a run's planned events over as batches; this storage writes
a batch as one insert per database and one asset-row update per asset, where Dagster's SQLite
storage writes each event alone (four to five statements and two serialisations each).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as db
from dagster import Field, StringSource
from sqlalchemy.pool import QueuePool

from resources.dagster_internals import (
    ASSET_CHECK_EVENTS,
    ASSET_EVENTS,
    BATCH_WRITABLE_EVENTS,
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    DagsterInvariantViolationError,
    EventLogEntry,
    SqlEventLogStorageTable,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)

OPEN_RUN_SHARDS = 8  # the newest runs' databases stay open (the index always does)


def _pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def default_base_dir() -> str:
    """Where Dagster's default SQLite storage keeps the event log: $DAGSTER_HOME/history/runs."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise ValueError("LocalEventLogStorage without base_dir needs DAGSTER_HOME")
    return os.path.join(home, "history", "runs")


class _RunWatchdog(SqliteEventLogStorageWatchdog):
    """Dagster's watcher for one run, fired by its WAL as well as its database file."""

    @property
    def patterns(self) -> list[str]:
        return [self._log_path, self._log_path + "-wal"]

    def on_modified(self, event) -> None:
        self._process_log()


class LocalEventLogStorage(SqliteEventLogStorage):
    """``SqliteEventLogStorage`` with pooled per-shard engines and cached schema probes."""

    def __init__(self, base_dir: str | None = None, inst_data=None):
        self._engines: OrderedDict[str, db.Engine] = OrderedDict()
        self._tables: set[str] = set()
        self._asset_key_cols: set[str] | None = None
        super().__init__(base_dir or default_base_dir(), inst_data)
        self._db_lock = threading.RLock()

    @classmethod
    def config_type(cls):
        return {
            "base_dir": Field(
                StringSource, is_required=False, description="default: $DAGSTER_HOME/history/runs"
            )
        }

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> LocalEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> db.Engine:
        engine = self._engines.pop(shard, None)
        if engine is None:
            # check_same_thread off: every use is serialised by self._db_lock.
            engine = db.create_engine(
                self.conn_string_for_shard(shard),
                poolclass=QueuePool,
                pool_size=1,
                max_overflow=2,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
            db.event.listen(engine, "connect", _pragmas)
            if shard not in self._initialized_dbs:
                try:
                    self._initdb(engine)
                except BaseException:
                    engine.dispose()
                    raise
                self._initialized_dbs.add(shard)
        self._engines[shard] = engine
        runs = [s for s in self._engines if s != INDEX_SHARD_NAME]
        for oldest in runs[: max(0, len(runs) - OPEN_RUN_SHARDS)]:
            self._engines.pop(oldest).dispose()
        return engine

    def _close_all(self) -> None:
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    @contextmanager
    def _connect(self, shard: str) -> Iterator[db.Connection]:
        with self._db_lock:
            with self._engine(shard).connect() as conn, conn.begin():
                yield conn

    def store_event_batch(self, events: list[EventLogEntry]) -> None:
        """The rows ``store_event`` writes for each event, in one transaction per database. The
        asset row gets, per asset, the last event of each kind in batch order: the state
        event-by-event updates end in, since each kind overwrites the same columns each time."""
        kinds = {e.get_dagster_event().event_type for e in events}
        if not kinds <= BATCH_WRITABLE_EVENTS or len({e.run_id for e in events}) != 1:
            raise DagsterInvariantViolationError(
                f"batch writes take one run's {sorted(k.value for k in BATCH_WRITABLE_EVENTS)} events"
            )
        rows = [self._event_to_row(e) for e in events]
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(SqlEventLogStorageTable.insert(), rows)
        indexed = [
            (e, r)
            for e, r in zip(events, rows)
            if e.dagster_event_type in ASSET_EVENTS | ASSET_CHECK_EVENTS
        ]
        if not indexed:
            return
        with self.index_transaction() as conn:
            insert = SqlEventLogStorageTable.insert().returning(
                SqlEventLogStorageTable.c.id, sort_by_parameter_order=True
            )
            ids = [row[0] for row in conn.execute(insert, [r for _, r in indexed])]
            assets = [
                (e, i) for (e, _), i in zip(indexed, ids) if e.dagster_event_type in ASSET_EVENTS
            ]
            checks = [
                (e, i)
                for (e, _), i in zip(indexed, ids)
                if e.dagster_event_type in ASSET_CHECK_EVENTS
            ]
            self._store_asset_event_tags(conn, [e for e, _ in assets], [i for _, i in assets])
            last = {(e.dagster_event.asset_key, e.dagster_event_type): (e, i) for e, i in assets}
            for e, i in sorted(last.values(), key=lambda item: item[1]):
                self._store_asset_event(conn, e, i)
        for e, i in checks:
            self.store_asset_check_event(e, i)

    def has_table(self, table_name: str) -> bool:
        if table_name not in self._tables:
            with self._db_lock, self._engine(INDEX_SHARD_NAME).connect() as conn:
                if conn.dialect.has_table(conn, table_name):
                    self._tables.add(table_name)
        return table_name in self._tables

    def _has_asset_key_col_on_connection(self, conn: db.Connection, column_name: str) -> bool:
        if self._asset_key_cols is None or column_name not in self._asset_key_cols:
            self._asset_key_cols = {c["name"] for c in db.inspect(conn).get_columns("asset_keys")}
        return column_name in self._asset_key_cols

    def watch(self, run_id: str, cursor: str | None, callback) -> None:
        if not self._obs:
            from watchdog.observers import Observer

            self._obs = Observer()
            self._obs.start()
        watchdog = _RunWatchdog(self, run_id, callback, cursor)
        self._watchers[run_id][callback] = (
            watchdog,
            self._obs.schedule(watchdog, self._base_dir, recursive=True),
        )

    def wipe(self) -> None:
        self._close_all()  # the files are deleted: no engine may keep writing to them
        super().wipe()

    def upgrade(self) -> None:
        super().upgrade()
        self._close_all()
        self._tables, self._asset_key_cols = set(), None

    def dispose(self) -> None:
        self._close_all()
        super().dispose()

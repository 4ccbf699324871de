"""The local instance's event log: Dagster's SQLite event log, kept open between writes.

Dagster's ``SqliteEventLogStorage`` builds a new engine and connection for every write
(and every schema probe), and closing the last connection of a WAL database checkpoints
it. A 256-prefix ranged run writes ~2,000 events (a planned and a materialised event per
asset partition), and at ~12 ms each that was most of the run. This storage keeps one
engine per shard (index + the few newest runs), commits with ``synchronous=NORMAL``
(WAL: durable across a killed process, may lose the last commits on power loss) and
remembers schema probes, which change only with ``dagster instance migrate``. Same
files, same schema: the webserver and daemon read it as they read the default.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as db
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME, SqliteEventLogStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from sqlalchemy.pool import QueuePool

OPEN_SHARDS = 8  # index + the newest runs; older run shards are closed


def _pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class LocalEventLogStorage(SqliteEventLogStorage):
    """``SqliteEventLogStorage`` with pooled per-shard engines and cached schema probes."""

    def __init__(self, base_dir: str, inst_data=None):
        self._engines: OrderedDict[str, db.Engine] = OrderedDict()
        self._tables: set[str] = set()
        self._asset_key_cols: set[str] | None = None
        super().__init__(base_dir, inst_data)
        self._db_lock = threading.RLock()

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> LocalEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> db.Engine:
        engine = self._engines.pop(shard, None)
        if engine is None:
            # check_same_thread off: every use is serialised by self._db_lock.
            engine = db.create_engine(self.conn_string_for_shard(shard), poolclass=QueuePool, pool_size=1, max_overflow=2,
                                      connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False})
            db.event.listen(engine, "connect", _pragmas)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
        self._engines[shard] = engine
        while len(self._engines) > OPEN_SHARDS:
            _, oldest = self._engines.popitem(last=False)
            oldest.dispose()
        return engine

    @contextmanager
    def _connect(self, shard: str) -> Iterator[db.Connection]:
        with self._db_lock:
            with self._engine(shard).connect() as conn, conn.begin():
                yield conn

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

    def dispose(self) -> None:
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()
        super().dispose()

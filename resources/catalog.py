"""SQL role: the ``images`` and ``objects`` tables, queried read-only."""

from __future__ import annotations

from abc import ABC, abstractmethod

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from resources.storage import LakeResource
from workloads.tables import TABLES


class QueryRefused(ValueError):
    """The SQL is not a single read-only SELECT."""


def ensure_select(sql: str) -> str:
    """Return ``sql`` stripped if it is exactly one SELECT statement; refuse anything else."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryRefused(f"SQL does not parse: {e}") from None
    if len(statements) != 1:
        raise QueryRefused(f"expected exactly one SELECT statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"only read-only SELECT queries are allowed, got {kind.name}")
    return sql.strip().rstrip(";")


class Catalog(dg.ConfigurableResource, ABC):
    @abstractmethod
    def query(self, sql: str) -> pa.Table:
        """Run one read-only SELECT over ``images`` / ``objects``."""


class DuckDBCatalog(Catalog):
    """DuckDB over the lake's Parquet, registered as pyarrow datasets (filters push down)."""

    lake: LakeResource

    def _dataset(self, name: str):
        lake = self.lake.lake()
        fs, base = lake.arrow_filesystem()
        root = f"{base}/tables/{name}"
        part = pads.partitioning(pa.schema([("prefix", pa.string())]), flavor="hive")
        try:
            files = [o.key for o in lake.list(f"tables/{name}/") if o.key.endswith(".parquet")]
        except FileNotFoundError:
            files = []
        if not files:
            return pa.Table.from_pylist([], schema=TABLES[name].append(pa.field("prefix", pa.string())))
        return pads.dataset([f"{base}/{k}" for k in files], filesystem=fs, format="parquet", partitioning=part, partition_base_dir=root, schema=TABLES[name].append(pa.field("prefix", pa.string())))

    def query(self, sql: str) -> pa.Table:
        sql = ensure_select(sql)
        con = duckdb.connect()
        try:
            for name in TABLES:
                con.register(name, self._dataset(name))
            return con.sql(sql).to_arrow_table()
        finally:
            con.close()

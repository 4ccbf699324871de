"""SQL role: the ``images``, ``objects`` and ``predictions`` tables, queried read-only."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import Field

from resources.aws import AwsResource, PollTimedOut, poll, stopped_on_interrupt
from resources.storage import LakeResource
from workloads.layout import PREDICTIONS, part_pattern, predictions_pattern, table_root
from workloads.predictions import PREDICTIONS_SCHEMA
from workloads.table_rows import ADDED_COLUMNS, TABLES
from workloads.tables import table_keys


class QueryError(ValueError):
    """The query did not give rows; the message is one line that says why."""


class QueryRefused(QueryError):
    """The SQL is not a single read-only SELECT, or the engine's sandbox refused what it reads."""


class QueryFailed(QueryError):
    """The engine could not run the SELECT: a typo, an unknown table or column, a bad cast."""


def _one_line(e: Exception) -> str:
    """DuckDB's message up to its caret block (``LINE 1: ...``), on one line."""
    head = []
    for line in str(e).splitlines():
        if line.startswith("LINE "):
            break
        head.append(line.strip())
    return " ".join(filter(None, head)) or type(e).__name__


def engine_error(e: Exception) -> QueryError:
    """What a DuckDB error says to the user: its sandbox refused, or the query failed."""
    said = _one_line(e)
    if isinstance(e, duckdb.PermissionException):
        return QueryRefused(f"refused by the sandbox: {said}")
    return QueryFailed(f"query failed: {said}")


def ensure_select(sql: str) -> str:
    """Return ``sql`` stripped if it is exactly one SELECT statement; refuse anything else."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryRefused(f"SQL does not parse: {_one_line(e)}") from None
    if len(statements) != 1:
        raise QueryRefused(f"expected exactly one SELECT statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"only read-only SELECT queries are allowed, got {kind.name}")
    return sql.strip().rstrip(";")


def normalised_sql(sql: str) -> str:
    """``sql`` as a re-freeze compares it: case and runs of spaces outside string literals do
    not count (identifiers and keywords are case-insensitive; a literal's case is its value)."""
    parts = re.split(r"('(?:[^']|'')*')", ensure_select(sql))
    return "".join(p if i % 2 else " ".join(p.lower().split()) for i, p in enumerate(parts))


class Catalog(dg.ConfigurableResource, ABC):
    @abstractmethod
    def query(self, sql: str) -> pa.Table:
        """Run one read-only SELECT over ``images`` / ``objects`` / ``predictions``."""

    def register_tables(self) -> None:
        """Make the tables known to the engine (a no-op where the lake is read directly)."""


class DuckDBCatalog(Catalog):
    """DuckDB over the lake's Parquet: read in place by DuckDB's own reader for a local lake,
    through pyarrow datasets (filters push down) for an object store."""

    lake: LakeResource

    def _dataset(self, lake, name: str, files: list[str]):
        import pyarrow.dataset as pads  # here: it imports pandas, which a command without a query need not

        fs, base = lake.arrow_filesystem()
        schema = TABLES[name].append(pa.field("prefix", pa.string()))
        if not files:
            return pa.Table.from_pylist([], schema=schema)
        part = pads.partitioning(pa.schema([("prefix", pa.string())]), flavor="hive")
        return pads.dataset(
            [f"{base}/{k}" for k in files],
            filesystem=fs,
            format="parquet",
            partitioning=part,
            partition_base_dir=f"{base}/{table_root(name)}".rstrip("/"),
            schema=schema,
        )

    def _predictions_dataset(self, lake, parts: list[str]):
        import pyarrow.dataset as pads

        if not parts:
            return PREDICTIONS_SCHEMA.empty_table()
        fs, base = lake.arrow_filesystem()
        return pads.dataset(
            [f"{base}/{k}" for k in parts],
            filesystem=fs,
            format="parquet",
            schema=PREDICTIONS_SCHEMA,
        )

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A connection that sees ``images``, ``objects`` and ``predictions`` and nothing else: no read_csv('/etc/passwd'),
        glob(), URLs or COPY, even in a SELECT. A local lake's tables directory is the one place
        it may read."""
        lake = self.lake.lake()
        fs, base = lake.arrow_filesystem()
        files = table_keys(
            lake
        )  # the parts each prefix's state names: a half-written part is never read
        local = isinstance(fs, pafs.LocalFileSystem)
        con = duckdb.connect()
        try:
            if local:
                con.execute("SET allowed_directories = [$dir]", {"dir": f"{base}/tables/"})
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            for name in TABLES:
                if not (local and files[name] and _parquet_view(con, name, base, files[name])):
                    _with_defaults(con, name, self._dataset(lake, name, files[name]))
            parts = prediction_parts(lake)  # one listing: a part is whole or not there
            if local and parts:
                _predictions_view(con, base, parts)
            else:
                con.register(PREDICTIONS, self._predictions_dataset(lake, parts))
        except BaseException:
            con.close()
            raise
        return con

    def query(self, sql: str) -> pa.Table:
        sql = ensure_select(sql)
        con = self._connect()
        try:
            return con.sql(sql).to_arrow_table()
        except duckdb.InternalException:
            raise  # DuckDB's own bug: its traceback is what a report needs
        except duckdb.Error as e:
            raise engine_error(e) from None
        finally:
            con.close()


def _column(name: str, column: str, present: bool = True) -> str:
    """``column`` of table ``name`` as its view selects it: a column added since some parts were
    written (``ADDED_COLUMNS``) reads as its default there, not as null."""
    default = ADDED_COLUMNS.get(name, {})
    if column not in default:
        return f'"{column}"'
    value = str(default[column]).lower()  # the defaults are booleans
    return f'coalesce("{column}", {value}) AS "{column}"' if present else f'{value} AS "{column}"'


def _with_defaults(con: duckdb.DuckDBPyConnection, name: str, data) -> None:
    """``name`` over an Arrow table or dataset of the table's columns (plus ``prefix``): registered
    as it is, or, for a table with ``ADDED_COLUMNS``, as ``_<name>_parts`` under a view that reads
    them as their defaults where null."""
    if name not in ADDED_COLUMNS:
        con.register(name, data)
        return
    con.register(f"_{name}_parts", data)
    cols = ", ".join(_column(name, c) for c in [*TABLES[name].names, "prefix"])
    con.execute(f"CREATE VIEW {name} AS SELECT {cols} FROM _{name}_parts")


def _parquet_view(con: duckdb.DuckDBPyConnection, name: str, base: str, keys: list[str]) -> bool:
    """``name`` as a view over the table's files, read by DuckDB itself: exactly the table's
    columns, and ``prefix`` from each file's ``prefix=<pp>`` folder (hive partitioning would also
    turn any ``k=v`` folder above the lake into a column). A column added since some files were
    written reads as its default there (``ADDED_COLUMNS``). False when the files are not all
    laid out as ``tables/<name>/prefix=<pp>/<file>`` or another column is in none of them
    (written before it existed): the pyarrow dataset copes with both."""
    layout = re.compile(part_pattern(name))
    if not all(layout.fullmatch(k) for k in keys):
        return False
    files = "[" + ", ".join("'" + f"{base}/{k}".replace("'", "''") + "'" for k in keys) + "]"
    present = {
        row[0]
        for row in con.execute(f"SELECT DISTINCT name FROM parquet_schema({files})").fetchall()
    }
    if not set(TABLES[name].names) - set(ADDED_COLUMNS.get(name, {})) <= present:
        return False
    cols = ", ".join(_column(name, c, c in present) for c in TABLES[name].names)
    at = len(f"{base}/{table_root(name)}prefix=") + 1  # SQL strings count from 1
    con.execute(
        f"CREATE VIEW {name} AS SELECT {cols}, substr(filename, {at}, 2) AS prefix "
        f"FROM read_parquet({files}, union_by_name = true, filename = true, hive_partitioning = false)"
    )
    return True


def prediction_parts(lake) -> list[str]:
    """The parts of the ``predictions`` table (one per scored pack): one listing."""
    layout = re.compile(predictions_pattern())
    return [k for k in lake.keys(table_root(PREDICTIONS)) if layout.fullmatch(k)]


def _predictions_view(con: duckdb.DuckDBPyConnection, base: str, keys: list[str]) -> None:
    """``predictions`` as a view over its parts, read by DuckDB itself: exactly its columns."""
    files = "[" + ", ".join("'" + f"{base}/{k}".replace("'", "''") + "'" for k in keys) + "]"
    cols = ", ".join(f'"{c}"' for c in PREDICTIONS_SCHEMA.names)
    con.execute(
        f"CREATE VIEW {PREDICTIONS} AS SELECT {cols} "
        f"FROM read_parquet({files}, union_by_name = true, hive_partitioning = false)"
    )


ATHENA_TYPES = {
    pa.string(): "string",
    pa.int32(): "int",
    pa.int64(): "bigint",
    pa.float64(): "double",
    pa.bool_(): "boolean",
    pa.list_(pa.string()): "array<string>",
}


def glue_table_input(name: str, lake_uri: str) -> dict:
    """Glue table over ``tables/<name>/prefix=<pp>/``, with partition projection on ``prefix``
    (Athena computes the 256 partitions itself: no partition management at all)."""
    from workloads.versions import HASH_PREFIXES

    location = f"{lake_uri.rstrip('/')}/{table_root(name)}"
    return {
        "Name": name,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {
            "classification": "parquet",
            "projection.enabled": "true",
            "projection.prefix.type": "enum",
            "projection.prefix.values": ",".join(HASH_PREFIXES),
            "storage.location.template": location + "prefix=${prefix}/",
        },
        "PartitionKeys": [{"Name": "prefix", "Type": "string"}],
        "StorageDescriptor": {
            "Columns": [{"Name": f.name, "Type": ATHENA_TYPES[f.type]} for f in TABLES[name]],
            "Location": location,
            "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
            "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
            "SerdeInfo": {
                "SerializationLibrary": "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
            },
        },
    }


def glue_predictions_input(lake_uri: str) -> dict:
    """Glue table over ``tables/predictions/``: one Parquet object per scored pack, no partitions
    (a pack is a column; a re-score replaces its pack's object)."""
    location = f"{lake_uri.rstrip('/')}/{table_root(PREDICTIONS)}"
    return {
        "Name": PREDICTIONS,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {"classification": "parquet"},
        "StorageDescriptor": {
            "Columns": [{"Name": f.name, "Type": ATHENA_TYPES[f.type]} for f in PREDICTIONS_SCHEMA],
            "Location": location,
            "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
            "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
            "SerdeInfo": {
                "SerializationLibrary": "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
            },
        },
    }


def _athena_value(value: str | None, athena_type: str):
    if value is None:
        return None
    if athena_type in ("integer", "int", "bigint", "smallint", "tinyint"):
        return int(value)
    if athena_type in ("double", "float", "real", "decimal"):
        return float(value)
    if athena_type == "boolean":
        return value == "true"
    if athena_type == "array":  # Athena renders array<varchar> as "[a, b]"
        inner = value[1:-1]
        return [v.strip() for v in inner.split(",")] if inner else []
    return value


class AthenaCatalog(Catalog, AwsResource):
    """Athena over Glue tables (partition projection on ``prefix``), through a workgroup."""

    lake: LakeResource
    database: str
    workgroup: str = Field("primary", description="the Athena workgroup")
    output_location: str | None = Field(
        None, description="Athena's result location; None: the workgroup's enforced one"
    )
    poll_seconds: float = Field(1.0, description="how often a query is polled")
    timeout_seconds: float = Field(
        1800.0, description="a query queued or running this long is stopped; 0: none"
    )

    def register_tables(self) -> None:
        """Create the Glue database and tables, or update them to the current schema."""
        glue = self._client("glue")
        try:
            glue.create_database(DatabaseInput={"Name": self.database})
        except glue.exceptions.AlreadyExistsException:
            pass
        url = self.lake.lake().url
        for table in [*(glue_table_input(n, url) for n in TABLES), glue_predictions_input(url)]:
            try:
                glue.create_table(DatabaseName=self.database, TableInput=table)
            except glue.exceptions.AlreadyExistsException:
                glue.update_table(DatabaseName=self.database, TableInput=table)

    def _execute(self, sql: str) -> str:
        """Start the query and wait for it to end; its execution id. A cancelled run stops it."""
        athena = self._client("athena")
        kw = {
            "QueryString": sql,
            "QueryExecutionContext": {"Database": self.database},
            "WorkGroup": self.workgroup,
        }
        if self.output_location:
            kw["ResultConfiguration"] = {"OutputLocation": self.output_location}
        qid = athena.start_query_execution(**kw)["QueryExecutionId"]
        stop = lambda: athena.stop_query_execution(QueryExecutionId=qid)
        with stopped_on_interrupt(stop):
            try:
                state = poll(
                    lambda: athena.get_query_execution(QueryExecutionId=qid)["QueryExecution"][
                        "Status"
                    ],
                    lambda s: s["State"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
                    self.poll_seconds,
                    timeout=self.timeout_seconds or None,
                )
            except PollTimedOut as e:
                stop()
                raise QueryFailed(
                    f"Athena query {qid} still {e.state['State']} after {self.timeout_seconds:g} s "
                    "(CVGRAPH_ATHENA_TIMEOUT_SECONDS): stopped"
                ) from None
        if state["State"] != "SUCCEEDED":
            reason = " ".join(state.get("StateChangeReason", "").split()) or "no reason given"
            raise QueryFailed(f"Athena query {qid} {state['State']}: {reason}")
        return qid

    def query(self, sql: str) -> pa.Table:
        sql = ensure_select(sql)
        athena = self._client("athena")
        qid = self._execute(sql)
        columns, rows = None, []
        for page in athena.get_paginator("get_query_results").paginate(QueryExecutionId=qid):
            meta = page["ResultSet"]["ResultSetMetadata"]["ColumnInfo"]
            data = page["ResultSet"]["Rows"]
            if columns is None:
                columns = [(c["Name"], c["Type"]) for c in meta]
                data = (
                    data[1:]
                    if data
                    and [d.get("VarCharValue") for d in data[0]["Data"]] == [n for n, _ in columns]
                    else data
                )
            for r in data:
                rows.append(
                    {
                        n: _athena_value(d.get("VarCharValue"), t)
                        for (n, t), d in zip(columns, r["Data"])
                    }
                )
        columns = columns or []
        return (
            pa.Table.from_pylist(
                rows, schema=pa.schema([(n, _ARROW.get(t, pa.string())) for n, t in columns])
            )
            if columns
            else pa.table({})
        )


_ARROW = (
    {t: pa.int64() for t in ("integer", "int", "bigint", "smallint", "tinyint")}
    | {t: pa.float64() for t in ("double", "float", "real", "decimal")}
    | {"boolean": pa.bool_(), "array": pa.list_(pa.string())}
)

from pathlib import Path

import pytest

from resources.catalog import DuckDBCatalog, QueryError, QueryFailed, QueryRefused, ensure_select
from resources.storage import LakeResource
from workloads.image_params import ImageParams
from workloads.table_rows import TABLES
from workloads.tables import write_prefix_tables

# Hostile statements and what stops each: the read-only gate (one SELECT), DuckDB's sandbox (no
# file, glob, URL or secret access from inside a SELECT), or the engine (no such table).
HOSTILE = {
    "SELECT 1; SELECT 2": "expected exactly one SELECT statement, got 2",
    "SELECT 1; DROP TABLE images": "expected exactly one SELECT statement, got 2",
    "SELECT 1 /* x */; COPY images TO '/tmp/x.csv'": "expected exactly one SELECT statement, got 2",
    "": "expected exactly one SELECT statement, got 0",
    "DELETE FROM images": "got DELETE",
    "DROP TABLE images": "got DROP",
    "CREATE TABLE x AS SELECT * FROM images": "got CREATE",
    "COPY images TO '/tmp/x.csv'": "got COPY",
    "EXPORT DATABASE '/tmp/x'": "got EXPORT",
    "ATTACH '/tmp/x.db' AS x": "got ATTACH",
    "DETACH x": "got DETACH",
    "INSTALL httpfs": "got LOAD",
    "LOAD httpfs": "got LOAD",
    "SET enable_external_access = true": "got SET",
    "PRAGMA enable_profiling": "got PRAGMA",
    "CALL pragma_version()": "got CALL",
    "-- SELECT\nDELETE FROM images": "got DELETE",
    "/* SELECT */ DROP TABLE images": "got DROP",
    "WITH x AS (SELECT 1) DELETE FROM images": "got DELETE",
    "not sql at all": "SQL does not parse: Parser Error: syntax error",
    "SELECT * FROM read_csv('/etc/passwd')": 'refused by the sandbox: Permission Error: Cannot access file "/etc/passwd"',
    "SELECT * FROM read_text('/etc/hostname')": "refused by the sandbox",
    "SELECT * FROM read_json('/etc/passwd')": "refused by the sandbox",
    "SELECT * FROM sniff_csv('/etc/passwd')": "refused by the sandbox",
    "SELECT * FROM glob('/etc/*')": 'Cannot access file "/etc/*"',
    "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')": "refused by the sandbox",
    "SELECT * FROM read_parquet('s3://b/x.parquet')": "refused by the sandbox",
    "SELECT * FROM duckdb_secrets()": "refused by the sandbox",
    "SELECT 1 AS a UNION ALL SELECT * FROM read_csv('/etc/passwd')": "refused by the sandbox",
    "SELECT * FROM '/etc/passwd'": "query failed: Catalog Error: Table with name /etc/passwd does not exist",
    "SELECT getenv('HOME') AS h": "query failed: Catalog Error: Scalar Function with name getenv does not exist",
}
MISTAKES = {
    "SELECT labelx FROM images": 'query failed: Binder Error: Referenced column "labelx" not found',
    "SELECT * FROM nosuch": "query failed: Catalog Error: Table with name nosuch does not exist",
    "SELECT CAST('x' AS INTEGER)": "query failed: Conversion Error: Could not convert string 'x'",
}


@pytest.mark.parametrize("sql, said", [*HOSTILE.items(), *MISTAKES.items()])
def test_injected_and_mistaken_sql_is_refused_in_one_line_naming_why(tmp_path, sql, said):
    catalog = DuckDBCatalog(lake=LakeResource(url=str(tmp_path)))
    with pytest.raises(QueryError) as e:
        catalog.query(sql)
    assert said in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, QueryFailed) is str(e.value).startswith("query failed: ")
    assert list(tmp_path.iterdir()) == []  # nothing written: no COPY, EXPORT or ATTACH file
    assert not any(Path(p).exists() for p in ("/tmp/x.csv", "/tmp/x", "/tmp/x.db"))


def test_an_injected_comment_cannot_smuggle_a_second_statement(tmp_path):
    catalog = DuckDBCatalog(lake=LakeResource(url=str(tmp_path)))
    assert catalog.query("SELECT 1 AS one -- ; DROP TABLE images").to_pylist() == [{"one": 1}]
    assert catalog.query("SELECT count(*) AS n FROM images").to_pylist() == [{"n": 0}]


def test_select_passes_and_trailing_semicolon_is_dropped():
    assert (
        ensure_select(" SELECT * FROM images WHERE label = 'x'; ")
        == "SELECT * FROM images WHERE label = 'x'"
    )
    assert ensure_select("WITH a AS (SELECT 1 AS n) SELECT n FROM a").startswith("WITH")


def test_duckdb_catalog_over_the_lakes_tables(lake, put_pack):
    from cvgraph.demo_packs import sample_image
    from workloads.index import build_raw_index
    from workloads.ingest import ingest_pack
    from workloads.versions import HASH_PREFIXES

    catalog = DuckDBCatalog(lake=LakeResource(url=str(lake.root)))
    assert catalog.query("SELECT count(*) AS n FROM images").to_pylist() == [{"n": 0}]
    key = put_pack(
        "t",
        {
            "cat/chelsea.png": sample_image("chelsea.png"),
            "cup/coffee.png": sample_image("coffee.png"),
            "cup/china.jpg": sample_image("china.jpg"),
        },
    )
    ingest_pack(lake, "t", key)
    stats = build_raw_index(lake, list(HASH_PREFIXES))
    for p, s in stats.items():
        if s["images"]:
            write_prefix_tables(lake, p, ImageParams())
    rows = catalog.query(
        "SELECT label, count(*) AS n FROM images GROUP BY label ORDER BY label"
    ).to_pylist()
    assert rows == [{"label": "cat", "n": 1}, {"label": "cup", "n": 2}]
    one = catalog.query(
        "SELECT sha256, prefix, pack_id, split FROM images WHERE label = 'cat'"
    ).to_pylist()[0]
    assert (
        one["prefix"] == one["sha256"][:2]
        and one["pack_id"] == "t"
        and one["split"] in ("train", "val", "test")
    )
    with pytest.raises(QueryRefused):
        catalog.query("DELETE FROM images")
    # a SELECT cannot reach the host: no file readers, globs or URLs, only the lake's tables
    raw = next(k for k in lake.keys("raw/"))
    for sql in (
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_text('/etc/hostname')",
        f"SELECT * FROM read_blob('{lake.root}/{raw}')",
        f"SELECT * FROM read_parquet('{lake.root}/tables/../packs/t/manifest.parquet')",
    ):
        # refused for lack of permission (the bare-path form is not even looked up as a file)
        with pytest.raises(
            QueryFailed if sql == "SELECT * FROM '/etc/passwd'" else QueryRefused,
            match="Table with name /etc/passwd does not exist"
            if sql == "SELECT * FROM '/etc/passwd'"
            else "refused by the sandbox: Permission Error",
        ):
            catalog.query(sql)
    # the prefix column stays text ("0a", not 10) and every table column is there
    types = {
        r["column_name"]: r["column_type"]
        for r in catalog.query("SELECT column_name, column_type FROM (DESCRIBE images)").to_pylist()
    }
    assert types["prefix"] == "VARCHAR" and set(types) == {*TABLES["images"].names, "prefix"}


def test_duckdb_views_are_the_tables_columns_whatever_the_lake_path_and_file_age(tmp_path):
    import pyarrow as pa

    from workloads.lake import LocalLake, write_parquet
    from workloads.layout import part_key, tables_state_key

    def table_key(
        name, prefix
    ):  # one part, named by the prefix's state (a lake written before parts)
        lake.put(tables_state_key(prefix), b'{"images": 1, "objects": 0}')
        return part_key(name, prefix, "0")

    lake = LocalLake(
        tmp_path / "run=3" / "label=x" / "lake"
    )  # k=v folders above the lake are not columns
    row = {f.name: None for f in TABLES["images"]} | {
        "sha256": "ab" + "0" * 62,
        "label": "cat",
        "packs": ["p"],
        "width": 4,
    }
    write_parquet(
        lake, table_key("images", "ab"), pa.Table.from_pylist([row], schema=TABLES["images"])
    )
    catalog = DuckDBCatalog(lake=LakeResource(url=str(lake.root)))
    described = lambda: [
        (r["column_name"], r["column_type"])
        for r in catalog.query("SELECT column_name, column_type FROM (DESCRIBE images)").to_pylist()
    ]
    assert [c for c, _ in described()] == [*TABLES["images"].names, "prefix"] and dict(described())[
        "prefix"
    ] == "VARCHAR"
    assert catalog.query("SELECT label, prefix, width FROM images").to_pylist() == [
        {"label": "cat", "prefix": "ab", "width": 4}
    ]
    # a file written before a column existed: the column reads as nulls
    old = pa.Table.from_pylist(
        [row | {"sha256": "cd" + "0" * 62}], schema=TABLES["images"]
    ).drop_columns(["edges_sha256"])
    write_parquet(lake, table_key("images", "cd"), old)
    rows = catalog.query(
        "SELECT prefix, label, edges_sha256 FROM images ORDER BY prefix"
    ).to_pylist()
    assert rows == [
        {"prefix": "ab", "label": "cat", "edges_sha256": None},
        {"prefix": "cd", "label": "cat", "edges_sha256": None},
    ]

import duckdb
import pytest

from resources.catalog import DuckDBCatalog, QueryRefused, ensure_select
from resources.storage import LakeResource
from workloads.image_params import ImageParams
from workloads.table_rows import TABLES
from workloads.tables import write_prefix_tables


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM images",
        "DROP TABLE images",
        "CREATE TABLE x AS SELECT * FROM images",
        "SELECT 1; DROP TABLE images",
        "COPY images TO 'x.csv'",
        "ATTACH 'x.db'",
        "INSTALL httpfs",
        "not sql at all",
    ],
)
def test_only_a_single_select_is_allowed(sql):
    with pytest.raises(QueryRefused):
        ensure_select(sql)


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
            duckdb.CatalogException
            if sql == "SELECT * FROM '/etc/passwd'"
            else duckdb.PermissionException
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

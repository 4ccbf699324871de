import io

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from fault_proxy import FaultProxy

from workloads.lake import open_lake
from workloads.s3lake import S3Lake


def test_s3_lake_reads_writes_lists_and_conditional_puts(aws, tmp_path):
    lake = open_lake("s3://cvgraph-lake/lake")
    assert isinstance(lake, S3Lake) and lake.url == "s3://cvgraph-lake/lake"
    for k in ("incoming/b.zip", "incoming/a.zip", "other/x"):
        lake.put(k, k.encode())
    assert [o.key for o in lake.list("incoming/")] == ["incoming/a.zip", "incoming/b.zip"]
    assert [o.key for o in lake.list("incoming/", start_after="incoming/a.zip")] == [
        "incoming/b.zip"
    ]
    lake.put("incoming/deeper/c.zip", b"c")
    assert sorted(lake.names("incoming/")) == ["a.zip", "b.zip"]  # nothing below it
    assert lake.names("missing/") == []
    lake.delete("incoming/deeper/c.zip")
    assert (
        lake.get("incoming/a.zip") == b"incoming/a.zip"
        and lake.exists("other/x")
        and not lake.exists("nope")
    )
    src = tmp_path / "f"
    src.write_bytes(b"first")
    assert lake.put_file_if_absent("raw/aa/x.jpg", src) is True
    src.write_bytes(b"second")
    assert lake.put_file_if_absent("raw/aa/x.jpg", src) is False  # 412 from IfNoneMatch="*"
    assert lake.get("raw/aa/x.jpg") == b"first"
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * (300 * 1024))  # 75 MiB: multipart
    lake.put_file("big/object", big)
    with lake.open_read("big/object") as f:
        assert f.read() == big.read_bytes()
    assert lake.uri("raw/aa/x.jpg") == "s3://cvgraph-lake/lake/raw/aa/x.jpg"


def test_arrow_reads_hive_tables_from_the_s3_lake(aws):
    lake = open_lake("s3://cvgraph-lake/lake")
    for p in ("00", "01"):
        buf = io.BytesIO()
        pq.write_table(pa.table({"sha256": [p * 32], "n": [int(p)]}), buf)
        lake.put(f"tables/t/prefix={p}/part-0.parquet", buf.getvalue())
    fs, base = lake.arrow_filesystem()
    ds = pads.dataset(f"{base}/tables/t", filesystem=fs, format="parquet", partitioning="hive")
    assert sorted(ds.to_table().to_pylist(), key=lambda r: r["n"]) == [
        {"sha256": "00" * 32, "n": 0, "prefix": 0},
        {"sha256": "01" * 32, "n": 1, "prefix": 1},
    ]


def test_s3_put_if_match_is_a_conditional_put_on_the_etag(aws):
    lake = open_lake("s3://cvgraph-lake/lake")
    assert lake.get_tagged("_versions/a.json") == (None, None)
    assert lake.put_if_match("_versions/a.json", b"one", None) is True
    assert (
        lake.put_if_match("_versions/a.json", b"again", None) is False
    )  # 412 from IfNoneMatch="*"
    data, tag = lake.get_tagged("_versions/a.json")
    assert data == b"one"
    assert lake.put_if_match("_versions/a.json", b"two", tag) is True
    assert (
        lake.put_if_match("_versions/a.json", b"three", tag) is False
    )  # 412 from IfMatch: the ETag moved on
    lake.delete("_versions/a.json")
    assert (
        lake.put_if_match("_versions/a.json", b"four", tag) is False
    )  # 404: gone since it was read
    assert lake.get_tagged("_versions/a.json") == (None, None)


def test_a_conditional_put_whose_answer_is_lost_is_stored_not_refused_by_its_own_write(
    aws, moto_endpoint, tmp_path
):
    """S3 did the put, the answer never came (the connection reset first): botocore retries,
    and the retry's 412 is the first attempt's own write, which is no refusal. Other bytes there
    after a lost answer are still a refusal."""

    def first_put_lost(method, path, nth):
        return "lost" if method == "PUT" and nth == 1 else None

    src = tmp_path / "image.bin"
    src.write_bytes(b"pixels")
    with FaultProxy(moto_endpoint, faults=first_put_lost) as proxy:
        lake = open_lake("s3://cvgraph-lake/lake", endpoint_url=proxy.url)
        assert lake.put_if_match("_versions/b.json", b"one", None) is True
        data, tag = lake.get_tagged("_versions/b.json")
        assert data == b"one"
        assert lake.put_if_match("_versions/b.json", b"two", tag) is True  # If-Match: the same
        assert lake.put_if_match("_versions/b.json", b"three", tag) is False  # stale: refused
        assert lake.put_if_match("_versions/b.json", b"four", None) is False  # "two" is there
        assert lake.put_file_if_absent("raw/bb/y.bin", src) is True
        assert lake.put_file_if_absent("raw/bb/y.bin", src) is False  # a second put: there
        stats = dict(proxy.stats)
    direct = open_lake("s3://cvgraph-lake/lake", endpoint_url=moto_endpoint)
    assert direct.get("_versions/b.json") == b"two" and direct.get("raw/bb/y.bin") == b"pixels"
    assert stats["lost"] == 5 and stats["retries"] == 5, stats

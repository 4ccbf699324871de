import pytest

from workloads.lake import LocalLake


def test_put_get_list_in_key_order_with_start_after(lake):
    for k in ("incoming/b.zip", "incoming/a.zip", "incoming/c.zip", "other/x"):
        lake.put(k, k.encode())
    assert [o.key for o in lake.list("incoming/")] == [
        "incoming/a.zip",
        "incoming/b.zip",
        "incoming/c.zip",
    ]
    assert [o.key for o in lake.list("incoming/", start_after="incoming/a.zip")] == [
        "incoming/b.zip",
        "incoming/c.zip",
    ]
    assert lake.get("incoming/b.zip") == b"incoming/b.zip"
    assert [o.size for o in lake.list("other/")] == [7]


def test_keys_cannot_escape_the_lake(lake):
    for bad in (
        "../x",
        "a/../../x",
        "/etc/passwd",
        "",
        "subsets/../packs/p/manifest.parquet",
        "a//b",
        "./a",
        "a/.",
    ):
        with pytest.raises(ValueError):
            lake.put(bad, b"x")


def test_put_if_absent_keeps_the_first_object(lake, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"one")
    assert lake.put_file_if_absent("raw/aa/x.jpg", src) is True
    src.write_bytes(b"two")
    assert lake.put_file_if_absent("raw/aa/x.jpg", src) is False
    assert lake.get("raw/aa/x.jpg") == b"one"


def test_temporary_files_are_invisible_to_readers(lake):
    lake.put("a/b.txt", b"x")
    (lake.root / "a" / ".tmp-half-written").write_bytes(b"partial")
    assert [o.key for o in lake.list("a/")] == ["a/b.txt"]
    assert LocalLake(lake.root).exists("a/b.txt")

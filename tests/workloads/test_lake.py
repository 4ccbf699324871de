import os

import pytest

from workloads.lake import LocalLake


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "a//b", "a/./b", "a/../b", "..", ".", "a/..", "a/.", "../a", "a\\b", "a/"],
)
def test_keys_that_could_leave_the_lake_are_refused(lake, key):
    for op in (lake.get, lake.exists, lake.delete, lambda k: lake.put(k, b"x")):
        with pytest.raises(ValueError, match="invalid lake key"):
            op(key)


def test_names_that_only_look_like_dots_are_keys(lake):
    for key in ("a/.hidden", "a/..b", "a/b..", "a/…"):
        lake.put(key, key.encode())
        assert lake.get(key) == key.encode()
    assert [o.key for o in lake.list("a/")] == sorted(["a/.hidden", "a/..b", "a/b..", "a/…"])


def test_a_symlink_inside_the_lake_cannot_carry_a_write_outside(lake, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    lake.root.mkdir(parents=True)
    os.symlink(outside, lake.root / "link")
    with pytest.raises(ValueError, match="escapes the lake root"):
        lake.put("link/x.bin", b"payload")
    with pytest.raises(ValueError, match="escapes the lake root"):
        lake.delete("link/x.bin")
    assert list(outside.iterdir()) == []


def test_get_returns_every_byte_and_puts_leave_no_temporaries(lake):
    big = os.urandom(3 << 20) + b"end"
    lake.put("blobs/big.bin", big)
    lake.put("blobs/empty.bin", b"")
    assert lake.get("blobs/big.bin") == big and lake.get("blobs/empty.bin") == b""
    assert [o.key for o in lake.list("blobs/")] == ["blobs/big.bin", "blobs/empty.bin"]
    assert sorted(os.listdir(lake.root / "blobs")) == ["big.bin", "empty.bin"]
    with pytest.raises(FileNotFoundError):
        lake.get("blobs/missing.bin")


def test_lake_root_is_resolved_once(tmp_path):
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-alias")
    lake = LocalLake(tmp_path.parent / f"{tmp_path.name}-alias" / "lake")
    lake.put("k/v", b"1")
    assert (tmp_path / "lake" / "k" / "v").read_bytes() == b"1"
    assert lake.path("k/v") == tmp_path.resolve() / "lake" / "k" / "v"


def test_list_is_ordered_filtered_and_skips_temporaries(lake):
    keys = ["a/b/c.bin", "a/b/d.bin", "a/bc.bin", "a/b2/e.bin", "ab/x.bin", "z.bin", "a/b/.tmp-123"]
    for k in keys:
        (lake.root / k).parent.mkdir(parents=True, exist_ok=True)
        (lake.root / k).write_bytes(k.encode())
    (lake.root / "a" / ".tmp-dir").mkdir()
    (lake.root / "a" / ".tmp-dir" / "f").write_bytes(b"x")
    listed = lambda prefix, after=None: [o.key for o in lake.list(prefix, after)]
    assert listed("") == ["a/b/c.bin", "a/b/d.bin", "a/b2/e.bin", "a/bc.bin", "ab/x.bin", "z.bin"]
    assert listed("a/b") == ["a/b/c.bin", "a/b/d.bin", "a/b2/e.bin", "a/bc.bin"]
    assert listed("a/b/") == ["a/b/c.bin", "a/b/d.bin"]
    assert listed("a") == ["a/b/c.bin", "a/b/d.bin", "a/b2/e.bin", "a/bc.bin", "ab/x.bin"]
    assert listed("a/b/", "a/b/c.bin") == ["a/b/d.bin"]
    assert listed("missing/") == [] and listed("z.bin/") == []
    assert [o.size for o in lake.list("a/b/")] == [len(b"a/b/c.bin"), len(b"a/b/d.bin")]
    assert lake.keys("a/b") == listed("a/b") and lake.keys("") == listed("")
    # names: what is directly in one directory (no temporaries, no subdirectory, nothing below)
    assert sorted(lake.names("a/b/")) == ["c.bin", "d.bin"]
    assert sorted(lake.names("a/")) == ["bc.bin"]
    assert lake.names("missing/") == [] and lake.names("z.bin/") == []
    for outside in ("../", "a/../../", "/etc/"):
        with pytest.raises(ValueError):
            lake.names(outside)


def test_listing_follows_a_symlinked_file_but_not_a_symlinked_directory(lake, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    (tmp_path / "target.bin").write_bytes(b"t")
    (lake.root / "d").mkdir(parents=True)
    (lake.root / "d" / "own.bin").write_bytes(b"o")
    os.symlink(tmp_path / "target.bin", lake.root / "d" / "linked.bin")
    os.symlink(tmp_path / "outside", lake.root / "d" / "dir")
    assert lake.keys("") == ["d/linked.bin", "d/own.bin"]
    assert sorted(lake.names("d/")) == ["linked.bin", "own.bin"]

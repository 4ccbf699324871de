"""The per-prefix version records: one object per asset, updated by compare-and-swap, so runs that
update one asset at once (two ranges, a UI run beside the automation's) lose no record."""

import json
import multiprocessing

import pytest

from assets.versioning import (
    asset_records,
    prefix_records,
    read_prefix_versions,
    write_prefix_records,
)
from workloads.lake import LocalLake
from workloads.layout import versions_key
from workloads.versions import HASH_PREFIXES


def test_put_if_match_swaps_only_over_the_tag_it_read(lake):
    assert lake.get_tagged("r.json") == (None, None)
    assert lake.put_if_match("r.json", b"one", None) is True
    assert lake.put_if_match("r.json", b"again", None) is False  # None: only where there is none
    data, tag = lake.get_tagged("r.json")
    assert data == b"one"
    assert lake.put_if_match("r.json", b"two", tag) is True
    assert lake.put_if_match("r.json", b"three", tag) is False  # stale: "two" is there now
    assert lake.get("r.json") == b"two"
    assert [o.key for o in lake.list("")] == ["r.json"]  # the lock and temp files are not objects


def _writer(root: str, worker: int, rounds: int) -> None:
    lake = LocalLake(root)
    mine = HASH_PREFIXES[worker::4]
    for n in range(rounds):
        write_prefix_records(
            lake,
            "resized_images",
            {p: {"data_version": f"w{worker}-{n}", "images": n} for p in mine},
        )


def test_concurrent_updates_of_one_asset_lose_no_prefix(lake):
    """Four processes, each updating its own 64 prefixes 25 times at once: every prefix ends with
    its writer's last record (a plain read-modify-write loses most of them)."""
    procs = [
        multiprocessing.get_context("fork").Process(target=_writer, args=(str(lake.root), w, 25))
        for w in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    versions = read_prefix_versions(lake, "resized_images")
    assert versions == {p: f"w{i % 4}-24" for i, p in enumerate(HASH_PREFIXES)}


def test_one_read_serves_every_prefix_and_an_update_keeps_the_others(lake):
    write_prefix_records(
        lake, "raw_images", {p: {"data_version": "a", "images": 1} for p in HASH_PREFIXES}
    )
    write_prefix_records(lake, "raw_images", {"07": {"data_version": "b", "images": 2}})
    lake.counters.clear()
    got = prefix_records(lake, "raw_images", ["07", "08", "zz"])
    assert got == {
        "07": {"prefix": "07", "data_version": "b", "images": 2},
        "08": {"prefix": "08", "data_version": "a", "images": 1},
    }
    assert lake.counters["get"] == 1 and lake.counters["list"] == 0
    assert len(asset_records(lake, "raw_images")) == 256


def test_a_lake_with_per_prefix_records_is_read_and_folded_in_by_the_first_update(lake):
    """Lakes written before the records were one object per asset keep ``_versions/<asset>/<pp>.json``."""
    for p in ("00", "01"):
        lake.put(
            f"_versions/edge_maps/{p}.json",
            json.dumps({"prefix": p, "data_version": f"old-{p}"}).encode(),
        )
    assert read_prefix_versions(lake, "edge_maps") == {"00": "old-00", "01": "old-01"}
    write_prefix_records(lake, "edge_maps", {"01": {"data_version": "new"}})
    assert json.loads(lake.get(versions_key("edge_maps")))["prefixes"] == {
        "00": {"prefix": "00", "data_version": "old-00"},
        "01": {"prefix": "01", "data_version": "new"},
    }
    lake.counters.clear()
    assert read_prefix_versions(lake, "edge_maps") == {"00": "old-00", "01": "new"}
    assert lake.counters["list"] == 0


def test_an_update_that_never_wins_the_swap_fails_naming_the_record(lake, monkeypatch):
    monkeypatch.setattr(lake, "put_if_match", lambda *a: False)
    monkeypatch.setattr("assets.versioning.SWAP_ATTEMPTS", 3)
    with pytest.raises(
        RuntimeError, match=r"_versions/image_tables\.json: changed by another writer 3 times"
    ):
        write_prefix_records(lake, "image_tables", {"00": {"data_version": "x"}})

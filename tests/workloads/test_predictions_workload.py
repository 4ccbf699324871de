"""``workloads.predictions`` without Dagster: which images a pack's scoring reads, the scored
packs' record (compare-and-swap), and what forgetting a pack takes from the table."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from cvgraph.demo_packs import digit_members
from workloads.ingest import ingest_pack
from workloads.lake import write_parquet
from workloads.predictions import (
    PREDICTIONS_SCHEMA,
    forget_predictions,
    pack_images,
    pack_version,
    predictions_version,
    record_scored,
    scored_packs,
)


def test_a_pack_is_scored_once_per_image_whatever_its_members(lake, put_pack):
    """The same image twice in a pack (another member name) is one image to score."""
    members = digit_members(size=32, limit=4, classes=(0, 1))
    first = next(iter(members))
    members["copy/again.png"] = members[first]
    key = put_pack("p", members)
    ingest_pack(lake, "p", key)
    shas = sorted({hashlib.sha256(v).hexdigest() for v in members.values()})
    images = pack_images(lake, "p")
    assert [s for s, _ in images] == shas and len(shas) == 4
    assert all(k == f"raw/{s[:2]}/{s}.png" and lake.exists(k) for s, k in images)


def test_the_data_version_follows_the_pack_and_the_export():
    pack = {"zip_sha256": "1" * 64, "reader": 3}
    assert pack_version(pack) == "1" * 24 + ".r3"
    v = predictions_version(pack_version(pack), "a" * 64)
    assert len(v) == 24
    assert predictions_version(pack_version({**pack, "reader": 4}), "a" * 64) != v
    assert predictions_version(pack_version(pack), "b" * 64) != v


def test_scored_packs_keep_every_writer_and_a_forgotten_pack_leaves_the_table(lake):
    for pack in ("a", "b"):
        write_parquet(
            lake,
            f"tables/predictions/{pack}.parquet",
            pa.Table.from_pylist(
                [
                    {
                        "sha256": "0" * 64,
                        "model": "m",
                        "version": 1,
                        "class": "0",
                        "probability": 0.5,
                        "pack": pack,
                    }
                ],
                schema=PREDICTIONS_SCHEMA,
            ),
        )
        record_scored(lake, pack, {"data_version": pack})
    record_scored(lake, "a", {"data_version": "a"})  # the same entry: nothing written
    assert scored_packs(lake) == {"a": {"data_version": "a"}, "b": {"data_version": "b"}}
    assert forget_predictions(lake, "a") == 1
    assert forget_predictions(lake, "a") == 0  # a forget run again
    assert scored_packs(lake) == {"b": {"data_version": "b"}}
    assert lake.keys("tables/predictions/") == ["tables/predictions/b.parquet"]

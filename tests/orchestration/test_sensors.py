import json

import dagster as dg

from orchestration.sensors import incoming_packs_sensor
from resources.events import IncomingListing
from resources.storage import LakeResource
from workloads.layout import pack_id_for, record_key, unreadable_key


def test_pack_ids_are_safe_partition_keys_and_never_collide():
    import re

    assert pack_id_for("incoming/digits.zip") == "digits"
    assert re.fullmatch(r"team_cats_v2-[0-9a-f]{8}", pack_id_for("incoming/team/cats v2.ZIP"))
    names = [
        "incoming/猫.zip",
        "incoming/犬.zip",
        "incoming/a b.zip",
        "incoming/a_b.zip",
        "incoming/team/x.zip",
        "incoming/team__x.zip",
        "incoming/.zip",
        "incoming/..zip",
        "incoming/../x.zip",
    ]
    ids = [pack_id_for(n) for n in names]
    assert len(set(ids)) == len(ids), ids
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", i) and ".." not in i for i in ids), ids


def ingested(lake, *packs):
    """What a finished ingest leaves: each pack's record, its commit marker."""
    for p in packs:
        lake.put(record_key("pack", p), b"{}")


def tick(instance, resources, cursor=None):
    return incoming_packs_sensor(
        dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)
    )


def test_sensor_requests_new_zips_once_with_a_key_cursor_and_a_full_relist_safety_net(lake):
    resources = {
        "lake": LakeResource(url=str(lake.root)),
        "incoming_listing": IncomingListing(relist_seconds=300),
    }
    lake.put("incoming/a.zip", b"a")
    lake.put("incoming/readme.txt", b"x")
    lake.put("incoming/b.zip", b"b")
    with dg.instance_for_test() as instance:
        result = tick(instance, resources)
        assert [r.partition_key for r in result.run_requests] == ["a", "b"]
        assert [r.tags["cvgraph/pack_key"] for r in result.run_requests] == [
            "incoming/a.zip",
            "incoming/b.zip",
        ]
        assert result.dynamic_partitions_requests[0].partition_keys == ["a", "b"]
        cursor = json.loads(result.cursor)
        assert cursor["after"] == "incoming/readme.txt" and cursor["full_listing_at"] > 0
        ingested(lake, "a", "b")
        again = tick(instance, resources, result.cursor)
        assert again.run_requests == []
        lake.put("incoming/z.zip", b"z")  # sorts after the cursor: seen by the next listing
        lake.put("incoming/c.zip", b"c")  # sorts before it: only the full re-list sees it
        third = tick(instance, resources, again.cursor)
        assert [r.partition_key for r in third.run_requests] == ["z"]
        ingested(lake, "z")
        stale = json.dumps({**json.loads(third.cursor), "full_listing_at": 0})
        full = tick(instance, resources, stale)
        assert [r.partition_key for r in full.run_requests] == ["c"]
        assert json.loads(full.cursor)["after"] == "incoming/z.zip"


def test_with_the_local_profiles_relist_a_zip_that_sorts_before_the_cursor_is_seen_on_the_next_tick(
    lake,
):
    from orchestration.profiles import resources_for

    assert resources_for("local")["incoming_listing"].relist_seconds == 0
    resources = {
        "lake": LakeResource(url=str(lake.root)),
        "incoming_listing": IncomingListing(relist_seconds=0),
    }
    lake.put("incoming/textures.zip", b"t")
    with dg.instance_for_test() as instance:
        first = tick(instance, resources)
        ingested(lake, "textures")
        lake.put("incoming/faces-extra.zip", b"f")  # before the cursor (incoming/textures.zip)
        second = tick(instance, resources, first.cursor)
        assert [r.partition_key for r in second.run_requests] == ["faces-extra"]


def test_a_zip_with_a_partition_but_no_pack_record_is_requested_again_until_its_run_commits(lake):
    """A tick killed after adding its partitions (or a run killed before it committed) loses no
    pack: the lake's record decides, not the partition. A zip with a verdict on its very bytes
    is owed nothing; other bytes under its key are."""
    resources = {
        "lake": LakeResource(url=str(lake.root)),
        "incoming_listing": IncomingListing(relist_seconds=0),
    }
    lake.put("incoming/lost.zip", b"zip bytes")
    lake.put("incoming/bad.zip", b"not a zip")
    lake.put(
        unreadable_key("bad"),
        json.dumps({"key": "incoming/bad.zip", "bytes": 9, "reason": "not a zip"}).encode(),
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("packs", ["lost", "bad"])  # the killed tick's partitions
        assert [r.partition_key for r in tick(instance, resources).run_requests] == ["lost"]
        # the bad zip's bytes change: those are owed an ingest
        lake.put("incoming/bad.zip", b"another try")
        assert [r.partition_key for r in tick(instance, resources).run_requests] == ["bad", "lost"]
        ingested(lake, "lost", "bad")
        assert tick(instance, resources).run_requests == []

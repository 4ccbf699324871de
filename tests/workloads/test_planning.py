"""``workloads.planning``: the decisions the steps, the plan and a chain task make from a prefix's
records, one case a row."""

import pytest

from workloads.image_params import ImageParams
from workloads.planning import (
    ImagePlan,
    images_owed,
    mean_bytes,
    new_rows,
    pending_count,
    pending_mean,
    plan_tasks,
    stage_work,
    table_inputs,
    tables_work,
)
from workloads.tasks import group_tasks, parse_task, shard_tasks, task_token

PARAMS = ImageParams()
RESIZE = PARAMS.stage_id("resize")
EDGES = PARAMS.stage_id("edges")


def raw(images: int, version: str = "v1", nbytes: int = 0) -> dict:
    return {"images": images, "data_version": version, "bytes": nbytes}


def stage(images: int, version: str = "v1", params_id: str = RESIZE, failed: int = 0) -> dict:
    return {
        "images": images,
        "inputs": {"raw_images": version},
        "params_id": params_id,
        "failed": failed,
    }


@pytest.mark.parametrize(
    ("prior", "index", "params_id", "work", "pending"),
    [
        (None, None, RESIZE, False, 0),  # nothing indexed, never run
        (None, raw(0), RESIZE, False, 0),  # an empty prefix
        (None, raw(5), RESIZE, True, 5),  # indexed, never run: all of it
        (stage(5), raw(5), RESIZE, False, 0),  # up to date
        (stage(5), raw(8, "v2"), RESIZE, True, 3),  # new images: the new ones
        (stage(5), raw(5), EDGES, True, 5),  # other params: all again
        (stage(4, failed=1), raw(5), RESIZE, True, 1),  # a failed image is tried again
        (stage(5, "v0"), raw(5), RESIZE, True, 0),  # a forgotten pack: the index changed
    ],
)
def test_a_stage_owes_a_prefix_what_its_records_say(prior, index, params_id, work, pending):
    assert stage_work(prior, index, params_id) is work
    assert pending_count(prior, index, params_id) == pending


def test_the_image_stages_owe_what_the_most_behind_of_them_owes():
    both = {"resize": stage(5), "edges": None}
    assert images_owed(both, raw(5), PARAMS) == (True, 5)
    done = {"resize": stage(5), "edges": stage(5, params_id=EDGES)}
    assert images_owed(done, raw(5), PARAMS) == (False, 0)


@pytest.mark.parametrize(
    ("prior", "index", "inputs", "work"),
    [
        (None, raw(0), {}, False),
        (None, raw(3), {}, True),
        ({"inputs": {"raw_images": "v1"}, "images": 3}, raw(3), {"raw_images": "v1"}, False),
        ({"inputs": {"raw_images": "v1"}, "images": 3}, raw(4, "v2"), {"raw_images": "v2"}, True),
        (
            {"inputs": {"raw_images": "v1"}, "images": 3, "missing_variants": 2},
            raw(3),
            {"raw_images": "v1"},
            True,
        ),
    ],
)
def test_tables_change_when_an_input_did_or_rows_lack_a_variant(prior, index, inputs, work):
    assert tables_work(prior, index, inputs) is work


def test_table_inputs_and_new_rows():
    records = {"raw_images": raw(3, "r"), "resized_images": {"data_version": "s"}}
    assert table_inputs(records) == {"raw_images": "r", "resized_images": "s", "edge_maps": None}
    assert new_rows(None, raw(3)) == 3
    assert new_rows({"images": 2}, raw(3)) == 1
    assert new_rows({"images": 5}, raw(3)) == 0  # a forgotten pack takes rows away: none new


@pytest.mark.parametrize(
    ("pending", "shard_images", "tasks"),
    [
        ({}, 8, []),
        ({"00": 8}, 8, ["00"]),
        ({"00": 9}, 8, ["00.0of2", "00.1of2"]),
        ({"01": 1, "00": 17}, 8, ["00.0of3", "00.1of3", "00.2of3", "01"]),
        ({"00": 0}, 8, ["00"]),  # work without images (a params change on an empty stage)
    ],
)
def test_prefixes_past_the_shard_threshold_become_shard_tasks(pending, shard_images, tasks):
    assert shard_tasks(pending, shard_images) == tasks
    for t in tasks:
        assert task_token(*parse_task(t)) == t


@pytest.mark.parametrize(
    ("stages", "arriving", "plan"),
    [
        # nothing owed
        ({"resize": {"00": stage(2)}}, {}, ImagePlan([], [], [], {})),
        # owed by the records, and by rows a pending pack brings (a plan's look ahead)
        (
            {"resize": {"00": stage(2)}},
            {"00": 3, "01": 20},
            ImagePlan(
                ["00", "01"], ["00", "01.0of3", "01.1of3", "01.2of3"], ["01"], {"00": 3, "01": 20}
            ),
        ),
        # the most behind selected stage decides
        (
            {"resize": {"00": stage(2)}, "edges": {}},
            {},
            ImagePlan(["00"], ["00"], [], {"00": 2}),
        ),
    ],
)
def test_plan_tasks(stages, arriving, plan):
    index = {"00": raw(2)}
    got = plan_tasks(stages, index, ["00", "01"], PARAMS, shard_images=8, arriving=arriving)
    assert got == plan


def test_the_mean_bytes_of_what_is_pending():
    assert mean_bytes(None) == 0 and mean_bytes(raw(4, nbytes=400)) == 100
    # 2 indexed (100 B each), 3 arriving from pack p (1,000 B each), 5 expected at 50 B
    assert pending_mean(raw(2, nbytes=200), 5, {"p": 3}, {"p": 1000.0}, (5, 50.0)) == pytest.approx(
        (2 * 100 + 3 * 1000 + 5 * 50) / 10
    )
    assert pending_mean(None, 0, {}, {}) == 0.0


@pytest.mark.parametrize(
    ("work", "child_s", "max_children", "sizes"),
    [
        ({"00": 1.0}, 60, 256, [1]),  # one child when the work is small
        ({f"{i:02x}": 1.0 for i in range(120)}, 60, 256, [60, 60]),  # about a minute a child
        ({f"{i:02x}": 1.0 for i in range(120)}, 60, 1, [120]),  # never more than run at once
        ({"00": 100.0, "01": 1.0, "02": 1.0}, 60, 256, [1, 2]),  # a big task alone
        ({f"{i:02x}": 60.0 for i in range(3)}, 60, 256, [1, 1, 1]),  # never more than tasks
    ],
)
def test_groups_are_contiguous_and_hold_about_a_childs_work(work, child_s, max_children, sizes):
    groups = group_tasks(work, child_s=child_s, max_children=max_children)
    assert [len(g) for g in groups] == sizes
    assert [t for g in groups for t in g] == sorted(work)

"""The cost arithmetic on known work: billed minimums, the two S3 request tiers, the spread of
hashed images over prefixes."""

import math

import pytest

from cvgraph.plan import parse_prefixes
from workloads.costs import (
    Estimate,
    Prices,
    Rates,
    billed_s,
    expected_prefixes,
    images_estimate,
    summary_line,
    tables_estimate,
)
from workloads.tasks import children, group_tasks


def test_a_task_is_billed_its_start_and_work_and_one_minute_at_least():
    rates = Rates(task_start_s=30, min_billed_s=60, task_vcpus=2)
    assert billed_s(1, rates) == 120  # 31 s of a 2-vCPU task, billed as 60
    assert billed_s(90, rates) == 240


def test_cost_of_known_work():
    rates, prices = Rates(images_per_vcpu_s=100), Prices()
    # two prefixes of 100 images each: 2.5 s of work, one child (one task start), billed a minute
    est = images_estimate([(1, 100, 1e6), (1, 100, 1e6)], 2, 0, 64, rates)
    assert est.vcpu_s == 60 and est.images == 200 and est.tasks == 1
    assert est.bytes_read == 2e6
    assert est.requests["get"] == 3 + 2 * 1 + 2 * 3 + 200
    assert est.requests["put"] == 2 * 6 + 200 * 2
    cost = est.cost(prices, rates)
    hours = 60 / 3600
    assert cost["compute_usd"] == pytest.approx(
        hours * prices.vcpu_hour + hours * 2 * prices.gb_hour
    )
    put = est.requests["put"] + est.requests["list"]
    get = est.requests["get"] + est.requests["head"]  # deletes are free
    assert cost["requests_usd"] == pytest.approx(
        put / 1000 * prices.s3_put_per_1000 + get / 1000 * prices.s3_get_per_1000
    )
    # tables: 1.5 prefixes expected, one child
    total = est + tables_estimate([(1, 100), (0.5, 10)], rates)
    assert total.tasks == 2 and total.vcpu_s == 60 + 60


def test_children_take_a_minute_of_work_each_and_no_more_than_run_at_once():
    rates = Rates(
        images_per_vcpu_s=100,
        prefix_task_s=0.25,
        record_speedup=0.5,  # a table task's prefix: 0.5 s
        child_work_s=60,
        max_children=256,
    )
    # 256 prefixes of 1,000 images, each stage an array (split 2): per stage 256 x (0.25 + 5) s
    tasks = [(1, 1000, 1e9)] * 256
    est = images_estimate(tasks, 256, 0, 64, rates, split=2)
    per_stage = 256 * (0.25 + 1000 / 100 / 2)
    children = math.ceil(per_stage / 60)
    assert est.tasks == 2 * children == 2 * 23
    assert est.vcpu_s == pytest.approx(2 * children * (30 + per_stage / children))
    # the children of a stage run at once; edges child i follows resize child i
    assert est.wall_s == pytest.approx(2 * (30 + per_stage / children))
    line = summary_line(est, Prices(), rates)
    assert "46 tasks" in line and f"~{(2 * (30 + per_stage / children)) / 60:.1f} min wall" in line
    # stages one after the other: their wall times add
    tables = tables_estimate([(1, 1000)] * 256, rates)
    assert (est + tables).wall_s == pytest.approx(est.wall_s + tables.wall_s)
    assert tables.wall_s == pytest.approx(30 + 256 * 0.5 / 3)  # 128 s of work: three children
    # a million images: the children are capped at what runs at once
    big = images_estimate([(1, 4000, 1e9)] * 256, 256, 0, 64, Rates(max_children=10), split=1)
    assert big.tasks == 10
    # an empty stage starts nothing; a tiny one, one child
    assert images_estimate([], 0, 0, 64, rates).tasks == 0
    assert tables_estimate([(0.2, 1)], rates).tasks == 1


@pytest.mark.parametrize(
    "work, child_s, max_children, want",
    [
        ({"00": 1.0}, 60, 256, [["00"]]),
        ({f"{i:02x}": 1.0 for i in range(6)}, 2, 256, [["00", "01"], ["02", "03"], ["04", "05"]]),
        # capped: as many groups as may run at once, contiguous, about equal work
        ({f"{i:02x}": 1.0 for i in range(6)}, 0.1, 2, [["00", "01", "02"], ["03", "04", "05"]]),
        # a heavy task fills a group of its own; never an empty group
        ({"00": 10.0, "01": 1.0, "02": 1.0, "03": 1.0}, 5, 256, [["00"], ["01"], ["02", "03"]]),
        # shard tasks of a big prefix are tasks like any other
        ({"ab.0of2": 40.0, "ab.1of2": 40.0, "ac": 1.0}, 60, 256, [["ab.0of2"], ["ab.1of2", "ac"]]),
        ({}, 60, 256, []),
    ],
)
def test_tasks_are_grouped_by_their_work(work, child_s, max_children, want):
    groups = group_tasks(work, child_s=child_s, max_children=max_children)
    assert groups == want
    assert [t for g in groups for t in g] == sorted(work)
    assert len(groups) == children(
        sum(work.values()), len(work), child_s=child_s, max_children=max_children
    )


def test_an_array_child_runs_its_group_of_the_command_prefixes(monkeypatch):
    from workloads.tasks import group_args, prefix_parser, selected_prefixes

    groups = [["00", "01"], ["02"], ["03.0of2", "03.1of2", "04"]]
    argv = ["--lake", "x", "--run-id", "r", "--prefixes", "00,01,02,03.0of2,03.1of2,04"]
    args = prefix_parser("t").parse_args([*argv, *group_args(groups)])
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX", raising=False)
    assert selected_prefixes(args) == [t for g in groups for t in g]  # locally: every task
    for i, g in enumerate(groups):
        monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", str(i))
        assert selected_prefixes(args) == g
    # a command without groups (a job submitted before them): a task a child
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "2")
    assert selected_prefixes(prefix_parser("t").parse_args(argv)) == ["02"]


def test_no_work_costs_nothing():
    est = images_estimate([], 0, 0, 64, Rates()) + tables_estimate([], Rates())
    assert est.to_json(Prices(), Rates())["usd"] == 0 and not est.requests
    assert isinstance(est, Estimate)


def test_hashed_images_spread_over_prefixes():
    assert expected_prefixes(0) == 0
    assert expected_prefixes(1) == pytest.approx(1)
    # 256 images over 256 prefixes touch 256 (1 - (255/256)^256) = 162.0 of them on average
    assert expected_prefixes(256) == pytest.approx(162.0, abs=0.05)
    assert expected_prefixes(100_000) == pytest.approx(256)


def test_prefix_ranges():
    assert parse_prefixes("00-03,ff, 02") == ["00", "01", "02", "03", "ff"]
    assert len(parse_prefixes("00-ff")) == 256
    for bad in ("3f-00", "0g", "", "00-100"):
        with pytest.raises(ValueError):
            parse_prefixes(bad)

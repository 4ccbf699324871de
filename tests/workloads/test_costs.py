"""The cost arithmetic on known work: billed minimums, the two S3 request tiers, the spread of
hashed images over prefixes."""

import pytest

from cvgraph.plan import parse_prefixes
from workloads.costs import (
    Estimate,
    Prices,
    Rates,
    billed_s,
    expected_prefixes,
    images_estimate,
    tables_estimate,
)


def test_a_task_is_billed_its_start_and_work_and_one_minute_at_least():
    rates = Rates(task_start_s=30, min_billed_s=60, task_vcpus=2)
    assert billed_s(1, rates) == 120  # 31 s of a 2-vCPU task, billed as 60
    assert billed_s(90, rates) == 240


def test_cost_of_known_work():
    rates, prices = Rates(images_per_vcpu_s=100), Prices()
    # two prefixes of 100 images each: two tasks, each 30 + 1 s, billed a minute each
    est = images_estimate([(1, 100, 1e6), (1, 100, 1e6)], 2, 0, 64, rates)
    assert est.vcpu_s == 120 and est.images == 200 and est.tasks == 2
    assert est.bytes_read == 2e6
    assert est.requests["get"] == 3 + 2 * 1 + 2 * 3 + 200
    assert est.requests["put"] == 2 * 6 + 200 * 2
    cost = est.cost(prices, rates)
    hours = 120 / 3600
    assert cost["compute_usd"] == pytest.approx(
        hours * prices.vcpu_hour + hours * 2 * prices.gb_hour
    )
    put = est.requests["put"] + est.requests["list"]
    get = est.requests["get"] + est.requests["head"]  # deletes are free
    assert cost["requests_usd"] == pytest.approx(
        put / 1000 * prices.s3_put_per_1000 + get / 1000 * prices.s3_get_per_1000
    )
    total = est + tables_estimate([(1, 100), (0.5, 10)], rates)
    assert total.tasks == 3.5 and total.vcpu_s == 120 + 1.5 * 60


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

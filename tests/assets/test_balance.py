"""The subsets' balance score on known label distributions."""

import math

import pytest

from assets.subsets import balance_score


@pytest.mark.parametrize(
    ("labels", "score"),
    [
        ({"a": 10, "b": 10}, 1.0),  # even
        ({"a": 10, "b": 10, "c": 10, "None": 500}, 1.0),  # unlabelled images are no label
        ({"a": 10}, 0.0),  # one label: nothing to balance
        ({}, 0.0),
        ({"a": 1, "b": 3}, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)),
        ({"a": 98, "b": 1, "c": 1}, 0.101858),  # one label dominates
    ],
)
def test_balance_score_is_the_normalised_entropy_of_the_labels(labels, score):
    assert balance_score(labels) == pytest.approx(score, abs=1e-4)

"""Metric tests: hand examples whose answer you can see, and brute-force pairwise counts on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hyformer.metrics import auc, group_auc, logloss


def brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_hand_examples() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auc([0, 1, 1], [0.2, 0.2, 0.9]) == 0.75  # one tie (1/2) and one win, out of 2 pairs
    assert auc(np.array([True, False]), np.array([3.0, -1.0], dtype=np.float32)) == 1.0


def test_auc_single_class_is_nan() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 10, n) / 10.0  # many ties
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="length"):
        auc([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])


def test_group_auc_hand_example() -> None:
    labels = [0, 1, 1, 0, 1, 1, 0, 0]
    scores = [0.1, 0.9, 0.2, 0.8, 0.5, 0.6, 0.3, 0.3]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    # a: perfect (1.0); b: reversed (0.0); c and d have one class only and are skipped.
    assert group_auc(labels, scores, groups) == 0.5
    assert group_auc([0, 1, 0], [0.2, 0.7, 0.4], [7, 7, 7]) == 1.0
    assert math.isnan(group_auc([1, 1, 0], [0.1, 0.2, 0.3], [1, 1, 2]))
    with pytest.raises(ValueError, match="groups"):
        group_auc([0, 1], [0.1, 0.2], [1])


@pytest.mark.parametrize("seed", range(5))
def test_group_auc_matches_per_group_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    groups = rng.integers(0, 40, n)
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, 8, n) / 8.0
    expected = [
        brute_force_auc(labels[groups == g], scores[groups == g])
        for g in np.unique(groups)
        if 0 < labels[groups == g].sum() < (groups == g).sum()
    ]
    assert group_auc(labels, scores, groups) == pytest.approx(np.mean(expected), abs=1e-12)
    shuffled = rng.permutation(n)
    assert group_auc(labels[shuffled], scores[shuffled], groups[shuffled]) == pytest.approx(np.mean(expected))


def test_logloss_hand_values() -> None:
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7))  # clipped, finite
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert math.isnan(logloss([], []))

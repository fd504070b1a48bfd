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


# --- jobs.evaluate: the oracle split ---------------------------------------------------------------------------------


def _pred(n: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.6, n).astype(np.float32)
    return {
        "label": (rng.random(n) < p).astype(np.float32),
        "prob": rng.random(n).astype(np.float32),
        "request_id": np.repeat(np.arange(n // 4), 4),
        "p_click": p,
    }


def test_partial_oracle_metrics_only_when_their_columns_are_there() -> None:
    from jobs.evaluate import metrics

    pred = _pred()
    base = metrics(pred)
    assert "eval_oracle_auc" in base and not any(k.startswith(("eval_oracle_ns", "eval_oracle_seq")) for k in base)
    nan = np.full(len(pred["label"]), np.nan, np.float32)
    assert metrics(pred | {"p_click_ns": nan, "p_click_seq": nan}) == base  # real logs: NaN ground truth
    rng = np.random.default_rng(1)
    ns, seq = pred["p_click"] * rng.uniform(0.5, 1.5, 400), rng.random(400)
    m = metrics(pred | {"p_click_ns": ns, "p_click_seq": seq})
    assert {k: v for k, v in m.items() if k in base} == base  # the existing keys are unchanged
    y, g = pred["label"], pred["request_id"]
    assert m["eval_oracle_ns_auc"] == auc(y, ns) and m["eval_oracle_ns_query_auc"] == group_auc(y, ns, g)
    assert m["eval_oracle_seq_auc"] == auc(y, seq) and m["eval_oracle_seq_query_auc"] == group_auc(y, seq, g)
    only_ns = metrics(pred | {"p_click_ns": ns})
    assert "eval_oracle_ns_auc" in only_ns and "eval_oracle_seq_auc" not in only_ns


def test_predict_collects_the_partial_oracles_if_the_batches_have_them() -> None:
    import torch

    from jobs.evaluate import metrics, predict

    class Logit(torch.nn.Module):
        def forward(self, batch):
            return batch["x"]

    pred = _pred(8)
    old = [
        {k: torch.from_numpy(v[i : i + 4]) for k, v in pred.items() if k != "prob"} | {"x": torch.zeros(4)}
        for i in (0, 4)
    ]
    out = predict(Logit(), old)  # batches without the new keys (old callers): NaN, and no metric keys
    assert np.isnan(out["p_click_ns"]).all() and np.isnan(out["p_click_seq"]).all() and len(out["p_click_ns"]) == 8
    assert not any("oracle_ns" in k or "oracle_seq" in k for k in metrics(out))
    new = [b | {"p_click_ns": b["p_click"] / 2, "p_click_seq": b["p_click"] / 3} for b in old]
    out = predict(Logit(), new)
    np.testing.assert_array_equal(out["p_click_ns"], pred["p_click"] / 2)
    np.testing.assert_array_equal(out["p_click_seq"], pred["p_click"] / 3)
    assert {"eval_oracle_ns_auc", "eval_oracle_seq_query_auc"} <= set(metrics(out))

"""Offline metrics (numpy only): AUC, query-level group AUC (paper §4.1.3) and log loss."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _check(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y, s


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC as the Mann-Whitney U statistic, tied scores sharing their average rank (a tie counts 1/2).

    Returns nan when only one class is present.
    """
    return group_auc(labels, scores, np.zeros(np.shape(np.ravel(labels)), dtype=np.int64))


def group_auc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """Unweighted mean of the AUCs of the groups (e.g. queries) that contain both labels; nan if none does.

    This is the paper's query-level AUC (§4.1.3). Vectorised: one sort by (group, score), ranks within groups.
    """
    y, s = _check(labels, scores)
    _, codes = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    codes = codes.ravel()
    if codes.shape != y.shape:
        raise ValueError(f"groups and labels differ in length: {codes.shape[0]} vs {y.shape[0]}")
    n = y.shape[0]
    if n == 0:
        return float("nan")
    order = np.lexsort((s, codes))  # by group, then score
    g, s, y = codes[order], s[order], y[order]
    n_groups = int(g[-1]) + 1
    group_size = np.bincount(g, minlength=n_groups)
    group_start = np.cumsum(group_size) - group_size  # first sorted position of each group
    # Tie blocks: runs of equal (group, score). Each row gets its block's average 1-based rank within its group.
    new_block = np.ones(n, dtype=bool)
    new_block[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    block_start = np.flatnonzero(new_block)
    block_size = np.diff(np.append(block_start, n))
    block_rank = block_start + (block_size + 1) / 2.0  # average 1-based rank over the whole array
    rank = block_rank[np.cumsum(new_block) - 1] - group_start[g]  # (n,) rank within the row's group
    n_pos = np.bincount(g, weights=y, minlength=n_groups)
    n_neg = group_size - n_pos
    pos_rank_sum = np.bincount(g, weights=rank * y, minlength=n_groups)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    u = pos_rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0  # Mann-Whitney U of each group
    return float(np.mean(u / (n_pos[ok] * n_neg[ok])))


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 - eps]; nan for empty input."""
    y, p = _check(labels, probs)
    if y.shape[0] == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))

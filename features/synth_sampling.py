"""Sampling primitives of the synthetic log generator (``features.synth``): link functions, Zipf weights, inverse-CDF
draws from one distribution or one per row, weighted draws within groups (``Grouped``) and distinct draws per row.

They draw by inverse CDF from ``rng.random`` rather than ``rng.choice``, so that a seed gives the same data across
numpy versions.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of an (n, k) matrix."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def zipf(n: int, s: float) -> np.ndarray:
    """Probabilities ``∝ (rank+1)^-s`` over ranks 0..n-1."""
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def choice(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """``n`` draws from one distribution ``p`` (inverse CDF, stable across numpy versions)."""
    cdf = np.cumsum(p)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(p) - 1)


def choice_rows(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One draw per row of the (n, k) probability matrix ``p``."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(axis=1), p.shape[1] - 1)


class Grouped:
    """Members (0..n-1) grouped by a key, each group a weighted distribution: draw a member of given groups at once.

    Keys ``group + cdf-within-group`` are sorted, so ``searchsorted(keys, g + u)`` lands in group g for u in [0, 1).
    Every group 0..n_groups-1 must be non-empty.
    """

    def __init__(self, group: np.ndarray, weight: np.ndarray, n_groups: int):
        order = np.lexsort((np.arange(len(group)), group))
        g, w = group[order], weight[order]
        counts = np.bincount(g, minlength=n_groups)
        if (counts == 0).any():
            raise ValueError(f"empty groups: {np.flatnonzero(counts == 0)[:10]}")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        cum = np.cumsum(w)
        base = np.repeat(cum[starts] - w[starts], counts)  # cumulative weight before each group
        total = np.repeat(np.add.reduceat(w, starts), counts)
        within = (cum - base) / total
        self.ends = np.cumsum(counts) - 1  # last position of each group
        within[self.ends] = 1.0
        self.members, self.keys = order, g + within

    def sample(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.keys, groups + rng.random(groups.shape), side="right")
        return self.members[np.minimum(idx, self.ends[groups])]  # g + u may round up to g + 1


def first_distinct(pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``pool``, the first ``k`` distinct values in column order, and whether the row has ``k`` of them."""
    n, m = pool.shape
    order = np.argsort(pool, axis=1, kind="stable")
    srt = np.take_along_axis(pool, order, axis=1)
    first_sorted = np.ones((n, m), dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    rank = np.cumsum(first, axis=1) - 1
    keep = first & (rank < k)
    out = np.full((n, k), -1, dtype=pool.dtype)
    rows, cols = np.nonzero(keep)
    out[rows, rank[rows, cols]] = pool[rows, cols]
    return out, first.sum(axis=1) >= k

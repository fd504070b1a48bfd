"""The counting baseline every ranking engineer checks a model against: smoothed positive rates, no learning but a
logistic regression on top.

For each key (e.g. the item, the user, the query and the query x item cross) the smoothed positive rate of the key
over the training rows, ``(clicks + m * prior) / (impressions + m)`` with the global rate as prior and ``m``
pseudo-impressions (``smoothing``), enters as ``logit(rate)`` together with ``log(1 + impressions)`` (how much the
rate can be trusted) into a logistic regression fitted on the training rows:

    p = sigmoid(b + sum_k w_k * logit(rate_k) + v_k * log(1 + n_k))

The rates the regression is fitted on are *out of fold* (target encoding with K folds grouped by request): a row's own
label never enters the rate it is scored with, or rare keys would look perfectly predictive on the training rows and
useless on new ones. Held-out rows use the rates of all training rows; an unseen key gets the prior.

numpy only (no torch): ``fit`` on the training rows' key columns and labels, ``predict`` probabilities for any rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


def _rates(
    train_keys: np.ndarray, train_y: np.ndarray, keys: np.ndarray, prior: float, m: float
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed positive rate and impression count of each of ``keys``, counted over (train_keys, train_y)."""
    if len(train_keys) == 0:
        return np.full(len(keys), prior), np.zeros(len(keys))
    uniq, inv = np.unique(train_keys, return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    c = np.bincount(inv, weights=train_y, minlength=len(uniq))
    pos = np.minimum(np.searchsorted(uniq, keys), len(uniq) - 1)
    seen = uniq[pos] == keys
    n_k, c_k = np.where(seen, n[pos], 0.0), np.where(seen, c[pos], 0.0)
    return (c_k + m * prior) / (n_k + m), n_k


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, iters: int = 50) -> np.ndarray:
    """Weights (intercept first) of an L2-regularised logistic regression, by Newton's method (IRLS)."""
    X = np.column_stack([np.ones(len(x)), x])
    w = np.zeros(X.shape[1])
    reg = l2 * len(x) * np.eye(X.shape[1])
    reg[0, 0] = 0.0  # the intercept is not shrunk
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + reg @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


@dataclass
class CountingBaseline:
    """Smoothed positive rates of ``keys`` combined by a logistic regression (module doc)."""

    smoothing: float = 20.0  # m: pseudo-impressions at the global rate added to every key's counts
    folds: int = 5  # K of the out-of-fold rates the regression is fitted on
    l2: float = 1e-4  # ridge strength of the regression (per row)
    train_keys: dict[str, np.ndarray] = field(default_factory=dict)
    train_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: np.ndarray | None = None

    def features(
        self, keys: Mapping[str, np.ndarray], train_keys: Mapping[str, np.ndarray], train_y: np.ndarray
    ) -> np.ndarray:
        """(rows, 2K): logit of the smoothed rate and log(1 + impressions) of each key, counted on the train rows."""
        prior = float(train_y.mean()) if len(train_y) else 0.5
        cols = []
        for name in self.train_keys:  # the order (and names) of fit
            rate, n = _rates(np.asarray(train_keys[name]), train_y, np.asarray(keys[name]), prior, self.smoothing)
            cols += [_logit(rate), np.log1p(n)]
        return np.column_stack(cols)

    def fit(self, keys: Mapping[str, np.ndarray], y: np.ndarray, groups: np.ndarray) -> CountingBaseline:
        """Fit on training rows: ``keys`` name -> (rows,) int ids, ``y`` 0/1 labels, ``groups`` (rows,) request ids
        (rows of one request share a fold)."""
        y = np.asarray(y, dtype=np.float64)
        if not keys or len(y) == 0:
            raise ValueError("CountingBaseline.fit needs at least one key column and one row")
        for name, col in keys.items():
            if len(col) != len(y):
                raise ValueError(f"CountingBaseline.fit: key {name!r} has {len(col)} rows, labels {len(y)}")
        self.train_keys, self.train_y = {k: np.asarray(v) for k, v in keys.items()}, y
        fold = np.unique(np.asarray(groups), return_inverse=True)[1] % self.folds
        x = np.zeros((len(y), 2 * len(keys)))
        for f in range(self.folds):
            out, inside = fold == f, fold != f
            x[out] = self.features(
                {k: v[out] for k, v in self.train_keys.items()},
                {k: v[inside] for k, v in self.train_keys.items()},
                y[inside],
            )
        self.weights = fit_logistic(x, y, self.l2)
        return self

    def predict(self, keys: Mapping[str, np.ndarray]) -> np.ndarray:
        """Click probabilities of rows with the same key columns, from the rates of every training row."""
        if self.weights is None:
            raise RuntimeError("CountingBaseline.predict before fit")
        x = self.features(keys, self.train_keys, self.train_y)
        return 1.0 / (1.0 + np.exp(-(self.weights[0] + x @ self.weights[1:])))

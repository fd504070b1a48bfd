"""Expand stored samples (sequence pointers) into the fixed-shape arrays the model reads.

The model's input contract (``hyformer.model``): ``ns_<group>`` (B, F_g) ids, ``seq_<s>`` (B, L_s, F_e) ids with
the most recent event first, ``len_<s>`` (B,). This is numpy only, vectorised over the batch: one gather per field.
It runs inside Ray Data ``map_batches`` just before the training workers, so only pointers are stored on disk.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from features.build import N_DT_BUCKETS, NS_GROUPS, SEQ_FIELDS, FeatureConfig

EVENT_FIELDS = ("item", "author", "category", "action")  # stored per event; "dt" is computed against the sample's ts


class Timeline:
    """One timeline (all users) as CSR arrays: the events of user u are rows ``start[u] : start[u] + count[u]``."""

    def __init__(self, df: pl.DataFrame):
        df = df.sort("user_id", maintain_order=True)  # shards are concatenated; keep each user's order
        users = df["user_id"].to_numpy()
        self.user_ids, self.start = np.unique(users, return_index=True)
        self.ts = df["ts"].to_numpy()
        self.fields = {f: df[f].to_numpy().astype(np.int64) for f in EVENT_FIELDS}

    def __len__(self) -> int:
        return len(self.ts)

    def user_start(self, user_ids: np.ndarray) -> np.ndarray:
        """Row of each user's first event (0 for users without events; their ranges are empty anyway)."""
        if len(self.user_ids) == 0:
            return np.zeros(len(user_ids), dtype=np.int64)
        pos = np.clip(np.searchsorted(self.user_ids, user_ids), 0, len(self.user_ids) - 1)
        return np.where(self.user_ids[pos] == user_ids, self.start[pos], 0)

    def gather(self, user_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, now_ts: np.ndarray, length: int):
        """Events ``[lo, hi)`` of each user's timeline, most recent first, padded to ``length``.

        Returns ``(ids (B, length, len(SEQ_FIELDS)) int64, lens (B,) int64)``; padding ids are 0.
        """
        lo, hi = lo.astype(np.int64), hi.astype(np.int64)
        lens = np.clip(hi - np.maximum(lo, hi - length), 0, length)  # (B,)
        j = np.arange(length)
        valid = j[None, :] < lens[:, None]  # (B, L)
        rows = self.user_start(user_ids)[:, None] + hi[:, None] - 1 - j[None, :]  # (B, L) most recent first
        rows = np.where(valid, rows, 0)
        out = np.zeros((len(user_ids), length, len(SEQ_FIELDS)), dtype=np.int64)
        if len(self) == 0:
            return out, lens
        for k, f in enumerate(SEQ_FIELDS):
            if f == "dt":
                minutes = np.maximum(now_ts[:, None] - self.ts[rows], 0) / 60_000.0
                vals = np.minimum(1 + np.floor(np.log2(1 + minutes)), N_DT_BUCKETS - 1).astype(np.int64)
            else:
                vals = self.fields[f][rows]
            out[:, :, k] = np.where(valid, vals, 0)
        return out, lens


class Materializer:
    """Callable for Ray Data ``map_batches``: sample pointers -> model arrays. Holds the timelines in memory."""

    def __init__(self, timelines: dict[str, pl.DataFrame], cfg: FeatureConfig):
        self.cfg = cfg
        self.timelines = {name: Timeline(df) for name, df in timelines.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        users, ts = batch["user_id"].astype(np.int64), batch["ts"].astype(np.int64)
        out: dict[str, np.ndarray] = {
            f"ns_{g}": np.stack([batch[f"ns_{c}"].astype(np.int64) for c, _ in cols], axis=1) for g, cols in NS_GROUPS.items()
        }
        ranges = {
            "long": ("search_by_ts", np.zeros_like(batch["long_hi"]), batch["long_hi"]),
            "search": ("search_by_cat", batch["search_lo"], batch["search_hi"]),
            "feed": ("feed_by_cat", batch["feed_lo"], batch["feed_hi"]),
        }
        for name, (timeline, lo, hi) in ranges.items():
            out[f"seq_{name}"], out[f"len_{name}"] = self.timelines[timeline].gather(users, lo, hi, ts, self.cfg.seq_len(name))
        out["label"] = batch["label"].astype(np.float32)
        out["request_id"] = batch["request_id"].astype(np.int64)
        p = batch.get("p_click")  # synthetic ground truth, for the oracle AUC only; NaN where the logs have none
        out["p_click"] = np.full(len(users), np.nan, np.float32) if p is None else p.astype(np.float32)
        return out

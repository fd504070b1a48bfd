"""The quality suites' data: a feature window built from synthetic or real logs by the real jobs, its training,
validation and held-out samples, and their materialised batches, cached so that every model of a seed trains on the
very same batches (benchmarks/quality.py runs the suites)."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from benchmarks.common import synthesize_cached
from features.build import FeatureConfig
from features.materialize import Materializer, Timelines
from features.synth import SynthConfig
from jobs.build_features import FeatureSet

END = dt.date(2026, 11, 22)  # the synthetic window's last day


def synthetic_window(work: str, scale: float, days: int, long_len: int) -> FeatureSet:
    """Synthetic logs of ``days`` days ending at END (per-day traffic x ``scale``; cached in ``work``), ingested and
    built into a feature window."""
    cfg = SynthConfig(days=days).scaled(scale)
    data = f"{work}/data"
    synthesize_cached(cfg, data, END)
    return logs_window(data, END, days, FeatureConfig(long_len=long_len, search_len=50, feed_len=50))


def logs_window(data_dir: str, end: dt.date, days: int, cfg: FeatureConfig) -> FeatureSet:
    """The ``days``-day window ending at ``end`` of the raw logs in ``data_dir`` (the log contract, e.g. written by
    ``jobs.import_logs``), ingested and built by the real jobs on a local Ray cluster (stopped afterwards)."""
    import ray

    from jobs.build_features import logs_to_features
    from jobs.common import init_ray

    init_ray()
    try:
        return logs_to_features(data_dir, end, days, cfg)[1]
    finally:
        ray.shutdown()


def read_samples(fs: FeatureSet, days: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The stored samples of ``days`` as numpy columns (what a Ray Data batch holds), in stored order."""
    frame = pl.read_parquet(fs.sample_files(days)).drop("day")
    if frame.height == 0:
        raise ValueError(f"{fs.root}: no samples on days {days[0]}..{days[-1]}")
    return {c: frame[c].to_numpy() for c in frame.columns}


@dataclass
class Window:
    """The training and held-out samples of a feature window, their events, and materialised batches, cached per
    (read-side config, order): every model of a seed trains on the very same batches."""

    fs: FeatureSet
    eval_days: int
    val_days: int = 0  # days before the held-out ones kept out of training to choose the epoch (early stopping)
    batch_size: int = 256

    def __post_init__(self) -> None:
        n = len(self.fs.days)
        if not (self.eval_days >= 1 and self.val_days >= 0 and self.eval_days + self.val_days < n):
            raise ValueError(
                f"--eval-days {self.eval_days} + --val-days {self.val_days}: "
                f"the window has {n} days (need >= 1 training day)"
            )
        first_val, first_eval = n - self.eval_days - self.val_days, n - self.eval_days
        self.train_days, self.eval_day_list = self.fs.days[:first_val], self.fs.days[first_eval:]
        self.val_day_list = self.fs.days[first_val:first_eval]
        self.train = read_samples(self.fs, self.train_days)
        self.eval = read_samples(self.fs, self.eval_day_list)
        self.val = read_samples(self.fs, self.val_day_list) if self.val_days else None
        self.timelines: Timelines = self.fs.timelines()
        self._cache: dict[tuple, list[dict[str, torch.Tensor]]] = {}

    @property
    def n_train(self) -> int:
        return len(self.train["label"])

    @property
    def n_eval(self) -> int:
        return len(self.eval["label"])

    def _batches(self, cfg: FeatureConfig, split: str, order: np.ndarray, key: tuple) -> list[dict[str, torch.Tensor]]:
        key = (json.dumps(cfg.to_dict(), sort_keys=True), split, *key)
        if key not in self._cache:
            if split == "train":  # keep one seed's training batches at a time (every config's), and every eval set
                self._cache = {k: v for k, v in self._cache.items() if k[1] != "train" or k[2] == key[2]}
            cols = {"train": self.train, "eval": self.eval, "val": self.val}[split]
            m = Materializer(self.timelines, cfg)
            self._cache[key] = [
                {k: torch.from_numpy(v) for k, v in m({c: a[idx] for c, a in cols.items()}).items()}
                for idx in np.array_split(order, max(1, math.ceil(len(order) / self.batch_size)))
            ]
        return self._cache[key]

    def train_batches(self, cfg: FeatureConfig, seed: int, epoch: int) -> list[dict[str, torch.Tensor]]:
        order = np.random.default_rng([seed, epoch]).permutation(self.n_train)
        return self._batches(cfg, "train", order, (seed, epoch))

    def eval_batches(self, cfg: FeatureConfig, split: str = "eval") -> list[dict[str, torch.Tensor]]:
        """The held-out rows (``split="val"``: the validation rows) in stored order."""
        return self._batches(cfg, split, np.arange(len(getattr(self, split)["label"])), ())

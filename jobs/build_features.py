"""Build point-in-time features for a window: Ray Data tasks, one per user shard, Polars inside each task.

    python -m jobs.build_features --data-dir /abs/data --date 2026-11-22 --days 70

Reads the clean tables written by ``jobs.ingest`` and writes, atomically (a temporary folder renamed into place)::

    <data>/features/v1/end=<date>/samples/shard-KKKK.parquet          pointers + non-sequential ids, sorted by day
    <data>/features/v1/end=<date>/timelines/<name>/shard-KKKK.parquet         per-user event timelines
    <data>/features/v1/end=<date>/meta.json                                   config, vocabularies, counts

Every clean impression of the window becomes exactly one sample (checked). See ``features.build`` for the format.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import ray

from features.build import POINTER_COLUMNS, FeatureConfig, build_shard, plan_vocab
from features.schema import DAY_FORMAT, DIM_TABLES, parse_day, window
from jobs.common import absolute, clean_root, features_root, init_ray, log, setup_logging

TIMELINES = ("search_by_ts", "search_by_cat", "feed_by_cat")


@dataclass(frozen=True)
class FeatureSet:
    """Where a built feature window lives and what it holds."""

    root: str
    cfg: FeatureConfig
    days: tuple[str, ...]  # YYYY-MM-DD, oldest first
    samples: int

    def sample_files(self) -> list[str]:
        return sorted(glob.glob(f"{self.root}/samples/*.parquet"))

    def timelines(self) -> dict[str, pl.DataFrame]:
        return {t: pl.read_parquet(f"{self.root}/timelines/{t}/*.parquet") for t in TIMELINES}

    @staticmethod
    def load(root: str) -> "FeatureSet":
        with open(f"{root}/meta.json") as f:
            meta = json.load(f)
        return FeatureSet(root, FeatureConfig(**meta["config"]), tuple(meta["days"]), meta["samples"])


def scan_clean(data_dir: str, table: str, days: list[str] | None = None) -> pl.LazyFrame:
    lf = pl.scan_parquet(
        f"{clean_root(data_dir)}/{table}/**/*.parquet", hive_partitioning=True, try_parse_hive_dates=False
    )
    return lf if days is None else lf.filter(pl.col("day").is_in(days))


def build_shard_task(batch: dict[str, np.ndarray], data_dir: str, out: str, days: list[str], cfg: FeatureConfig) -> dict:
    """Ray Data UDF: build one user shard (``user_id mod n_shards == shard``) and write its files."""
    shard = int(batch["shard"][0])
    mine = (pl.col("user_id") % cfg.n_shards) == shard
    dims = {t: pl.scan_parquet(f"{clean_root(data_dir)}/{t}/*.parquet") for t in DIM_TABLES}
    res = build_shard(
        scan_clean(data_dir, "impressions", days).filter(mine),
        scan_clean(data_dir, "search_events", days).filter(mine),
        scan_clean(data_dir, "feed_events", days).filter(mine),
        dims,
        cfg,
    )
    name = f"shard-{shard:04d}.parquet"
    # One file per shard (few files keep Ray Data's per-file overhead low); sorted by day so that row-group
    # statistics let a reader skip the days it does not want.
    os.makedirs(f"{out}/samples", exist_ok=True)
    res["samples"].write_parquet(f"{out}/samples/{name}", row_group_size=8192)
    for t in TIMELINES:
        os.makedirs(f"{out}/timelines/{t}", exist_ok=True)
        res[t].write_parquet(f"{out}/timelines/{t}/{name}")
    seq_events = res["samples"].select(POINTER_COLUMNS)
    return {
        "shard": np.array([shard]),
        "samples": np.array([res["samples"].height]),
        "events": np.array([res["search_by_ts"].height + res["feed_by_cat"].height]),
        "long_hi_mean": np.array([float(seq_events["long_hi"].mean() or 0.0)]),
    }


def build_features(data_dir: str, end: dt.date, days: int = 70, cfg: FeatureConfig | None = None) -> FeatureSet:
    """Features of every impression in the ``days`` days ending at ``end``; replaces an earlier build atomically."""
    data_dir = absolute(data_dir)
    cfg = cfg or FeatureConfig()
    day_list = [d.strftime(DAY_FORMAT) for d in window(end, days)]
    dims = {t: pl.read_parquet(f"{clean_root(data_dir)}/{t}/*.parquet") for t in DIM_TABLES}
    cfg = replace(cfg, vocab=plan_vocab(dims, cfg))
    root = features_root(data_dir, end.strftime(DAY_FORMAT))
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    shards = ray.data.from_items([{"shard": k} for k in range(cfg.n_shards)], override_num_blocks=cfg.n_shards)
    stats = shards.map_batches(
        build_shard_task, batch_size=1, fn_kwargs={"data_dir": data_dir, "out": tmp, "days": day_list, "cfg": cfg}
    ).take_all()
    n_samples = sum(int(s["samples"]) for s in stats)
    n_imps = scan_clean(data_dir, "impressions", day_list).select(pl.len()).collect().item()
    if n_samples != n_imps:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"build_features: {n_samples} samples for {n_imps} clean impressions in the window")
    meta = {"config": cfg.to_dict(), "days": day_list, "samples": n_samples, "shards": sorted(stats, key=lambda s: s["shard"])}
    with open(f"{tmp}/meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    old = f"{root}.old-{uuid.uuid4().hex[:8]}"
    if os.path.exists(root):
        os.rename(root, old)
    os.rename(tmp, root)
    shutil.rmtree(old, ignore_errors=True)
    log.info("features: %d samples over %d days in %d shards -> %s", n_samples, len(day_list), cfg.n_shards, root)
    return FeatureSet(root, cfg, tuple(day_list), n_samples)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build point-in-time sequence + non-sequential features (Ray Data + Polars).")
    p.add_argument("--data-dir", default="data", help="project data directory (reads clean/, writes features/)")
    p.add_argument("--date", required=True, type=parse_day, help="last day of the window, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=70, help="window length in days")
    p.add_argument("--long-len", type=int, default=3000, help="max long-term sequence length (paper: 3000)")
    p.add_argument("--shards", type=int, default=4, help="user shards = Ray tasks")
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    fs = build_features(a.data_dir, a.date, a.days, FeatureConfig(long_len=a.long_len, n_shards=a.shards))
    print(json.dumps({"root": fs.root, "samples": fs.samples, "days": len(fs.days)}))


if __name__ == "__main__":
    main()

"""Build point-in-time features incrementally: one day at a time, Ray Data tasks per user shard, Polars inside.

    python -m jobs.build_features --data-dir /abs/data --date 2026-11-22 --days 70

A *store* (``<data>/features/v2/<store_id>/``, one per write-side config, see ``FeatureConfig.store_id``) holds one
folder per built day::

    store.json                          write-side config and the frozen vocabularies
    day=D/samples/shard-KKKK.parquet    non-sequential ids + ordinals (features.build)
    day=D/events/<stream>/shard-KKKK.parquet   the day's events, bucketised
    day=D/state/<stream>/shard-KKKK.parquet    cumulative (user, key) counts after day D
    day=D/_meta.json                    fingerprint chain: fp = H(parent fp, input fp, store id, BUILD_VERSION), counts
    window-<end>-<N>d.json              what training reads: days, sample count, read-side config

Building a window builds only the days whose fingerprint is stale (new day, re-ingested input, rebuilt parent) —
normally just the newest day — from the previous day's state. A run writes into a temporary folder and swaps each
finished day in with renames: a failure leaves the store as it was, a re-run replaces a day whole.
Every clean impression of a built day becomes exactly one sample (checked per day).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import hashlib
import json
import os
import resource
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
import ray

from features.build import (
    BUILD_VERSION,
    RELEVANCE,
    SIDE_INFO,
    STREAMS,
    FeatureConfig,
    build_day,
    empty_state,
    plan_vocab,
)
from features.materialize import Timelines
from features.schema import DAY_FORMAT, DIM_TABLES, parse_day, previous_day, window
from jobs.common import (
    DEFAULT_DATA_DIR,
    absolute,
    atomic_write_json,
    clean_root,
    init_ray,
    log,
    replace_dir,
    setup_logging,
)
from jobs.ingest import TableCounts, ingest

STORE_VERSION = 2
READ_SIDE = ("long_len", "search_len", "feed_len", "side_info")


def store_root(data_dir: str, cfg: FeatureConfig) -> str:
    return f"{data_dir}/features/v{STORE_VERSION}/{cfg.store_id()}"


@dataclass(frozen=True)
class FeatureSet:
    """A training window over a feature store: ``days`` (oldest first; the last is held out) and their samples."""

    root: str  # the store
    cfg: FeatureConfig  # frozen vocab + this window's read-side choices (lengths, side info)
    days: tuple[str, ...]
    samples: int
    built: tuple[str, ...] = ()  # days (re)built by the call that wrote this window

    def sample_files(self, days: list[str] | tuple[str, ...] | None = None) -> list[str]:
        return [f for d in (days or self.days) for f in sorted(glob.glob(f"{self.root}/day={d}/samples/*.parquet"))]

    def timelines(self) -> Timelines:
        return Timelines.load(self.root, self.days)

    def path(self) -> str:
        return f"{self.root}/window-{self.days[-1]}-{len(self.days)}d.json"

    def with_read_side(self, **kw) -> FeatureSet:
        """Same stored data, other lengths / side info (``long_len``, ``search_len``, ``feed_len``, ``side_info``)."""
        return replace(self, cfg=replace(self.cfg, **kw))

    @staticmethod
    def load(path: str) -> FeatureSet:
        """From a ``window-*.json`` written by ``build_features``."""
        with open(path) as f:
            w = json.load(f)
        return FeatureSet(
            os.path.dirname(os.path.abspath(path)),
            FeatureConfig(**w["config"]),
            tuple(w["days"]),
            w["samples"],
            tuple(w.get("built", ())),
        )


def clean_day_files(data_dir: str, table: str, day: str) -> list[str]:
    return sorted(glob.glob(f"{clean_root(data_dir)}/{table}/day={day}/*.parquet"))


def input_fingerprint(data_dir: str, day: str) -> str:
    """Names, sizes and mtimes of the day's clean files (ingest rewrites a day only when its raw input changed)."""
    h = hashlib.sha1()
    for t in ("impressions", *STREAMS.values()):
        for f in clean_day_files(data_dir, t, day):
            st = os.stat(f)
            h.update(f"{t}/{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def chain_fp(parent: str | None, inputs: str, store_id: str) -> str:
    return hashlib.sha1(f"{parent}|{inputs}|{store_id}|v{BUILD_VERSION}".encode()).hexdigest()


def read_meta(root: str, day: str) -> dict | None:
    try:
        with open(f"{root}/day={day}/_meta.json") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def scan_day(data_dir: str, table: str, day: str) -> pl.LazyFrame:
    files = clean_day_files(data_dir, table, day)
    if not files:
        raise FileNotFoundError(f"no clean {table} for day={day} under {clean_root(data_dir)}: run jobs.ingest first")
    return pl.scan_parquet(files).with_columns(pl.lit(day).alias("day"))


def read_state(root: str, day: str, stream: str, shard: int) -> pl.LazyFrame:
    f = f"{root}/day={day}/state/{stream}/shard-{shard:04d}.parquet"
    return pl.scan_parquet(f) if os.path.exists(f) else empty_state()


def build_shard_days(
    batch: dict[str, np.ndarray], data_dir: str, root: str, tmp: str, days: list[str], prev: str, cfg: FeatureConfig
) -> dict:
    """Ray Data UDF: days ``days`` (in order) of one user shard; starts from day ``prev``'s stored state."""
    shard = int(batch["shard"][0])
    mine = (pl.col("user_id") % cfg.n_shards) == shard
    dims = {t: pl.scan_parquet(f"{clean_root(data_dir)}/{t}/*.parquet") for t in DIM_TABLES}
    state = {s: read_state(root, prev, s, shard) for s in STREAMS}
    name = f"shard-{shard:04d}.parquet"
    stats = {"shard": [], "day": [], "samples": [], "events": [], "peak_rss_mb": []}
    for day in days:
        res = build_day(
            scan_day(data_dir, "impressions", day).filter(mine),
            {s: scan_day(data_dir, t, day).filter(mine) for s, t in STREAMS.items()},
            state,
            dims,
            cfg,
        )
        for part, df in res.items():
            os.makedirs(f"{tmp}/day={day}/{part}", exist_ok=True)
            df.write_parquet(f"{tmp}/day={day}/{part}/{name}", statistics=False)
        state = {s: res[f"state/{s}"].lazy() for s in STREAMS}
        stats["shard"].append(shard)
        stats["day"].append(day)
        stats["samples"].append(res["samples"].height)
        stats["events"].append(sum(res[f"events/{s}"].height for s in STREAMS))
        stats["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # this worker, so far
    return {k: np.array(v) for k, v in stats.items()}


def open_store(data_dir: str, cfg: FeatureConfig) -> tuple[str, FeatureConfig]:
    """The store for ``cfg``'s write side; created (vocabularies planned from the dims) if new, else its frozen
    vocab."""
    root = store_root(data_dir, cfg)
    if os.path.exists(f"{root}/store.json"):
        with open(f"{root}/store.json") as f:
            vocab = json.load(f)["vocab"]
        return root, replace(cfg, vocab=vocab)
    dims = {t: pl.read_parquet(f"{clean_root(data_dir)}/{t}/*.parquet") for t in DIM_TABLES}
    cfg = replace(cfg, vocab=plan_vocab(dims, cfg))
    os.makedirs(root, exist_ok=True)
    write_side = {k: v for k, v in cfg.to_dict().items() if k not in READ_SIDE}
    atomic_write_json(f"{root}/store.json", {"version": STORE_VERSION, "store_id": cfg.store_id(), **write_side})
    return root, cfg


def stale_days(
    root: str, data_dir: str, day_list: list[str], store_id: str, force: bool
) -> tuple[list[str], dict[str, dict]]:
    """Days of the window to (re)build: from the first whose stored fingerprint differs from the expected one on.

    Also returns each day's expected ``{"fp", "inputs"}`` (what its ``_meta.json`` will hold once built).
    """
    parent = (read_meta(root, previous_day(day_list[0])) or {}).get("fp")
    expected, first_stale = {}, None
    for i, d in enumerate(day_list):
        inputs = input_fingerprint(data_dir, d)
        parent = chain_fp(parent, inputs, store_id)
        expected[d] = {"fp": parent, "inputs": inputs}
        if first_stale is None and (force or (read_meta(root, d) or {}).get("fp") != parent):
            first_stale = i
    return ([] if first_stale is None else day_list[first_stale:]), expected


def build_features(
    data_dir: str, end: dt.date, days: int = 70, cfg: FeatureConfig | None = None, force: bool = False
) -> FeatureSet:
    """Make sure every day of the ``days``-day window ending at ``end`` is built; return the window."""
    data_dir = absolute(data_dir)
    cfg = cfg or FeatureConfig()
    day_list = [d.strftime(DAY_FORMAT) for d in window(end, days)]
    root, cfg = open_store(data_dir, cfg)
    todo, expected = stale_days(root, data_dir, day_list, cfg.store_id(), force)
    if todo:
        prev = previous_day(todo[0])
        tmp = f"{root}/.tmp-{uuid.uuid4().hex[:8]}"
        log.info(
            "features: building %d day(s) %s..%s in %d shards (store %s)",
            len(todo),
            todo[0],
            todo[-1],
            cfg.n_shards,
            root,
        )
        try:
            shards = ray.data.from_items([{"shard": k} for k in range(cfg.n_shards)], override_num_blocks=cfg.n_shards)
            kw = {"data_dir": data_dir, "root": root, "tmp": tmp, "days": todo, "prev": prev, "cfg": cfg}
            stats = pl.DataFrame(shards.map_batches(build_shard_days, batch_size=1, fn_kwargs=kw).take_all())
            per_day = stats.group_by("day").agg(
                pl.col("samples").sum(), pl.col("events").sum(), pl.col("peak_rss_mb").max(), pl.len().alias("shards")
            )
            for row in per_day.sort("day").iter_rows(named=True):
                d = row["day"]
                n_imps = scan_day(data_dir, "impressions", d).select(pl.len()).collect().item()
                if row["samples"] != n_imps or row["shards"] != cfg.n_shards:
                    raise RuntimeError(
                        f"build_features day={d}: {row['samples']} samples for {n_imps} clean impressions"
                    )
                meta = {"day": d, **expected[d], **row}
                atomic_write_json(f"{tmp}/day={d}/_meta.json", meta)
            for (
                d
            ) in todo:  # oldest first: an interrupted swap leaves a consistent prefix (later days re-check as stale)
                replace_dir(f"{tmp}/day={d}", f"{root}/day={d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("features: all %d days up to date in %s", len(day_list), root)
    n = sum(read_meta(root, d)["samples"] for d in day_list)
    fs = FeatureSet(root, cfg, tuple(day_list), n, tuple(todo))
    atomic_write_json(fs.path(), {"days": day_list, "samples": n, "built": todo, "config": cfg.to_dict()})
    log.info(
        "features: window %s..%s = %d samples (%d day(s) built) -> %s",
        day_list[0],
        day_list[-1],
        n,
        len(todo),
        fs.path(),
    )
    return fs


def add_feature_arguments(p: argparse.ArgumentParser) -> None:
    """The data directory and the feature window's settings, shared by the workflows (read back by feature_config)."""
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="project data directory (logs/, clean/, features/, mlflow/, train/, tune/); default ./data",
    )
    p.add_argument("--long-len", type=int, default=128, help="long-term sequence length (paper: 3000)")
    p.add_argument(
        "--side-info",
        type=int,
        default=7,
        choices=sorted(SIDE_INFO),
        help="side-info types per sequence event (paper Table 3: 3 or 7)",
    )
    p.add_argument(
        "--relevance", default="category", choices=RELEVANCE, help="relevance filter of the search/feed sequences"
    )
    p.add_argument(
        "--relevance-keys",
        default=None,
        help="folder with items.parquet/queries.parquet (id, key), for --relevance keys",
    )


def feature_config(a: argparse.Namespace) -> FeatureConfig:
    """The FeatureConfig of the flags add_feature_arguments added."""
    return FeatureConfig(
        long_len=a.long_len, side_info=a.side_info, relevance=a.relevance, relevance_keys=a.relevance_keys
    )


def _call(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def logs_to_features(
    data_dir: str,
    end: dt.date,
    days: int,
    cfg: FeatureConfig,
    force: bool = False,
    step: Callable = _call,
) -> tuple[dict[str, TableCounts], FeatureSet]:
    """What every entry point that trains needs first: ingest the ``days``-day window ending at ``end`` (unchanged
    days are skipped), then build its features (only stale days unless ``force``). ``step(name, fn, *args)`` runs
    each part; the workflows pass jobs.common.stage, which names the part that failed. Returns the ingest counts per
    table and the feature window."""
    counts = step("ingest", ingest, data_dir, end, days)
    return counts, step("features", build_features, data_dir, end, days, cfg, force=force)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Build point-in-time sequence + non-sequential features incrementally (Ray Data + Polars)."
    )
    p.add_argument("--data-dir", default="data", help="project data directory (reads clean/, writes features/)")
    p.add_argument("--date", required=True, type=parse_day, help="last day of the window, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=70, help="window length in days")
    p.add_argument("--long-len", type=int, default=3000, help="max long-term sequence length (paper: 3000); read side")
    p.add_argument(
        "--side-info", type=int, default=7, choices=sorted(SIDE_INFO), help="side-info types per event; read side"
    )
    p.add_argument("--relevance", default="category", choices=RELEVANCE, help="search/feed relevance filter")
    p.add_argument(
        "--relevance-keys",
        default=None,
        help="folder with items.parquet/queries.parquet (id, key) for --relevance keys",
    )
    p.add_argument("--shards", type=int, default=4, help="user shards = Ray tasks")
    p.add_argument("--force", action="store_true", help="rebuild every day of the window")
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    cfg = FeatureConfig(
        long_len=a.long_len,
        side_info=a.side_info,
        relevance=a.relevance,
        relevance_keys=a.relevance_keys,
        n_shards=a.shards,
    )
    fs = build_features(a.data_dir, a.date, a.days, cfg, force=a.force)
    print(json.dumps({"window": fs.path(), "samples": fs.samples, "days": len(fs.days)}))


if __name__ == "__main__":
    main()

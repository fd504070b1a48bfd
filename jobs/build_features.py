"""Build point-in-time features incrementally: one day at a time, Ray Data tasks per user shard, Polars inside.

    python -m jobs.build_features --data-dir /abs/data --date 2026-11-22 --days 70

A *store* (``<data>/features/v2/<store_id>/``, one per write-side config, see ``FeatureConfig.store_id``) holds one
folder per built day::

    store.json                                    write-side config and the frozen vocabularies
    day=D/<version>/samples/shard-KKKK.parquet    non-sequential ids + ordinals (features.build)
    day=D/<version>/events/<stream>/shard-KKKK.parquet   the day's events, bucketised
    day=D/<version>/state/<stream>/shard-KKKK.parquet    cumulative (user, key) counts after day D
    day=D/_meta.json        the day's pointer (features.storage): version, files, counts, and the fingerprint chain
                            fp = H(parent fp, input fp, store id, BUILD_VERSION)
    window-<end>-<N>d.json  what training reads: days, sample count, read-side config

Building a window builds only the days whose fingerprint is stale (new day, re-ingested input, rebuilt parent) —
normally just the newest day — from the previous day's state. A run writes each day under a new version and commits
the finished days by writing their pointers, oldest first: a failure leaves every pointer as it was, a re-run
replaces a day whole. The input fingerprint is the versions of the day's committed clean partitions (ingest makes a
new version whenever a day's raw content changes). Every clean impression of a built day becomes exactly one sample
(checked per day). The store's root may be a local folder or an ``s3://`` (``gs://``, ``abfs://``) URI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
import ray

from features import storage
from features.build import (
    BUILD_VERSION,
    RELEVANCE,
    SIDE_INFO,
    FeatureConfig,
    build_day,
    empty_state,
    plan_vocab,
)
from features.materialize import Timelines
from features.schema import DAY_FORMAT, DIM_TABLES, TABLES, parse_day, previous_day, window
from features.shards import Layout, UserSlice
from features.spec import EVENT_TABLES
from jobs.common import DEFAULT_DATA_DIR, clean_root, init_ray, log, setup_logging
from jobs.ingest import MANIFEST, MAX_QUARANTINE_SHARE, TableCounts, add_quarantine_argument, clean_files, ingest
from jobs.lease import cli_lock
from jobs.progress import Progress

STORE_VERSION = 2
READ_SIDE = ("long_len", "search_len", "feed_len", "side_info")
META = "_meta.json"  # a built day's pointer


def parts(cfg: FeatureConfig) -> tuple[str, ...]:
    """The parts of a built day (features.build.build_day): samples, and each stream's events and state."""
    return ("samples", *(f"events/{s}" for s in cfg.streams()), *(f"state/{s}" for s in cfg.streams()))


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
        return [f for d in (days or self.days) for f in day_files(self.root, d, "samples")]

    def layout(self) -> Layout:
        """Where the window's files are (features.shards): each day's pointer, read once; what readers get."""
        before = previous_day(self.days[0])
        metas = {d: built_meta(self.root, d) for d in self.days}
        if (first := read_meta(self.root, before)) is not None:
            metas[before] = first
        return Layout(self.root, self.cfg.n_shards, self.days, before, metas, tuple(self.cfg.streams()))

    def timelines(self, owner: UserSlice | None = None) -> Timelines:
        """The window's events and the state before its first day (features.materialize.Timelines): every user's,
        or ``owner``'s only."""
        return self.layout().timelines(owner)

    def path(self) -> str:
        return f"{self.root}/window-{self.days[-1]}-{len(self.days)}d.json"

    def with_read_side(self, **kw) -> FeatureSet:
        """Same stored data, other lengths / side info (``long_len``, ``search_len``, ``feed_len``, ``side_info``)."""
        return replace(self, cfg=replace(self.cfg, **kw))

    @staticmethod
    def load(path: str) -> FeatureSet:
        """From a ``window-*.json`` written by ``build_features``."""
        path = storage.absolute(path)
        w = storage.read_json(path)
        return FeatureSet(
            storage.parent(path),
            FeatureConfig(**w["config"]),
            tuple(w["days"]),
            w["samples"],
            tuple(w.get("built", ())),
        )


def built_meta(root: str, day: str) -> dict:
    """The pointer of a built day; FileNotFoundError naming the day when it is not built."""
    meta = read_meta(root, day)
    if meta is None:
        raise FileNotFoundError(f"feature day {day} is not built in {root} (no {META}): run jobs.build_features")
    return meta


def part_files(root: str, day: str, meta: dict, part: str) -> list[str]:
    """The committed files of one part (``samples``, ``events/<stream>``, ``state/<stream>``) of a built day."""
    return [f for f in storage.files_of(f"{root}/day={day}", meta) if storage.parent(f).endswith(f"/{part}")]


def day_files(root: str, day: str, part: str) -> list[str]:
    """``part_files`` of a built day, its pointer read from storage."""
    return part_files(root, day, built_meta(root, day), part)


def event_tables(cfg: FeatureConfig) -> list[str]:
    """The daily tables a store reads: impressions and the event tables of its sequences (``cfg.tables()``'s)."""
    return [t for t in cfg.tables() if TABLES[t].daily]


def input_fingerprint(data_dir: str, day: str, cfg: FeatureConfig) -> str:
    """The committed versions of the day's clean partitions (ingest commits a new version exactly when the day's raw
    content or the rules changed)."""
    h = hashlib.sha1()
    for t in event_tables(cfg):
        m = storage.current(f"{clean_root(data_dir)}/{t}/day={day}", MANIFEST) or {}
        h.update(f"{t}:{m.get('version')};".encode())
    return h.hexdigest()


def chain_fp(parent: str | None, inputs: str, store_id: str) -> str:
    return hashlib.sha1(f"{parent}|{inputs}|{store_id}|v{BUILD_VERSION}".encode()).hexdigest()


def read_meta(root: str, day: str) -> dict | None:
    """The committed pointer of a built day, or None."""
    return storage.current(f"{root}/day={day}", META)


def scan_day(data_dir: str, table: str, day: str) -> pl.LazyFrame:
    try:
        files = clean_files(data_dir, table, day)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no clean {table} for day={day} under {clean_root(data_dir)}: run jobs.ingest first"
        ) from None
    return storage.scan_parquet(files).with_columns(pl.lit(day).alias("day"))


def read_dims(
    data_dir: str, cfg: FeatureConfig, lazy: bool = False, files: Callable[[str], list[str]] | None = None
) -> dict[str, pl.DataFrame | pl.LazyFrame]:
    """The clean dimension snapshots the spec reads (``cfg.tables()``; ``files``: another source, table -> its
    files); a table it does not read (queries, for a feed-only spec) is an empty frame of the contract's columns, so
    the joins leave its features missing."""
    files = files or (lambda t: clean_files(data_dir, t))
    wanted, tables = cfg.tables(), cfg.contract()
    out: dict[str, pl.DataFrame | pl.LazyFrame] = {}
    for t in DIM_TABLES:
        if t not in wanted:
            out[t] = pl.from_arrow(tables[t].schema.empty_table())
        else:
            out[t] = (storage.scan_parquet if lazy else storage.read_parquet)(files(t))
    return out


def read_state(root: str, meta: dict | None, stream: str, shard: int) -> pl.LazyFrame:
    """One shard's state of a built day (``meta``: its pointer), or the empty state before the store's first day."""
    rel = f"state/{stream}/shard-{shard:04d}.parquet"
    if meta is None or rel not in meta["files"]:
        return empty_state()
    return storage.scan_parquet([storage.join(f"{root}/day={meta['day']}", meta["version"], rel)])


def build_shard_days(
    batch: dict[str, np.ndarray],
    data_dir: str,
    root: str,
    version: str,
    days: list[str],
    prev: dict | None,
    cfg: FeatureConfig,
) -> Iterator[dict]:
    """Ray Data UDF: days ``days`` (in order) of one user shard, written under ``version`` of each day; starts from
    the stored state of the day before (``prev``: its pointer; None before the store's first day). Yields one row of
    stats per day, as it is written (the driver's progress)."""
    shard = int(batch["shard"][0])
    mine = (pl.col("user_id") % cfg.n_shards) == shard
    dims = {t: d.lazy() for t, d in read_dims(data_dir, cfg, lazy=True).items()}
    state = {s: read_state(root, prev, s, shard) for s in cfg.streams()}
    tables = event_tables(cfg)[1:]
    name = f"shard-{shard:04d}.parquet"
    for day in days:
        res = build_day(
            scan_day(data_dir, "impressions", day).filter(mine),
            {EVENT_TABLES[t]: scan_day(data_dir, t, day).filter(mine) for t in tables},
            state,
            dims,
            cfg,
        )
        for part, df in res.items():
            storage.write_parquet(df, storage.join(f"{root}/day={day}", version, part, name), statistics=False)
        state = {s: res[f"state/{s}"].lazy() for s in cfg.streams()}
        yield {
            "shard": np.array([shard]),
            "day": np.array([day]),
            "samples": np.array([res["samples"].height]),
            "events": np.array([sum(res[f"events/{s}"].height for s in cfg.streams())]),
            "peak_rss_mb": np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]),  # this worker so far
        }


def open_store(data_dir: str, cfg: FeatureConfig) -> tuple[str, FeatureConfig]:
    """The store for ``cfg``'s write side; created (vocabularies planned from the dims) if new, else its frozen
    vocab."""
    root = store_root(data_dir, cfg)
    if (store := storage.read_json_or_none(f"{root}/store.json")) is not None:
        return root, replace(cfg, vocab=store["vocab"])
    cfg = replace(cfg, vocab=plan_vocab(read_dims(data_dir, cfg), cfg))
    write_side = {k: v for k, v in cfg.to_dict().items() if k not in READ_SIDE}
    storage.write_json(f"{root}/store.json", {"version": STORE_VERSION, "store_id": cfg.store_id(), **write_side})
    return root, cfg


def stale_days(
    root: str, data_dir: str, day_list: list[str], cfg: FeatureConfig, force: bool
) -> tuple[list[str], dict[str, dict]]:
    """Days of the window to (re)build: from the first whose stored fingerprint differs from the expected one on.

    Also returns each day's expected ``{"fp", "inputs"}`` (what its ``_meta.json`` will hold once built).
    """
    parent = (read_meta(root, previous_day(day_list[0])) or {}).get("fp")
    expected, first_stale, store_id = {}, None, cfg.store_id()
    for i, d in enumerate(day_list):
        inputs = input_fingerprint(data_dir, d, cfg)
        parent = chain_fp(parent, inputs, store_id)
        expected[d] = {"fp": parent, "inputs": inputs}
        if first_stale is None and (force or (read_meta(root, d) or {}).get("fp") != parent):
            first_stale = i
    return ([] if first_stale is None else day_list[first_stale:]), expected


def build_features(
    data_dir: str, end: dt.date, days: int = 70, cfg: FeatureConfig | None = None, force: bool = False
) -> FeatureSet:
    """Make sure every day of the ``days``-day window ending at ``end`` is built; return the window."""
    data_dir = storage.absolute(data_dir)
    cfg = cfg or FeatureConfig()
    day_list = [d.strftime(DAY_FORMAT) for d in window(end, days)]
    root, cfg = open_store(data_dir, cfg)
    todo, expected = stale_days(root, data_dir, day_list, cfg, force)
    if todo:
        version = storage.new_version()
        log.info(
            "features: building %d day(s) %s..%s in %d shards (store %s)",
            len(todo),
            todo[0],
            todo[-1],
            cfg.n_shards,
            root,
        )
        shards = ray.data.from_items([{"shard": k} for k in range(cfg.n_shards)], override_num_blocks=cfg.n_shards)
        prev = read_meta(root, previous_day(todo[0]))
        kw = {"data_dir": data_dir, "root": root, "version": version, "days": todo, "prev": prev, "cfg": cfg}
        rows = []
        with Progress("features", total=cfg.n_shards * len(todo), unit="shard-days") as bar:
            for row in shards.map_batches(build_shard_days, batch_size=1, fn_kwargs=kw).iter_rows():
                rows.append(row)
                bar.update()
        stats = pl.DataFrame(rows)
        per_day = stats.group_by("day").agg(
            pl.col("samples").sum(), pl.col("events").sum(), pl.col("peak_rss_mb").max(), pl.len().alias("shards")
        )
        metas = {}
        for row in per_day.sort("day").iter_rows(named=True):
            d = row["day"]
            n_imps = scan_day(data_dir, "impressions", d).select(pl.len()).collect().item()
            if row["samples"] != n_imps or row["shards"] != cfg.n_shards:
                raise RuntimeError(f"build_features day={d}: {row['samples']} samples for {n_imps} clean impressions")
            files = [f"{part}/shard-{k:04d}.parquet" for part in parts(cfg) for k in range(cfg.n_shards)]
            metas[d] = {"version": version, "files": files, "day": d, **expected[d], **row}
        for d in todo:  # oldest first: an interrupted commit leaves a consistent prefix (later days re-check as stale)
            storage.publish(f"{root}/day={d}", metas[d], META)
        for d in todo:
            storage.collect_garbage(f"{root}/day={d}", META)
    else:
        log.info("features: all %d days up to date in %s", len(day_list), root)
    n = sum(read_meta(root, d)["samples"] for d in day_list)
    fs = FeatureSet(root, cfg, tuple(day_list), n, tuple(todo))
    storage.write_json(fs.path(), {"days": day_list, "samples": n, "built": todo, "config": cfg.to_dict()})
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
    """The data directory and the feature window's settings, shared by the workflows (read back by feature_config);
    also the ingest's quarantine limit (``--max-quarantine-share``). The feature flags override single values of
    the experiment file's ``features`` section (jobs.experiment) and default to it."""
    add_quarantine_argument(p)
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="project data directory (logs/, clean/, features/, mlflow/, train/, tune/); default ./data",
    )
    p.add_argument("--long-len", type=int, default=None, help="long-term sequence length (demo: 128, paper: 3000)")
    p.add_argument(
        "--side-info",
        type=int,
        default=None,
        choices=sorted(SIDE_INFO),
        help="side-info types per sequence event (paper Table 3: 3 or 7; default 7)",
    )
    p.add_argument("--relevance", default=None, choices=RELEVANCE, help="what a relevance key is (default: category)")
    p.add_argument(
        "--relevance-keys",
        default=None,
        help="folder with items.parquet/queries.parquet (id, key), for --relevance keys",
    )


def feature_config(a: argparse.Namespace, base: FeatureConfig | None = None) -> FeatureConfig:
    """``base`` (the experiment's features; the demo's without one) with the flags add_feature_arguments added that
    were given. ``--long-len`` sets the length of the sequence named ``long``."""
    cfg = base or FeatureConfig(long_len=128)
    given = {k: getattr(a, k) for k in ("side_info", "relevance", "relevance_keys") if getattr(a, k) is not None}
    if a.long_len is not None:
        if cfg.sequences is None:
            given["long_len"] = a.long_len
        elif "long" in cfg.sequences:
            given["sequences"] = cfg.sequences | {"long": replace(cfg.sequences["long"], length=a.long_len)}
        else:
            raise ValueError(f"--long-len: the feature spec has no sequence named long ({list(cfg.sequences)})")
    return replace(cfg, **given)


def _call(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def logs_to_features(
    data_dir: str,
    end: dt.date,
    days: int,
    cfg: FeatureConfig,
    force: bool = False,
    step: Callable = _call,
    max_quarantine_share: float = MAX_QUARANTINE_SHARE,
) -> tuple[dict[str, TableCounts], FeatureSet]:
    """What every entry point that trains needs first: ingest the ``days``-day window ending at ``end`` (unchanged
    days are skipped), then build its features (only stale days unless ``force``). ``step(name, fn, *args)`` runs
    each part; the workflows pass jobs.common.stage, which names the part that failed. Returns the ingest counts per
    table and the feature window."""
    counts = step(
        "ingest",
        ingest,
        data_dir,
        end,
        days,
        max_quarantine_share=max_quarantine_share,
        tables=cfg.tables(),
        contract=cfg.contract(),
    )
    return counts, step("features", build_features, data_dir, end, days, cfg, force=force)


def main(argv: list[str] | None = None) -> None:
    # pydantic, torch (the model section): in the CLI's process only, not in every Ray Data worker building features
    from jobs.experiment import add_config_arguments, data_defaults, experiment_of_argv  # noqa: PLC0415

    p = argparse.ArgumentParser(
        description="Build point-in-time sequence + non-sequential features incrementally (Ray Data + Polars)."
    )
    p.add_argument("--date", required=True, type=parse_day, help="last day of the window, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=70, help="window length in days")
    add_feature_arguments(p)  # --data-dir, --long-len, --side-info, --relevance(-keys): override the file's
    add_config_arguments(p)
    p.add_argument("--shards", type=int, default=None, help="user shards = Ray tasks (default 4)")
    p.add_argument("--force", action="store_true", help="rebuild every day of the window")
    exp = experiment_of_argv(p, argv, "build_features")
    if exp is not None:
        p.set_defaults(**data_defaults(exp))
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    cfg = feature_config(a, exp.features if exp else FeatureConfig())
    if a.shards is not None:
        cfg = replace(cfg, n_shards=a.shards)
    with cli_lock(a.data_dir):
        fs = build_features(a.data_dir, a.date, a.days, cfg, force=a.force)
    print(json.dumps({"window": fs.path(), "samples": fs.samples, "days": len(fs.days)}))


if __name__ == "__main__":
    main()

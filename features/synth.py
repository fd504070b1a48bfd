"""Synthetic interaction logs in the log contract (``features.schema``), with a click process built so that the
paper's claims can be tested: long user histories, drifting interests, query-relevant history, position and context.

Command (default sizes, about a million rows, a few seconds)::

    python -m features.synth --data-dir data --end 2026-01-31 --days 70 --users 2000 --items 5000 --authors 400 \
        --queries 800 --categories 16 --requests-per-day 400 --candidates 10 --search-events-per-day 4000 \
        --feed-events-per-day 6000 --seed 0

It writes ``<data-dir>/logs/v1/<table>/day=YYYY-MM-DD/part-0.parquet`` for impressions, search_events and feed_events
(one partition per day of the window) and ``<data-dir>/logs/v1/<table>/part-0.parquet`` for users, items and queries,
then prints a JSON summary. It refuses to write over an existing logs root unless ``--overwrite`` is given.

Ids: every id (user, item, author, query, category, city, request) starts at 0 (the contract allows 0); the dimension
tables hold every id 0..n-1, so they cover every id used in the daily tables. Authors have no dimension table.

Generative story, one module per part (each module's docstring tells its part; the numbers there are the defaults of
``SynthConfig``, in ``features.synth_config``, whose field names are in brackets)
- ``features.synth_world``: the world, drawn once per seed: categories, authors, items, queries, users, their
  interests and favourite authors.
- ``features.synth_behaviour``: every day, drifting interests, search requests and their ranked candidates,
  engagement, extra search clicks and feed events.
- ``features.synth_clicks``: the click model, ``p_click`` (what the oracle AUC rests on) and its halves
  ``p_click_ns`` and ``p_click_seq``.
- ``features.synth_sampling`` holds the sampling primitives, ``features.synth_writer`` the contract tables and the
  Parquet writes. This module composes them: ``generate`` and the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time

import numpy as np

from features import storage
from features.schema import DAY_FORMAT, GROUND_TRUTH, TABLES, day_start_ms, logs_root, parse_day, table_dir, window
from features.synth_behaviour import drift, simulate_day
from features.synth_config import SynthConfig
from features.synth_world import build_world
from features.synth_writer import dimension_tables, to_table, write_atomic

__all__ = ["SynthConfig", "generate", "main"]


def generate(cfg: SynthConfig, data_dir: str, end: dt.date, overwrite: bool = False) -> dict:
    """Write ``cfg.days`` days of logs ending at ``end`` (inclusive) and the dimension snapshots; return a summary.

    Refuses (``FileExistsError``) when the logs root already exists, unless ``overwrite``: then the six table folders
    are removed first, so no partition of an earlier run survives.
    """
    t0 = time.perf_counter()
    root = logs_root(data_dir)
    if storage.exists(root):
        if not overwrite:
            raise FileExistsError(f"{root} exists; pass overwrite=True (--overwrite) to replace it")
        for name in TABLES:
            storage.remove(table_dir(root, name))
    days = window(end, cfg.days)
    world = build_world(cfg, day_start_ms(days[0]))

    rows_per_day: dict[str, dict[str, int]] = {name: {} for name in TABLES if TABLES[name].daily}
    clicks = impressions = 0
    p_sum = dict.fromkeys(GROUND_TRUTH, 0.0)
    z = world.interest0
    request_id = 0
    for i, day in enumerate(days):
        if i > 0:
            z = drift(cfg, world, z, np.random.default_rng([cfg.seed, 2, i]))
        tables = {name: to_table(name, cols) for name, cols in simulate_day(cfg, world, z, day, i, request_id).items()}
        request_id += cfg.requests_per_day
        for name, table in tables.items():
            write_atomic(table, table_dir(root, name, day))
            rows_per_day[name][day.strftime(DAY_FORMAT)] = table.num_rows
        imp = tables["impressions"]
        impressions += imp.num_rows
        clicks += int(np.asarray(imp["label"]).sum())
        for k in GROUND_TRUTH:
            p_sum[k] += float(np.asarray(imp[k], dtype=np.float64).sum())
    dims = dimension_tables(world)
    for name, table in dims.items():
        write_atomic(table, table_dir(root, name))

    rows = {name: sum(per_day.values()) for name, per_day in rows_per_day.items()}
    rows.update({name: t.num_rows for name, t in dims.items()})
    return {
        "data_dir": data_dir,
        "root": root,
        "first_day": days[0].strftime(DAY_FORMAT),
        "end": end.strftime(DAY_FORMAT),
        "days": cfg.days,
        "seed": cfg.seed,
        "rows": rows,
        "rows_per_day": rows_per_day,
        "ctr": clicks / max(impressions, 1),
        **{f"mean_{k}": p_sum[k] / max(impressions, 1) for k in GROUND_TRUTH},
        "paths": {name: table_dir(root, name) for name in TABLES},
        "seconds": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------------------------------------------- CLI

SIZE_FLAGS = (
    "days",
    "users",
    "items",
    "authors",
    "queries",
    "categories",
    "requests_per_day",
    "candidates",
    "search_events_per_day",
    "feed_events_per_day",
    "seed",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m features.synth",
        description=(
            "Generate synthetic HyFormer interaction logs (impressions with true p_click, search and feed events, "
            "users/items/queries snapshots) in the log contract under DATA_DIR/logs/v1, and print a JSON summary. "
            "The click process (drifting interests, history-only author affinity, query relevance, position and "
            "context effects) is described in the docstrings of features/synth_behaviour.py and "
            "features/synth_clicks.py."
        ),
    )
    parser.add_argument("--data-dir", required=True, help="output root; logs go to DATA_DIR/logs/v1/<table>/")
    parser.add_argument("--end", required=True, type=parse_day, help="last day of the window (YYYY-MM-DD, UTC)")
    parser.add_argument("--tiny", action="store_true", help="start from SynthConfig.tiny() instead of the defaults")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing logs root")
    defaults = SynthConfig()
    for name in SIZE_FLAGS:
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {getattr(defaults, name)}"
        )
    args = parser.parse_args(argv)
    base = SynthConfig.tiny() if args.tiny else defaults
    cfg = dataclasses.replace(base, **{k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None})
    try:
        summary = generate(cfg, args.data_dir, args.end, overwrite=args.overwrite)
    except FileExistsError as e:
        parser.exit(2, f"error: {e}\n")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return summary


if __name__ == "__main__":
    main()

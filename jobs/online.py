"""Publish the online feature source (features.online) of a built feature window, for serving.

    python -m jobs.online --data-dir /abs/data --model models:/hyformer@champion --date 2026-11-22

The daily workflow calls ``publish_source`` after each day's features are built, so the source always holds the
newest day: every event of that day, and before it each user's latest events as far as the store's sequences read
(``features.online.retention``), with the clean profiles and the relevance keys. It is written under a new version
of ``<data>/online/<store id>`` and committed by its ``_manifest.json`` (``features.storage``), which states the
time of its data (``day``, ``exact_from_ts``: requests from then on get exactly the training features, ``end_ts``);
readers of the previous version keep it until they reload. The CLI publishes the source a registered model reads
(its feature store, its training window), e.g. for a champion of another store than today's features.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time

import polars as pl

from features import storage
from features.build import FeatureConfig, relevance_tables
from features.online import DIM_KEYS, EVENT_SCHEMA, SOURCE_VERSION, retain, retention
from features.schema import DAY_FORMAT, MS_PER_DAY, day_start_ms, parse_day
from jobs.build_features import FeatureSet, read_dims
from jobs.common import log, setup_logging

ONLINE = "online"  # <data>/online/<store id>: the published sources


def online_root(data_dir: str, cfg: FeatureConfig) -> str:
    """Where the online source of ``cfg``'s feature store is published."""
    return storage.join(data_dir, ONLINE, cfg.store_id())


def publish_source(data_dir: str, fs: FeatureSet, root: str | None = None) -> dict:
    """Write and commit the online source of window ``fs`` (its last day is the newest) at ``root`` (default
    ``online_root``); returns its manifest. The events kept per stream are the most any source of this root kept
    (models of one store may read different lengths); a source of a newer day is kept as it is (a backfill)."""
    t0 = time.perf_counter()
    cfg, layout, last = fs.cfg, fs.layout(), fs.days[-1]
    root, version = root or online_root(data_dir, cfg), storage.new_version()
    since = day_start_ms(parse_day(last))
    committed = storage.current(root)
    if committed is not None and committed.get("source_version") == SOURCE_VERSION and committed["day"] > last:
        log.info("online source: %s holds %s, newer than %s: kept (a backfill)", root, committed["day"], last)
        return committed
    keep = retention(cfg)
    if committed is not None and committed.get("store_id") == cfg.store_id():
        # kept events only grow: the other models of this store (e.g. a champion reading longer sequences) still fit
        for s, (n_all, n_key) in committed.get("retention", {}).items():
            if s in keep:
                keep[s] = (max(keep[s][0], n_all), max(keep[s][1], n_key))
    files, counts = [], {}
    for s, (n_all, n_key) in keep.items():
        parts = []
        for shard in range(layout.n_shards):  # one shard's window at a time
            scans = [storage.scan_parquet([f]) for d in fs.days if (f := layout.file(d, f"events/{s}", shard))]
            if scans:
                parts.append(retain(pl.concat(scans), since, n_all, n_key).collect())
        events = pl.concat(parts) if parts else pl.DataFrame(schema=EVENT_SCHEMA)
        rel = f"events/{s}.parquet"
        storage.write_parquet(events, storage.join(root, version, rel))
        files.append(rel)
        counts[s] = {"events": events.height, "users": events["user_id"].n_unique() if events.height else 0}
    dims = {t: d.sort(DIM_KEYS[t]) for t, d in read_dims(data_dir, cfg).items()}
    item_keys, query_keys = relevance_tables(cfg, {t: d.lazy() for t, d in dims.items()})
    for rel, df in (
        *((f"{t}.parquet", d) for t, d in dims.items()),
        ("keys/items.parquet", item_keys.unique("item_id", keep="first").sort("item_id").collect()),
        ("keys/queries.parquet", query_keys.unique("query_id", keep="first").sort("query_id").collect()),
    ):
        storage.write_parquet(df, storage.join(root, version, rel))
        files.append(rel)
    manifest = {
        "version": version,
        "files": files,
        "source_version": SOURCE_VERSION,
        "root": root,
        "store_id": cfg.store_id(),
        "vocab": cfg.vocab,
        "features": cfg.to_dict(),
        "streams": list(keep),
        "retention": {s: list(v) for s, v in keep.items()},
        "day": last,
        "window": [fs.days[0], last],
        "exact_from_ts": since,
        "end_ts": since + MS_PER_DAY,
        "counts": counts | {t: d.height for t, d in dims.items()},
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.publish(root, manifest)
    storage.collect_garbage(root)
    log.info(
        "online source: day %s, %s -> %s (%.1f s)",
        last,
        ", ".join(f"{s}: {c['events']} events of {c['users']} users" for s, c in counts.items()),
        root,
        time.perf_counter() - t0,
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    from jobs.register import load_registered  # noqa: PLC0415 - MLflow at the edge
    from jobs.score import scoring_window  # noqa: PLC0415 - Ray, only for this CLI

    p = argparse.ArgumentParser(description="Publish the online feature source a registered model reads.")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default="models:/hyformer@champion", help="models:/<name>@<alias> or /<version>")
    p.add_argument("--date", required=True, type=parse_day, help="the newest day (its feature window must be built)")
    p.add_argument("--days", type=int, default=None, help="window length (default: the model's training window)")
    a = p.parse_args(argv)
    setup_logging()
    data_dir = storage.absolute(a.data_dir)
    with tempfile.TemporaryDirectory(prefix="hyformer-model-") as tmp:
        reg = load_registered(data_dir, a.model, tmp)
    fs = scoring_window(data_dir, reg.features, a.date.strftime(DAY_FORMAT), a.days or reg.window_days or 1)
    m = publish_source(data_dir, fs)
    print(json.dumps({k: m[k] for k in ("root", "version", "day", "counts")}))


if __name__ == "__main__":
    main()

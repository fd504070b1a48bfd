"""Feature-store benchmark (issue #3): build cost vs window length, stored bytes vs sequence length.

    python -m benchmarks.features                 # full size: ~1.4M impressions, ~5.6M events over 70 days
    python -m benchmarks.features --scale 0.1     # a quick run

Steps, all on a local Ray cluster with the real jobs:
1. synthesise 70 days (cached in ``--work``), ingest them (timed, reported);
2. for windows of 7, 35 and 70 days: a fresh store, ``build_features`` timed; impressions/s and events/s per core,
   peak RSS of the build tasks (each a fresh Ray worker) and of the driver, stored bytes per sample;
3. the daily increment: with the 70-day store built, the newest day deleted and rebuilt alone;
4. read side at L_long = 100 / 1000 / 3000: window events loaded once (time, MB), then batches of 256 samples
   materialised naive (B, L, F) and as dedup tables: ms per batch, bytes per sample, unique-event ratio.

Writes ``benchmarks/results/features.json`` and ``features.md`` (a table). Numbers are for the machine it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import glob
import json
import os
import platform
import resource
import shutil
import time

import numpy as np
import polars as pl
import ray

from benchmarks.common import synthesize_cached, write_results
from features.build import FeatureConfig
from features.materialize import Materializer, unique_ratio
from features.synth import SynthConfig
from jobs.build_features import build_features, store_root
from jobs.common import init_ray, log, setup_logging
from jobs.ingest import ingest

END = dt.date(2026, 11, 22)
FULL = dict(
    users=2000,
    items=20000,
    authors=1000,
    queries=2000,
    requests_per_day=2000,
    search_events_per_day=40000,
    feed_events_per_day=40000,
)
BATCH = 256


def folder_bytes(pattern: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(pattern, recursive=True))


def restart_ray() -> None:
    """A fresh cluster, so that every build's workers start empty (peak RSS is per worker lifetime)."""
    ray.shutdown()
    init_ray()


def synth_and_ingest(work: str, scale: float) -> dict:
    cfg = dataclasses.replace(SynthConfig(), days=70, **FULL).scaled(scale)
    sizes = {k: getattr(cfg, k) for k in FULL}
    data = f"{work}/data"
    t0 = time.perf_counter()
    if synthesize_cached(cfg, data, END):
        log.info("bench: synthesised in %.1f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    counts = ingest(data, END, 70)
    return {
        "data": data,
        "synth": sizes,
        "ingest_seconds": time.perf_counter() - t0,
        "rows": {t: c.clean for t, c in counts.items()},
    }


def build_window(data: str, days: int, cfg: FeatureConfig) -> dict:
    shutil.rmtree(store_root(data, cfg), ignore_errors=True)
    restart_ray()
    t0 = time.perf_counter()
    fs = build_features(data, END, days, cfg)
    wall = time.perf_counter() - t0
    metas = [json.load(open(f"{fs.root}/day={d}/_meta.json")) for d in fs.days]
    events = sum(m["events"] for m in metas)
    cores = os.cpu_count() or 1  # physical parallelism (Ray declares more logical CPUs locally)
    stored = {part: folder_bytes(f"{fs.root}/day=*/v*/{part}/**/*.parquet") for part in ("samples", "events", "state")}
    return {
        "days": days,
        "impressions": fs.samples,
        "events": events,
        "wall_s": wall,
        "s_per_day": wall / days,
        "impressions_per_s_per_core": fs.samples / wall / cores,
        "events_per_s_per_core": events / wall / cores,
        "task_peak_rss_mb": max(m["peak_rss_mb"] for m in metas),
        "bytes_per_sample_samples": stored["samples"] / fs.samples,
        "bytes_per_sample_all": sum(stored.values()) / fs.samples,  # samples + events + state, amortised
        "stored_mb": {k: v / 1e6 for k, v in stored.items()},
        "fs": fs,
    }


def daily_increment(fs) -> dict:
    """Delete the newest day and build the same window again: only that day is built."""
    shutil.rmtree(f"{fs.root}/day={fs.days[-1]}")
    restart_ray()
    t0 = time.perf_counter()
    again = build_features(os.path.dirname(os.path.dirname(os.path.dirname(fs.root))), END, len(fs.days), fs.cfg)
    wall = time.perf_counter() - t0
    built = json.load(open(again.path()))["built"]
    return {"window_days": len(fs.days), "days_built": len(built), "wall_s": wall}


def read_side(fs, lengths: list[int], n_batches: int, stored_bytes_per_sample: float) -> list[dict]:
    samples = pl.read_parquet(fs.sample_files(fs.days[-7:])).head(BATCH * n_batches)  # late samples: long histories
    out = []
    for L in lengths:
        f = fs.with_read_side(long_len=L)
        t0 = time.perf_counter()
        tl = f.timelines()
        load_s = time.perf_counter() - t0
        row = {
            "long_len": L,
            "window_days": len(fs.days),
            "timelines_load_s": load_s,
            "timelines_mb": tl.nbytes() / 1e6,
        }
        for dedup in (False, True):
            m = Materializer(tl, f.cfg, dedup=dedup)
            nbytes, ratios, t = 0, [], 0.0
            for i in range(n_batches):
                part = samples.slice(i * BATCH, BATCH)
                batch = {c: part[c].to_numpy() for c in part.columns if c != "day"}
                t0 = time.perf_counter()
                b = m(batch)
                t += time.perf_counter() - t0
                seq_keys = [k for k in b if k.startswith(("seq_", "uniq_", "inv_"))]
                nbytes += sum(b[k].nbytes for k in seq_keys)
                if dedup:
                    ratios.append(unique_ratio(b))
            key = "dedup" if dedup else "naive"
            row[f"{key}_ms_per_batch"] = 1000 * t / n_batches
            row[f"{key}_seq_bytes_per_sample"] = nbytes / (BATCH * n_batches)
            if dedup:
                row["unique_ratio"] = float(np.mean(ratios))
        row["stored_bytes_per_sample"] = stored_bytes_per_sample  # from the build: the store does not depend on L
        out.append(row)
    return out


def table(res: dict) -> str:
    lines = [
        f"Feature build on {res['machine']}, synthetic logs ({res['synth']}).",
        "",
        "| window days | impressions | events | wall s | s/day | impressions/s/core | events/s/core | task peak RSS MB "
        "| stored B/sample (samples) | stored B/sample (all) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in res["builds"]:
        lines.append(
            f"| {b['days']} | {b['impressions']:,} | {b['events']:,} | {b['wall_s']:.1f} | {b['s_per_day']:.2f} | "
            f"{b['impressions_per_s_per_core']:,.0f} | {b['events_per_s_per_core']:,.0f} | "
            f"{b['task_peak_rss_mb']:.0f} | "
            f"{b['bytes_per_sample_samples']:.1f} | {b['bytes_per_sample_all']:.1f} |"
        )
    inc = res["increment"]
    lines += [
        "",
        f"Daily increment: {inc['days_built']} day built in {inc['wall_s']:.1f} s "
        f"on a {inc['window_days']}-day window.",
        "",
    ]
    lines += [
        "| L_long | timelines load s | timelines MB | naive ms/batch | naive seq B/sample | dedup ms/batch "
        "| dedup seq B/sample | unique ratio | stored B/sample |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["read_side"]:
        lines.append(
            f"| {r['long_len']} | {r['timelines_load_s']:.1f} | {r['timelines_mb']:.0f} | "
            f"{r['naive_ms_per_batch']:.1f} | "
            f"{r['naive_seq_bytes_per_sample']:,.0f} | {r['dedup_ms_per_batch']:.1f} | "
            f"{r['dedup_seq_bytes_per_sample']:,.0f} | "
            f"{r['unique_ratio']:.3f} | {r['stored_bytes_per_sample']:.1f} |"
        )
    lines += [
        "",
        f"Ingest of the 70 days (not part of the feature build): {res['ingest_seconds']:.1f} s. "
        f"Driver peak RSS {res['driver_peak_rss_mb']:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the per-day traffic of the full size")
    p.add_argument("--work", default="/tmp/hyformer-bench-features", help="scratch folder (synthetic data is cached)")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder for features.json / .md"
    )
    p.add_argument("--windows", default="7,35,70")
    p.add_argument("--lengths", default="100,1000,3000")
    p.add_argument("--batches", type=int, default=8, help="batches of 256 per read-side measurement")
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    res = {"machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})", "scale": a.scale}
    res |= synth_and_ingest(a.work, a.scale)
    cfg = FeatureConfig(long_len=3000, n_shards=4)
    res["builds"] = [build_window(res["data"], int(d), cfg) for d in a.windows.split(",")]
    fs = res["builds"][-1].pop("fs")
    for b in res["builds"]:
        b.pop("fs", None)
    res["increment"] = daily_increment(fs)
    lengths = [int(x) for x in a.lengths.split(",")]
    res["read_side"] = read_side(fs, lengths, a.batches, res["builds"][-1]["bytes_per_sample_samples"])
    res["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_results(a.out, "features", res, table(res))


if __name__ == "__main__":
    main()

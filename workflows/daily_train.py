"""Daily training workflow: ingest -> features -> train -> evaluate -> log and register, for one date.

    python workflows/daily_train.py                                  # fresh machine: synthetic logs, local Ray
    python workflows/daily_train.py --date 2026-11-22 --data-dir /abs/data
    ray job submit --working-dir . -- python workflows/daily_train.py --data-dir /abs/data

With no logs under ``<data-dir>/logs`` it first generates a small synthetic window ending at ``--date`` (default:
yesterday, UTC). Without ``--date`` and with existing logs, the newest impressions day is used. The newest day of the
window is held out for evaluation. Exit code 0 on success; 1 when a stage fails, with the stage named.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, also inside a Ray job's working dir

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as dt  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from features.build import RELEVANCE, SIDE_INFO, FeatureConfig  # noqa: E402
from features.schema import DAY_FORMAT, logs_root, parse_day  # noqa: E402
from features.synth import SynthConfig, generate  # noqa: E402
from jobs.build_features import build_features  # noqa: E402
from jobs.common import DEFAULT_DATA_DIR, absolute, init_ray, log, setup_logging  # noqa: E402
from jobs.ingest import ingest  # noqa: E402
from jobs.register import log_failed_run, log_training_run, registered_checkpoint  # noqa: E402
from jobs.train import TrainConfig, add_train_arguments, train, train_config  # noqa: E402

# The small synthetic default: a few minutes end to end on 2 CPU cores.
DEMO_SYNTH = dict(users=1000, items=3000, authors=200, queries=400, requests_per_day=120, search_events_per_day=1500, feed_events_per_day=2500)
DEMO_MODEL = dict(d_model=32, n_heads=2, n_layers=2, ffn_mult=2, head_hidden=(64,))


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage


def stage(name: str, fn, *args, **kwargs):
    """Run one stage, logging its wall time; any failure becomes StageFailed naming the stage."""
    t0 = time.perf_counter()
    log.info("=== stage %s: start", name)
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the stage's name
        log.exception("=== stage %s: FAILED", name)
        raise StageFailed(name, e) from e
    log.info("=== stage %s: done in %.1f s", name, time.perf_counter() - t0)
    return out


def newest_log_day(data_dir: str) -> dt.date | None:
    days = sorted(Path(p).name.removeprefix("day=") for p in glob.glob(f"{logs_root(data_dir)}/impressions/day=*"))
    return parse_day(days[-1]) if days else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="project data directory (logs/, clean/, features/, mlflow/); default ./data")
    p.add_argument("--date", type=parse_day, default=None, help="day to train for (held out for evaluation), YYYY-MM-DD")
    p.add_argument("--days", type=int, default=70, help="window length in days, ending at --date (default 70)")
    p.add_argument("--long-len", type=int, default=128, help="long-term sequence length (paper: 3000)")
    p.add_argument("--side-info", type=int, default=7, choices=sorted(SIDE_INFO), help="side-info types per sequence event (paper Table 3: 3 or 7)")
    p.add_argument("--relevance", default="category", choices=RELEVANCE, help="relevance filter of the search/feed sequences")
    p.add_argument("--relevance-keys", default=None, help="folder with items.parquet/queries.parquet (id, key), for --relevance keys")
    p.add_argument("--rebuild-features", action="store_true", help="rebuild every feature day of the window (default: only stale days)")
    p.add_argument("--synth-scale", type=float, default=1.0, help="multiplies the demo's synthetic request/event counts")
    p.add_argument("--init-from", default=None, help="warm start: 'latest' (newest registered version of --arch), models:/<name>/<version>, models:/<name>@<alias>, or a checkpoint directory")
    p.add_argument("--no-register", action="store_true", help="log the MLflow run but do not register the model")
    add_train_arguments(p, TrainConfig(epochs=1, model=DEMO_MODEL))
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    data_dir = absolute(a.data_dir)
    init_ray()
    date = a.date or newest_log_day(data_dir)
    if date is None or not Path(logs_root(data_dir)).exists():
        date = date or (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1))
        scaled = {k: (max(1, int(v * a.synth_scale)) if k.endswith("_per_day") else v) for k, v in DEMO_SYNTH.items()}
        cfg = dataclasses.replace(SynthConfig(), days=a.days, seed=a.seed, **scaled)
        stage("synthesize", generate, cfg, data_dir, date)
    day = date.strftime(DAY_FORMAT)
    counts = stage("ingest", ingest, data_dir, date, a.days)
    fcfg = FeatureConfig(long_len=a.long_len, side_info=a.side_info, relevance=a.relevance, relevance_keys=a.relevance_keys)
    fs = stage("features", build_features, data_dir, date, a.days, fcfg, force=a.rebuild_features)
    run_name = f"daily-{day}-{int(time.time())}" + ("-noseq" if a.hide_sequences else "")
    init_from = a.init_from and stage("warm-start", registered_checkpoint, data_dir, a.init_from, a.arch, f"{data_dir}/train/warm-start/{run_name}")
    tc = train_config(a, init_from=init_from)
    configs = {"train": tc.to_dict(), "features": fs.cfg.to_dict()}
    tags = {"date": day, "window_days": str(a.days), "hide_sequences": str(a.hide_sequences), "arch": a.arch}
    try:
        res = stage("train", train, fs, tc, f"{data_dir}/train", run_name)
    except StageFailed as e:
        stage("log failure", log_failed_run, data_dir, run_name, e.__cause__, configs, tags)
        raise
    ingest_metrics = {f"ingest_{t}_{k}": float(getattr(c, k)) for t, c in counts.items() for k in ("read", "clean", "quarantined", "skipped_days")}
    run_id, version = stage(
        "register",
        log_training_run,
        data_dir,
        run_name,
        res.checkpoint_dir,
        res.history,
        configs | {"model": res.model_config.to_dict()},
        extra_metrics=ingest_metrics | {"feature_samples": float(fs.samples), "feature_days_built": float(len(fs.built))},
        tags=tags,
        register_as=None if a.no_register else a.arch,
    )
    return {"date": day, "run_id": run_id, "model_version": version, **{k: v for k, v in res.metrics.items() if k.startswith("eval_")}}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        summary = run(a)
    except StageFailed as e:
        print(f"daily_train: {e}", file=sys.stderr)
        return 1
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print("daily_train: done " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

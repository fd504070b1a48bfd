"""Tune the training job with Ray Tune: the window's logs -> features -> Optuna trials (ASHA early stopping) -> the
best config, with MLflow parent/child runs (the search space, the trial and the logging are jobs/tune.py).

    python workflows/tune.py --data-dir /abs/data --date 2026-11-22 --days 14 --samples 8 --epochs 3 --max-concurrent 1
    python workflows/tune.py --features /abs/data/features/v2/<store>/window-2026-11-22-14d.json --smoke-test
    python workflows/tune.py --config configs/demo.yaml --date 2026-11-22 --set tune.samples=4  # its tune section
    python workflows/daily_train.py --train-config /abs/data/tune/<name>/best_config.json   # use the best config

The window is built (incrementally) as the daily workflow does, or read from ``--features``; its newest day is held
out and scored after every epoch. The best config goes to ``<data-dir>/tune/<name>/best_config.json`` (``--out``).
Exit code 0 on success; 1 when a stage fails, with the stage named. See docs/tune.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, also inside a Ray job's working dir

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from features import storage  # noqa: E402
from features.schema import parse_day  # noqa: E402
from jobs.build_features import FeatureSet, add_feature_arguments, feature_config, logs_to_features  # noqa: E402
from jobs.common import Exit, Locked, StageFailed, init_ray, setup_logging, stage  # noqa: E402
from jobs.experiment import (  # noqa: E402
    DataSettings,
    Experiment,
    TuneSettings,
    add_config_arguments,
    data_defaults,
    experiment_of_argv,
)
from jobs.lease import data_dir_lock  # noqa: E402
from jobs.train_config import TrainConfig, add_train_arguments, train_config  # noqa: E402
from jobs.tune import BASE_MODEL, EXPERIMENT, METRIC, SEARCH_SPACE, SMALL_SEARCH_SPACE, TuneOutcome, tune  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--date",
        type=parse_day,
        default=None,
        help="newest day of the window (held out for evaluation), YYYY-MM-DD; needed unless --features",
    )
    p.add_argument("--days", type=int, default=14, help="window length in days, ending at --date (default 14)")
    p.add_argument("--features", default=None, help="a window-*.json of jobs.build_features instead of --date/--days")
    add_feature_arguments(p)
    add_config_arguments(p)
    g = p.add_argument_group("tuning")
    g.add_argument("--samples", type=int, default=8, help="trials (default 8)")
    g.add_argument(
        "--max-concurrent",
        type=int,
        default=1,
        help="trials at a time (each reserves --workers x --cpus-per-worker CPUs)",
    )
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs before it can be stopped")
    g.add_argument(
        "--space",
        default=None,
        help="search space as a JSON file of SEARCH_SPACE's form (default: jobs/tune.py's SEARCH_SPACE)",
    )
    g.add_argument("--small-space", action="store_true", help="the narrow SMALL_SEARCH_SPACE (cheap models)")
    g.add_argument("--smoke-test", action="store_true", help="--small-space, 2 trials of 1 epoch")
    g.add_argument(
        "--name",
        default=None,
        help="tuning name (default tune-<date>-<timestamp>); results under <data-dir>/tune/<name>",
    )
    g.add_argument("--out", default=None, help="best config JSON (default <data-dir>/tune/<name>/best_config.json)")
    g.add_argument(
        "--experiment", dest="mlflow_experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})"
    )
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for another run's lock on the data directory while building the window (default 0)",
    )
    exp = experiment_of_argv(p, argv, "tune")
    if exp is not None:  # the file's settings are the flags' defaults; flags given still win
        p.set_defaults(
            **data_defaults(exp),
            samples=exp.tune.samples,
            max_concurrent=exp.tune.max_concurrent,
            grace_period=exp.tune.grace_period,
        )
    add_train_arguments(p, exp.train if exp else TrainConfig(epochs=3, model=BASE_MODEL))
    a = p.parse_args(argv)
    a.experiment = exp
    if a.features is None and a.date is None:
        p.error("give --date (the window is built from the logs under --data-dir) or --features")
    if a.smoke_test:
        a.small_space, a.samples, a.epochs = True, 2, 1
    return a


def run(a: argparse.Namespace) -> TuneOutcome:
    data_dir = storage.absolute(a.data_dir)
    init_ray()
    if a.features:
        fs = stage("features", FeatureSet.load, a.features)
    else:
        with data_dir_lock(data_dir, a.lock_timeout):  # only while it writes the data directory
            features = feature_config(a, a.experiment.features if a.experiment else None)
            _, fs = logs_to_features(
                data_dir, a.date, a.days, features, step=stage, max_quarantine_share=a.max_quarantine_share
            )
    if a.space:
        with open(a.space) as f:
            space = json.load(f)
    elif a.small_space:
        space = SMALL_SEARCH_SPACE
    else:
        space = (a.experiment.tune.space if a.experiment else None) or SEARCH_SPACE
    name = a.name or f"tune-{fs.days[-1]}-{int(time.time())}"
    base = train_config(a)
    resolved = Experiment(  # what this tuning is, logged with its parent run: --config on it tunes the same again
        data=DataSettings(data_dir, len(fs.days), a.max_quarantine_share),
        features=dataclasses.replace(fs.cfg, vocab={}),
        train=base,
        tune=TuneSettings(space, a.samples, a.max_concurrent, a.grace_period),
    )
    return stage(
        "tune",
        tune,
        fs,
        base,
        data_dir,
        name,
        space,
        a.samples,
        a.max_concurrent,
        a.grace_period,
        a.out,
        a.mlflow_experiment,
        experiment_yaml=resolved.to_yaml(),
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        outcome = run(a)
    except StageFailed as e:
        print(f"tune: {e}", file=sys.stderr)
        return 1
    except Locked as e:
        print(f"tune: {e} (--lock-timeout)", file=sys.stderr)
        return int(Exit.LOCKED)
    summary = {
        "best_config": outcome.best_config_path,
        "trial": outcome.best["trial"],
        METRIC: outcome.best["value"],
        "trials": {t.trial_id: t.status for t in outcome.trials},
        "mlflow_parent_run": outcome.parent_run_id,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print("tune: done " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

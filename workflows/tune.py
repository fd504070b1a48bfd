"""Hyperparameter tuning of the training job with Ray Tune: Optuna search, ASHA early stopping, MLflow parent/child runs.

    python workflows/tune.py --data-dir /abs/data --date 2026-11-22 --days 14 --samples 8 --epochs 3 --max-concurrent 1
    python workflows/tune.py --features /abs/data/features/v2/<store>/window-2026-11-22-14d.json --smoke-test
    python workflows/daily_train.py --train-config /abs/data/tune/<name>/best_config.json   # use the best config

The Ray Train V2 pattern: each trial is a small Tune function (``run_trial``) that turns its sampled parameters into a
``TrainConfig`` and runs ``jobs.train.train`` (one ``TorchTrainer``) with a ``TuneReportCallback``, which forwards
every per-epoch report (``eval_query_auc``, ...) to Tune. ``OptunaSearch`` samples ``SEARCH_SPACE`` (TPE); the ASHA
scheduler stops trials whose ``eval_query_auc`` falls behind at an epoch rung. The window is built (incrementally)
like the daily workflow does, or read from ``--features``. The newest day is held out and scored after every epoch.

MLflow (experiment ``hyformer-tune``): one parent run per tuning (the search space and base config as params; at the
end the best trial's metrics, ``best_config.json`` and a plot of eval_query_auc per trial and epoch) and one child run
per trial (tag ``mlflow.parentRunId``), all written from this driver process (``MLflowLoggerCallback``). The best
config goes to ``<data-dir>/tune/<name>/best_config.json`` (``--out``), read back by ``jobs.train.load_train_overrides``.
Exit code 0 on success; 1 when a stage fails, with the stage named. See docs/tune.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, also inside a Ray job's working dir

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import mlflow  # noqa: E402
import ray  # noqa: E402
import ray.tune  # noqa: E402
from mlflow.entities import Param  # noqa: E402
from ray.air.integrations.mlflow import MLflowLoggerCallback  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from features.build import RELEVANCE, SIDE_INFO, FeatureConfig  # noqa: E402
from features.schema import parse_day  # noqa: E402
from hyformer import HyFormerConfig  # noqa: E402
from jobs.build_features import FeatureSet, atomic_write_json, build_features  # noqa: E402
from jobs.common import DEFAULT_DATA_DIR, StageFailed, absolute, init_ray, log, setup_logging, stage  # noqa: E402
from jobs.ingest import ingest  # noqa: E402
from jobs.register import flat_params, tracking_uri, use_tracking  # noqa: E402
from jobs.train import TrainConfig, add_train_arguments, model_config, train, train_config  # noqa: E402

METRIC, MODE = "eval_query_auc", "max"  # what the search optimises and ASHA compares (jobs.train reports it per epoch)
EXPERIMENT = "hyformer-tune"  # MLflow experiment of the tuning runs (the daily runs live in "hyformer-daily")

# The search space: parameter -> {distribution: arguments}. A key is a TrainConfig field ("lr", "batch_size", ...) or
# "model.<HyFormerConfig field>" (an override of the model config). Distributions: "choice": [values...],
# "uniform"/"loguniform": [low, high], "randint": [low, high) (ints). Edit it here, or pass a JSON file of the same
# form with --space. d_model is moved to the nearest width the model accepts (see fit_width): it must divide by
# n_heads and by T = 3 sequences x n_queries + 5 NS groups.
SEARCH_SPACE: dict[str, dict[str, list]] = {
    "lr": {"loguniform": [5e-4, 1e-2]},  # dense AdamW peak learning rate
    "model.d_model": {"choice": [32, 64, 128]},  # D, the width of every token
    "model.n_layers": {"choice": [1, 2, 3]},  # HyFormer layers
    "model.n_queries": {"choice": [1, 2]},  # N, global queries per sequence
    "model.seq_encoder": {"choice": ["transformer", "longer", "swiglu"]},  # §3.4.1 sequence encoder (every sequence)
}
# --small-space / --smoke-test: the same knobs, narrowed to cheap models (a few minutes on 2 CPU cores)
SMALL_SEARCH_SPACE: dict[str, dict[str, list]] = {
    "lr": {"loguniform": [1e-3, 5e-3]},
    "model.d_model": {"choice": [16, 32]},
    "model.n_layers": {"choice": [1]},
    "model.n_queries": {"choice": [1]},
    "model.seq_encoder": {"choice": ["transformer", "longer"]},
}
# Model overrides every trial starts from (the knobs above are set per trial): the daily workflow's small model.
BASE_MODEL = dict(n_heads=2, ffn_mult=2, head_hidden=(64,))
# The TrainConfig fields written to best_config.json besides the searched ones: what defines the model and its
# optimisation. Run-time fields (workers, gpu, epochs, init_from, seed, ...) stay with the daily workflow's flags.
CONFIG_FIELDS = ("arch", "model", "lr", "weight_decay", "warmup_steps", "clip_norm", "sparse_optimizer", "sparse_lr", "batch_size")


# --- search space and trial configs ----------------------------------------------------------------------------------


def check_space(space: dict[str, dict[str, list]]) -> None:
    """Raise ValueError unless every key names a TrainConfig field or "model.<HyFormerConfig field>" and every
    distribution is one of choice/uniform/loguniform/randint with its arguments."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    model_fields = {f.name for f in dataclasses.fields(HyFormerConfig)}
    for key, dist in space.items():
        if not (key in train_fields or (key.startswith("model.") and key.removeprefix("model.") in model_fields)):
            raise ValueError(f"search space: {key!r} is neither a TrainConfig field nor model.<HyFormerConfig field>")
        if not (isinstance(dist, dict) and len(dist) == 1):
            raise ValueError(f"search space: {key!r} must map to one {{distribution: arguments}}, got {dist!r}")
        (kind, args), = dist.items()
        if kind not in ("choice", "uniform", "loguniform", "randint"):
            raise ValueError(f"search space: {key!r}: unknown distribution {kind!r} (choice, uniform, loguniform, randint)")
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            raise ValueError(f"search space: {key!r}: {kind} takes {'a list of values' if kind == 'choice' else '[low, high]'}, got {args!r}")


def tune_space(space: dict[str, dict[str, list]]) -> dict:
    """The Tune search domains of a SEARCH_SPACE-style dict (OptunaSearch turns them into Optuna distributions)."""
    check_space(space)
    make = {"choice": ray.tune.choice, "uniform": ray.tune.uniform, "loguniform": ray.tune.loguniform, "randint": ray.tune.randint}
    return {key: (make[kind](args) if kind == "choice" else make[kind](*args)) for key, dist in space.items() for kind, args in dist.items()}


def _plain(v):
    """numpy scalars (as a search algorithm may return them) -> Python values (JSON, HyFormerConfig's int checks)."""
    return v.item() if hasattr(v, "item") else v


def fit_width(fs: FeatureSet, model: dict, arch: str) -> dict:
    """``model`` overrides with ``d_model`` moved to the nearest width the architecture accepts (ties: the wider).

    HyFormer's token mixing splits D into T = (queries of all sequences) + (NS tokens) parts and attention splits it
    into heads, so which widths are valid depends on n_queries and n_heads: the space names target widths and each
    trial trains the nearest valid one (recorded in its config). Raises the config's own error when none fits.
    """
    if model.get("d_model") is None:
        model_config(fs, model, arch)  # validates
        return model
    want = int(round(model["d_model"]))
    for d in sorted(range(1, 4 * want + 1), key=lambda d: (abs(d - want), -d)):
        try:
            model_config(fs, model | {"d_model": d}, arch)
        except ValueError:
            continue
        return model | {"d_model": d}
    model_config(fs, model, arch)  # raises the error naming the violated constraint
    return model


def trial_train_config(fs: FeatureSet, base: TrainConfig, params: dict) -> TrainConfig:
    """``base`` with a trial's sampled ``params`` (SEARCH_SPACE keys) applied; the model's width made valid."""
    params = {k: _plain(v) for k, v in params.items()}
    top = {k: v for k, v in params.items() if not k.startswith("model.")}
    model = dict(base.model) | {k.removeprefix("model."): v for k, v in params.items() if k.startswith("model.")}
    arch = top.get("arch", base.arch)
    return dataclasses.replace(base, **top, model=fit_width(fs, model, arch))


def best_train_dict(tc: TrainConfig, space: dict) -> dict:
    """The "train" part of best_config.json: CONFIG_FIELDS and the searched TrainConfig fields of ``tc``."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name in CONFIG_FIELDS or f.name in space]
    return json.loads(json.dumps({n: getattr(tc, n) for n in names}))  # tuples -> lists, as the file holds them


# --- the Tune trial (runs in its own Tune actor) ---------------------------------------------------------------------


def run_trial(config: dict, fs: FeatureSet, base: TrainConfig, storage: str, name: str) -> None:
    """One trial: ``base`` + the sampled ``config`` -> one Ray Train run; every epoch's report goes to Tune."""
    setup_logging()  # this is the trial's own process: the driver's logging and Ray Data settings do not reach it
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    tc = trial_train_config(fs, base, config)
    trial_id = ray.tune.get_context().get_trial_id()
    log.info("trial %s: %s", trial_id, json.dumps({"lr": tc.lr, "model": tc.model}))
    train(fs, tc, storage, f"{name}-{trial_id}", callbacks=[TuneReportCallback()])


# --- the driver ------------------------------------------------------------------------------------------------------


class TrialRuns(MLflowLoggerCallback):
    """One MLflow child run per trial (Ray's MLflowLoggerCallback, in the driver: params = the sampled values, metrics
    = every report), plus the TrainConfig the trial really trained (``train.*``, d_model made valid) and its outcome
    tag (completed, stopped by ASHA, error)."""

    def __init__(self, fs: FeatureSet, base: TrainConfig, **kwargs):
        super().__init__(**kwargs)
        self.fs, self.base = fs, base

    def log_trial_start(self, trial) -> None:
        super().log_trial_start(trial)
        try:
            tc = trial_train_config(self.fs, self.base, trial.config)
        except ValueError:  # a combination the model rejects: the trial itself fails with the message
            return
        params = flat_params("train.", tc.to_dict())
        mlflow.tracking.MlflowClient(self.tracking_uri).log_batch(self._trial_runs[trial], params=[Param(k, v) for k, v in params.items()])

    def log_trial_end(self, trial, failed: bool = False) -> None:
        done = (trial.last_result or {}).get("training_iteration", 0)
        outcome = "error" if failed else ("completed" if done >= self.base.epochs else "stopped")
        mlflow.tracking.MlflowClient(self.tracking_uri).set_tag(self._trial_runs[trial], "outcome", outcome)
        super().log_trial_end(trial, failed)


@dataclass
class TrialSummary:
    trial_id: str
    params: dict  # sampled SEARCH_SPACE values
    status: str  # "completed" (every epoch), "stopped" (by ASHA) or "error"
    history: list[dict[str, float]]  # every report: training_iteration, epoch, eval_* ...
    error: str | None = None


@dataclass
class TuneOutcome:
    best_config_path: str
    best: dict  # the best_config.json document
    trials: list[TrialSummary]
    parent_run_id: str
    searcher: str  # class names of the search algorithm and scheduler that ran
    scheduler: str
    storage: str  # Tune experiment folder (trial folders, Ray Train runs under train/)


def tune(
    fs: FeatureSet,
    base: TrainConfig,
    data_dir: str,
    name: str,
    space: dict[str, dict[str, list]] = SEARCH_SPACE,
    samples: int = 8,
    max_concurrent: int = 1,
    grace_period: int = 1,
    out: str | None = None,
    experiment: str = EXPERIMENT,
) -> TuneOutcome:
    """Tune ``space`` around ``base`` on window ``fs``: ``samples`` trials of ``base.epochs`` epochs each (Optuna TPE,
    ASHA on ``eval_query_auc`` per epoch), ``max_concurrent`` at a time. Logs the MLflow parent run and one child run
    per trial; writes the best config to ``out`` (default ``<data_dir>/tune/<name>/best_config.json``).

    Raises RuntimeError when no trial reported the metric.
    """
    data_dir = absolute(data_dir)
    storage = f"{data_dir}/tune/{name}"
    out = absolute(out or f"{storage}/best_config.json")
    if base.checkpoint_every:
        log.info("tune: checkpoint_every=%d -> 0 (step reports carry no %s and would count as ASHA iterations)", base.checkpoint_every, METRIC)
        base = dataclasses.replace(base, checkpoint_every=0)
    domains = tune_space(space)
    trial_train_config(fs, base, {})  # a base config the model rejects fails here, not in every trial
    searcher = OptunaSearch(seed=base.seed)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs, grace_period=min(grace_period, base.epochs), reduction_factor=2)

    exp_id = use_tracking(data_dir, experiment)
    client = mlflow.tracking.MlflowClient()
    parent = client.create_run(exp_id, run_name=name, tags={"kind": "tune", "metric": METRIC, "window_end": fs.days[-1], "window_days": str(len(fs.days))})
    parent_id = parent.info.run_id
    try:
        params = flat_params("space.", space) | flat_params("base.", base.to_dict())
        params |= flat_params("features.", {k: v for k, v in fs.cfg.to_dict().items() if k != "vocab"})
        params |= flat_params("", {"samples": samples, "max_concurrent": max_concurrent, "grace_period": grace_period})
        params |= {"searcher": type(searcher).__name__, "scheduler": type(scheduler).__name__}
        client.log_batch(parent_id, params=[Param(k, v) for k, v in params.items()])
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, fs=fs, base=base, storage=f"{storage}/train", name=name),
            {"cpu": 0.01},  # the trial function only drives its TorchTrainer, whose workers reserve the CPUs
        )
        tuner = ray.tune.Tuner(
            trainable,
            param_space=domains,
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler, num_samples=samples,
                max_concurrent_trials=max_concurrent,
            ),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=f"{data_dir}/tune", failure_config=ray.tune.FailureConfig(max_failures=0),
                # child runs, logged here in the driver (SQLite stores dislike concurrent writer processes)
                callbacks=[TrialRuns(fs, base, tracking_uri=tracking_uri(data_dir), experiment_name=experiment, tags={"mlflow.parentRunId": parent_id, "kind": "tune-trial", "tune": name})],
                verbose=1,
            ),
        )
        grid = tuner.fit()
        trials = [summarize(r, base.epochs) for r in grid]
        log.info("tune: %s", "; ".join(f"{t.trial_id} {t.status} {METRIC}={t.history[-1].get(METRIC, float('nan')) if t.history else float('nan'):.4f}" for t in trials))
        scored = [r for r in grid if r.error is None and r.metrics and math.isfinite(r.metrics.get(METRIC, float("nan")))]
        if not scored:
            raise RuntimeError(f"no trial reported {METRIC}: " + "; ".join(f"{t.trial_id}: {t.error}" for t in trials))
        best = grid.get_best_result(METRIC, MODE, scope="last")
        best_tc = trial_train_config(fs, base, best.config)
        doc = {
            "train": best_train_dict(best_tc, space),
            "metric": METRIC,
            "value": float(best.metrics[METRIC]),
            "trial": best.metrics["trial_id"],
            "tuned_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        os.makedirs(os.path.dirname(out), exist_ok=True)
        atomic_write_json(out, doc)  # a daily run starting now reads the old file or the new one
        log_parent_results(client, parent_id, doc, best.metrics, trials, out)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException as e:
        client.set_tag(parent_id, "error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(parent_id, "FAILED")
        raise
    log.info("tune: best trial %s, %s=%.4f, config written to %s (MLflow parent run %s)", doc["trial"], METRIC, doc["value"], out, parent_id)
    return TuneOutcome(out, doc, trials, parent_id, type(searcher).__name__, type(scheduler).__name__, storage)


def summarize(result, max_epochs: int) -> TrialSummary:
    """A Tune Result -> TrialSummary (its reports from the result's metrics dataframe)."""
    df = result.metrics_dataframe
    keep = [c for c in (df.columns if df is not None else []) if c in ("training_iteration", "epoch") or c.startswith(("eval_", "train_"))]
    history = [] if df is None else [{k: float(v) for k, v in row.items()} for row in df[keep].to_dict("records")]
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    status = "error" if result.error is not None else ("completed" if len(history) >= max_epochs else "stopped")
    params = {k: _plain(v) for k, v in (result.config or {}).items()}
    return TrialSummary(trial_id, params, status, history, None if result.error is None else f"{type(result.error).__name__}: {result.error}")


def log_parent_results(client, run_id: str, doc: dict, best_metrics: dict, trials: list[TrialSummary], best_path: str) -> None:
    """The parent run's results: best trial's metrics (best_<metric>), trial counts, best_config.json, the plot."""
    metrics = {f"best_{k}": float(v) for k, v in best_metrics.items() if k.startswith(("eval_", "train_")) and isinstance(v, (int, float)) and math.isfinite(v)}
    metrics |= {f"trials_{s}": float(sum(t.status == s for t in trials)) for s in ("completed", "stopped", "error")}
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    client.set_tag(run_id, "best_trial", doc["trial"])
    client.log_artifact(run_id, best_path)
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, plot_trials(trials, f"{tmp}/tune_{METRIC}.png"), "plots")
        with open(f"{tmp}/trials.json", "w") as f:
            json.dump([dataclasses.asdict(t) for t in trials], f, indent=1)
        client.log_artifact(run_id, f"{tmp}/trials.json")


def plot_trials(trials: list[TrialSummary], path: str) -> str:
    """eval_query_auc per epoch, one line per trial (the best trial's config is in best_config.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4 + 0.15 * len(trials)))
    for t in trials:
        pts = [(h["training_iteration"], h[METRIC]) for h in t.history if METRIC in h and math.isfinite(h[METRIC])]
        if pts:
            x, y = zip(*pts)
            label = f"{t.trial_id} ({t.status}): " + ", ".join(f"{k.removeprefix('model.')}={v:.3g}" if isinstance(v, float) else f"{k.removeprefix('model.')}={v}" for k, v in t.params.items())
            ax.plot(x, y, "o-", label=label[:90])
    ax.set(xlabel="epoch", ylabel=METRIC, title=f"{METRIC} per trial and epoch (held-out day)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.15))  # below the axes: one line per trial
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# --- CLI -------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="project data directory (logs/, clean/, features/, mlflow/, tune/); default ./data")
    p.add_argument("--date", type=parse_day, default=None, help="newest day of the window (held out for evaluation), YYYY-MM-DD; needed unless --features")
    p.add_argument("--days", type=int, default=14, help="window length in days, ending at --date (default 14)")
    p.add_argument("--features", default=None, help="a window-*.json of jobs.build_features instead of --date/--days")
    p.add_argument("--long-len", type=int, default=128, help="long-term sequence length (as the daily workflow)")
    p.add_argument("--side-info", type=int, default=7, choices=sorted(SIDE_INFO), help="side-info types per sequence event")
    p.add_argument("--relevance", default="category", choices=RELEVANCE, help="relevance filter of the search/feed sequences")
    p.add_argument("--relevance-keys", default=None, help="folder with items.parquet/queries.parquet (id, key), for --relevance keys")
    g = p.add_argument_group("tuning")
    g.add_argument("--samples", type=int, default=8, help="trials (default 8)")
    g.add_argument("--max-concurrent", type=int, default=1, help="trials at a time (each reserves --workers x --cpus-per-worker CPUs)")
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs before it can be stopped")
    g.add_argument("--space", default=None, help="search space as a JSON file of SEARCH_SPACE's form (default: SEARCH_SPACE in this file)")
    g.add_argument("--small-space", action="store_true", help="the narrow SMALL_SEARCH_SPACE (cheap models)")
    g.add_argument("--smoke-test", action="store_true", help="--small-space, 2 trials of 1 epoch")
    g.add_argument("--name", default=None, help="tuning name (default tune-<date>-<timestamp>); results under <data-dir>/tune/<name>")
    g.add_argument("--out", default=None, help="best config JSON (default <data-dir>/tune/<name>/best_config.json)")
    g.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    add_train_arguments(p, TrainConfig(epochs=3, model=BASE_MODEL))
    a = p.parse_args(argv)
    if a.features is None and a.date is None:
        p.error("give --date (the window is built from the logs under --data-dir) or --features")
    if a.smoke_test:
        a.small_space, a.samples, a.epochs = True, 2, 1
    return a


def run(a: argparse.Namespace) -> TuneOutcome:
    data_dir = absolute(a.data_dir)
    if a.features:
        fs = stage("features", FeatureSet.load, absolute(a.features))
        init_ray()
    else:
        init_ray()
        stage("ingest", ingest, data_dir, a.date, a.days)
        fcfg = FeatureConfig(long_len=a.long_len, side_info=a.side_info, relevance=a.relevance, relevance_keys=a.relevance_keys)
        fs = stage("features", build_features, data_dir, a.date, a.days, fcfg)
    if a.space:
        with open(a.space) as f:
            space = json.load(f)
    else:
        space = SMALL_SEARCH_SPACE if a.small_space else SEARCH_SPACE
    name = a.name or f"tune-{fs.days[-1]}-{int(time.time())}"
    base = train_config(a)
    return stage("tune", tune, fs, base, data_dir, name, space, a.samples, a.max_concurrent, a.grace_period, a.out, a.experiment)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        outcome = run(a)
    except StageFailed as e:
        print(f"tune: {e}", file=sys.stderr)
        return 1
    summary = {
        "best_config": outcome.best_config_path, "trial": outcome.best["trial"], METRIC: outcome.best["value"],
        "trials": {t.trial_id: t.status for t in outcome.trials}, "mlflow_parent_run": outcome.parent_run_id,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print("tune: done " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

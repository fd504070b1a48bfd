"""Hyperparameter tuning of the training job with Ray Tune: the search space, the trial, MLflow parent/child runs.

workflows/tune.py composes it with ingest and feature building (``python workflows/tune.py --help``); the pattern is
Ray Train V2's: each trial is a small Tune function (``run_trial``) that turns its sampled parameters into a
``TrainConfig`` and runs ``jobs.train.train`` (one ``TorchTrainer``) with a ``TuneReportCallback``, which forwards
every per-epoch report (``eval_query_auc``, ...) to Tune. ``OptunaSearch`` samples the space (TPE); the ASHA scheduler
stops trials whose ``eval_query_auc`` falls behind at an epoch rung.

MLflow (experiment ``hyformer-tune``): one parent run per tuning (the search space and base config as params; at the
end the best trial's metrics, ``best_config.json`` and a plot of eval_query_auc per trial and epoch) and one child run
per trial (tag ``mlflow.parentRunId``), all written from the driver process (``TrialRuns``). The best config goes to
``<data-dir>/tune/<name>/best_config.json`` (jobs/train_config.py writes and reads it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import ray.tune
from mlflow.entities import Metric, Param
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from features import storage
from jobs.build_features import FeatureSet
from jobs.common import log, pyplot, setup_logging
from jobs.register import flat_params, use_tracking
from jobs.train import match_width, model_config, train
from jobs.train_config import TrainConfig, best_config, check_space, write_best_config

METRIC, MODE = "eval_query_auc", "max"  # what the search optimises and ASHA compares (jobs.train reports it per epoch)
EXPERIMENT = "hyformer-tune"  # MLflow experiment of the tuning runs (the daily runs live in "hyformer-daily")

# The search space: parameter -> {distribution: arguments}. A key is what TrainConfig.override takes: a TrainConfig
# field ("batch_size", ...), an optimiser field ("lr" or "optim.lr") or "model.<HyFormerConfig field>".
# Distributions: "choice": [values...], "uniform"/"loguniform": [low, high], "randint": [low, high) (ints). Edit it
# here, or pass a JSON file of the same form with --space. d_model is moved to the nearest width the model accepts
# (see fit_width): it must divide by n_heads and by T = 3 sequences x n_queries + 5 NS groups.
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


# --- search space and trial configs ----------------------------------------------------------------------------------

DISTRIBUTIONS = {  # DISTRIBUTION_NAMES, as Ray Tune's
    "choice": ray.tune.choice,
    "uniform": ray.tune.uniform,
    "loguniform": ray.tune.loguniform,
    "randint": ray.tune.randint,
}


def tune_space(space: dict[str, dict[str, list]]) -> dict:
    """The Tune search domains of a SEARCH_SPACE-style dict (OptunaSearch turns them into Optuna distributions)."""
    check_space(space)
    return {
        key: (DISTRIBUTIONS[kind](args) if kind == "choice" else DISTRIBUTIONS[kind](*args))
        for key, dist in space.items()
        for kind, args in dist.items()
    }


def _plain(v):
    """numpy scalars (as a search algorithm may return them) -> Python values (JSON, HyFormerConfig's int checks)."""
    return v.item() if hasattr(v, "item") else v


def fit_width(fs: FeatureSet, model: dict, arch: str) -> dict:
    """``model`` overrides with ``d_model`` moved to the nearest width the architecture accepts (ties: the wider;
    jobs.train.match_width): the space names target widths and each trial trains the nearest valid one (recorded
    in its config). Raises the config's own error when none fits."""
    if model.get("d_model") is None:
        model_config(fs, model, arch)  # validates
        return model
    want = int(round(model["d_model"]))
    cfg = match_width(fs, model, arch, lambda cfg: abs(cfg.d_model - want), range(1, 4 * want + 1))
    return model | {"d_model": cfg.d_model}


def trial_train_config(fs: FeatureSet, base: TrainConfig, params: dict) -> TrainConfig:
    """``base`` with a trial's sampled ``params`` (search-space keys) applied; the model's width made valid."""
    tc = base.override({k: _plain(v) for k, v in params.items()})
    return dataclasses.replace(tc, model=fit_width(fs, tc.model, tc.arch))


# --- the Tune trial (runs in its own Tune actor) ---------------------------------------------------------------------


def run_trial(config: dict, fs: FeatureSet, base: TrainConfig, storage_path: str, name: str) -> None:
    """One trial: ``base`` + the sampled ``config`` -> one Ray Train run; every epoch's report goes to Tune."""
    setup_logging()  # this is the trial's own process: the driver's logging settings do not reach it
    tc = trial_train_config(fs, base, config)
    trial_id = ray.tune.get_context().get_trial_id()
    log.info("trial %s: %s", trial_id, json.dumps({"optim": dataclasses.asdict(tc.optim), "model": tc.model}))
    train(fs, tc, storage_path, f"{name}-{trial_id}", callbacks=[TuneReportCallback()])


# --- MLflow: one child run per trial, written by the driver ---------------------------------------------------------


class TrialRuns(ray.tune.Callback):
    """One MLflow child run per trial, from the driver (SQLite stores dislike concurrent writer processes): params =
    the sampled values and the TrainConfig the trial really trained (``train.*``, d_model made valid), metrics = every
    numeric value of every report (step = the report's training_iteration), tag ``outcome`` = completed, stopped
    (by ASHA) or error."""

    def __init__(
        self,
        client: mlflow.tracking.MlflowClient,
        experiment_id: str,
        tags: dict[str, str],
        fs: FeatureSet,
        base: TrainConfig,
    ):
        self.client, self.experiment_id, self.tags, self.fs, self.base = client, experiment_id, tags, fs, base
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        run_id = self.client.create_run(
            self.experiment_id, run_name=str(trial), tags=self.tags | {"trial_id": trial.trial_id}
        ).info.run_id
        self.runs[trial.trial_id] = run_id
        params = flat_params("", {k: _plain(v) for k, v in trial.config.items()})
        try:
            params |= flat_params("train.", trial_train_config(self.fs, self.base, trial.config).flat())
        except ValueError:  # a combination the model rejects: the trial itself fails with the message
            pass
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        now, step = int(time.time() * 1000), int(result.get("training_iteration", 0))
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        self.client.log_batch(self.runs[trial.trial_id], metrics=metrics)

    def _end(self, trial, failed: bool) -> None:
        done = (trial.last_result or {}).get("training_iteration", 0)
        outcome = "error" if failed else ("completed" if done >= self.base.epochs else "stopped")
        self.client.set_tag(self.runs[trial.trial_id], "outcome", outcome)
        self.client.set_terminated(self.runs[trial.trial_id], "FAILED" if failed else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=True)


# --- the tuning ------------------------------------------------------------------------------------------------------


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
    experiment_yaml: str | None = None,
) -> TuneOutcome:
    """Tune ``space`` around ``base`` on window ``fs``: ``samples`` trials of ``base.epochs`` epochs each (Optuna TPE,
    ASHA on ``eval_query_auc`` per epoch), ``max_concurrent`` at a time. Logs the MLflow parent run and one child run
    per trial; writes the best config to ``out`` (default ``<data_dir>/tune/<name>/best_config.json``).
    ``experiment_yaml``: the resolved experiment file (jobs.experiment), logged with the parent run.

    Raises RuntimeError when no trial reported the metric.
    """
    data_dir = storage.absolute(data_dir)
    tune_dir = f"{data_dir}/tune/{name}"
    out = storage.absolute(out or f"{tune_dir}/best_config.json")
    if base.checkpoint_every:
        log.info(
            "tune: checkpoint_every=%d -> 0 (step reports carry no %s and would count as ASHA iterations)",
            base.checkpoint_every,
            METRIC,
        )
        base = dataclasses.replace(base, checkpoint_every=0)
    domains = tune_space(space)
    trial_train_config(fs, base, {})  # a base config the model rejects fails here, not in every trial
    searcher = OptunaSearch(seed=base.seed)
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=base.epochs,
        grace_period=min(grace_period, base.epochs),
        reduction_factor=2,
    )

    exp_id = use_tracking(data_dir, experiment)
    client = mlflow.tracking.MlflowClient()
    parent = client.create_run(
        exp_id,
        run_name=name,
        tags={"kind": "tune", "metric": METRIC, "window_end": fs.days[-1], "window_days": str(len(fs.days))},
    )
    parent_id = parent.info.run_id
    try:
        params = flat_params("space.", space) | flat_params("base.", base.flat())
        params |= flat_params("features.", {k: v for k, v in fs.cfg.to_dict().items() if k != "vocab"})
        params |= flat_params("", {"samples": samples, "max_concurrent": max_concurrent, "grace_period": grace_period})
        params |= {"searcher": type(searcher).__name__, "scheduler": type(scheduler).__name__}
        client.log_batch(parent_id, params=[Param(k, v) for k, v in params.items()])
        if experiment_yaml is not None:
            client.log_text(parent_id, experiment_yaml, "experiment.yaml")
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, fs=fs, base=base, storage_path=f"{tune_dir}/train", name=name),
            {"cpu": 0.01},  # the trial function only drives its TorchTrainer, whose workers reserve the CPUs
        )
        tuner = ray.tune.Tuner(
            trainable,
            param_space=domains,
            tune_config=ray.tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=samples,
                max_concurrent_trials=max_concurrent,
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=f"{data_dir}/tune",
                failure_config=ray.tune.FailureConfig(max_failures=0),
                # child runs, logged here in the driver (SQLite stores dislike concurrent writer processes)
                callbacks=[
                    TrialRuns(
                        client, exp_id, {"mlflow.parentRunId": parent_id, "kind": "tune-trial", "tune": name}, fs, base
                    )
                ],
                verbose=1,
            ),
        )
        grid = tuner.fit()
        trials = [summarize(r, base.epochs) for r in grid]
        log.info(
            "tune: %s",
            "; ".join(
                f"{t.trial_id} {t.status} {METRIC}="
                f"{t.history[-1].get(METRIC, float('nan')) if t.history else float('nan'):.4f}"
                for t in trials
            ),
        )
        scored = [
            r for r in grid if r.error is None and r.metrics and math.isfinite(r.metrics.get(METRIC, float("nan")))
        ]
        if not scored:
            raise RuntimeError(f"no trial reported {METRIC}: " + "; ".join(f"{t.trial_id}: {t.error}" for t in trials))
        best = grid.get_best_result(METRIC, MODE, scope="last")
        doc = best_config(
            trial_train_config(fs, base, best.config), space, METRIC, best.metrics[METRIC], best.metrics["trial_id"]
        )
        write_best_config(out, doc)
        log_parent_results(client, parent_id, doc, best.metrics, trials, out)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException as e:
        client.set_tag(parent_id, "error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(parent_id, "FAILED")
        raise
    log.info(
        "tune: best trial %s, %s=%.4f, config written to %s (MLflow parent run %s)",
        doc["trial"],
        METRIC,
        doc["value"],
        out,
        parent_id,
    )
    return TuneOutcome(out, doc, trials, parent_id, type(searcher).__name__, type(scheduler).__name__, tune_dir)


def summarize(result, max_epochs: int) -> TrialSummary:
    """A Tune Result -> TrialSummary (its reports from the result's metrics dataframe)."""
    df = result.metrics_dataframe
    keep = [
        c
        for c in (df.columns if df is not None else [])
        if c in ("training_iteration", "epoch") or c.startswith(("eval_", "train_"))
    ]
    history = [] if df is None else [{k: float(v) for k, v in row.items()} for row in df[keep].to_dict("records")]
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    status = "error" if result.error is not None else ("completed" if len(history) >= max_epochs else "stopped")
    params = {k: _plain(v) for k, v in (result.config or {}).items()}
    return TrialSummary(
        trial_id,
        params,
        status,
        history,
        None if result.error is None else f"{type(result.error).__name__}: {result.error}",
    )


def log_parent_results(
    client, run_id: str, doc: dict, best_metrics: dict, trials: list[TrialSummary], best_path: str
) -> None:
    """The parent run's results: best trial's metrics (best_<metric>), trial counts, best_config.json, the plot."""
    metrics = {
        f"best_{k}": float(v)
        for k, v in best_metrics.items()
        if k.startswith(("eval_", "train_")) and isinstance(v, (int, float)) and math.isfinite(v)
    }
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4 + 0.15 * len(trials)))
    for t in trials:
        pts = [(h["training_iteration"], h[METRIC]) for h in t.history if METRIC in h and math.isfinite(h[METRIC])]
        if pts:
            x, y = zip(*pts)
            label = f"{t.trial_id} ({t.status}): " + ", ".join(
                f"{k.removeprefix('model.')}={v:.3g}" if isinstance(v, float) else f"{k.removeprefix('model.')}={v}"
                for k, v in t.params.items()
            )
            ax.plot(x, y, "o-", label=label[:90])
    ax.set(xlabel="epoch", ylabel=METRIC, title=f"{METRIC} per trial and epoch (held-out day)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.15))  # below the axes: one line per trial
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path

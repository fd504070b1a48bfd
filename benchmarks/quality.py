r"""Model quality (issue #7): the paper's Tables 1-3 and its scaling curves, on the same logs, several seeds, next to
the oracle.

    python -m benchmarks.quality --suite tables       # every Table 1 and Table 2 row, matched dense params, 3 seeds
    python -m benchmarks.quality --suite side-info    # Table 3: side info 3 vs 7 types x long-sequence length
    python -m benchmarks.quality --suite scaling      # HyFormer vs LONGER + RankMixer at 4 sizes: AUC vs params, FLOPs
    python -m benchmarks.quality --suite tables \
        --features DATA/features/v2/<store>/window-*.json --name quality_movielens

Data: by default the synthetic logs of ``features.synth`` (``--synth-scale`` x SynthConfig's per-day traffic over
``--days`` days, cached in ``--work``), ingested and built into a feature window by the real jobs (``jobs.ingest``,
``jobs.build_features`` on a local Ray cluster); ``--features`` takes any window built by ``jobs.build_features``
instead (e.g. the MovieLens import of ``benchmarks/movielens.sh``). The last ``--eval-days`` days are held out; every
earlier day trains. Every model of a suite sees the same training samples in the same order for a given seed, and is
scored on the same held-out rows.

Training: in one process, with the training code of every Ray Train worker (``jobs.train``'s ``Materializer`` collate
into deduplicated ID tables, the loop of ``hyformer/loop.py`` around ``hyformer.training.Learner``: AdamW with warm-up
and clipping on the dense parameters, row-wise Adagrad on the tables), ``--epochs`` passes over the training days in
a seeded random order, batch 256, fp32, ``torch`` threads = the machine's cores. It runs in-process rather than
through Ray Train to spare a Ray Train start per model (seconds each, for ~100 models); ``jobs.train --arch NAME``
trains the same rows on a cluster.

Budgets (``tables``): the paper compares rows at roughly matched dense parameters and reports their FLOPs. Here each
row's ``d_model`` (the width of its tokens and interaction; ``d_seq``, the sequence side's width, stays fixed) is the
valid width whose dense parameter count is closest to HyFormer's at the base config; params and training FLOPs per
step of 256 samples (``hyformer.profile``, every sequence at full length) are reported for every row.

Reported per row: held-out AUC and query-level AUC (mean ± sample std over the seeds), the delta of the mean against
the suite's reference row (LONGER + RankMixer, the paper's baseline), dense params, training GFLOPs per step, and the
oracle's AUC and query AUC on the same rows (``p_click``, the synthetic click probability: the best any model can do;
absent for real logs). Every model is an MLflow run (nested in one parent run per suite, with the table and plots as
artifacts; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``, else an embedded store under ``--work``).

Writes ``benchmarks/results/<name>.json`` (every run) and ``<name>.md`` (the table), ``--name`` defaulting to
``quality_<suite>``; ``scaling`` also writes ``docs/img/scaling_params.png`` and ``docs/img/scaling_flops.png``
(``--plots``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.common import write_results
from benchmarks.kv_reuse import machine_info
from benchmarks.quality_data import Window, logs_window, synthetic_window
from benchmarks.quality_report import COUNTING, REFERENCE, SCALING_ARCHS, scaling_plots, summarize, table
from features.build import FeatureConfig
from hyformer.config import HyFormerConfig
from hyformer.counting import CountingBaseline
from hyformer.loop import Hooks, LoopConfig, run_epochs
from hyformer.metrics import group_auc
from hyformer.profile import count_params, profile
from hyformer.training import Learner, OptimConfig
from hyformer.zoo import ARCHITECTURES, build_model
from jobs.build_features import FeatureSet
from jobs.common import log, setup_logging
from jobs.evaluate import metrics, predict
from jobs.experiment import ExperimentError, load_experiment
from jobs.train import match_width, model_config, paper_encoders
from jobs.train_config import TrainConfig

SUITES = ("tables", "side-info", "scaling")
PAPER_ROWS = tuple(n for n, a in ARCHITECTURES.items() if a.table in ("1", "2"))  # 9 of Table 1 + 4 more of Table 2
# reference rows a ranking engineer checks first: counting (smoothed positive rates + logistic regression, no neural
# network: hyformer/counting.py), HyFormer blind to its sequences, and DIN's target attention over the sequences
REFERENCE_ROWS = (COUNTING, "hyformer-no-seq", "din")
# beyond the paper (issue #15): switches that let the candidate meet the history, each measured as a row
BEYOND_ROWS = ("hyformer-pool-all", "hyformer-full-kv", "hyformer-target-attn")
TABLE_ROWS = REFERENCE_ROWS + PAPER_ROWS + BEYOND_ROWS
# the counting baseline's keys: id columns of the stored samples (the query x item cross is hashed)
COUNTING_KEYS = {"item": "ns_item_id", "user": "ns_user_id", "query": "ns_query_id", "query x item": "ns_query_item"}
COUNTING_LABEL = "Counting: smoothed positive rates of item, user, query, query x item + logistic regression"
# the base model of every suite (d_model is then matched per row in "tables", scaled in "scaling")
BASE_MODEL: dict[str, Any] = dict(
    d_model=32, d_seq=16, n_heads=2, n_layers=2, ffn_mult=2, head_hidden=(64,), longer_queries=32
)
# scaling: (d_model, d_seq, n_layers), ~20x in dense parameters from the smallest to the largest
SCALING_SIZES: tuple[dict[str, int], ...] = (
    dict(d_model=16, d_seq=8, n_layers=1),
    dict(d_model=32, d_seq=16, n_layers=2),
    dict(d_model=64, d_seq=32, n_layers=2),
    dict(d_model=128, d_seq=48, n_layers=3),
)
WIDTHS = tuple(range(8, 513, 4))  # d_model candidates when matching budgets


# --- models ----------------------------------------------------------------------------------------------------------


def arch_config(fs: FeatureSet, overrides: dict[str, Any], arch: str) -> HyFormerConfig:
    """``jobs.train.model_config`` of ``arch`` (the paper's encoders where the architecture names none), then
    ``overrides``: what ``jobs.train --arch`` trains."""
    return model_config(fs, overrides, arch)


def dense_params(cfg: HyFormerConfig) -> int:
    with torch.device("meta"):
        return count_params(build_model(cfg))[0]


def matched_config(fs: FeatureSet, arch: str, overrides: dict[str, Any], target: int) -> HyFormerConfig:
    """``arch`` at the valid ``d_model`` whose dense parameter count is closest to ``target``."""
    return match_width(fs, overrides, arch, lambda cfg: abs(dense_params(cfg) - target) / target, WIDTHS)


@dataclass(frozen=True)
class Spec:
    """One model of a suite: its row label, architecture and full config (seeds are run by the suite)."""

    row: str
    arch: str
    model: HyFormerConfig
    features: FeatureConfig
    tags: tuple[tuple[str, Any], ...] = ()


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fit(win: Window, spec: Spec, tc: TrainConfig, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Train ``spec`` for ``tc.epochs`` epochs from seed ``seed`` on ``device`` (bf16 autocast on CUDA, as the Ray
    Train workers) with the workers' training loop (hyformer/loop.py) in this process; evaluate on the held-out days."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(spec.model)
    if tc.prior_bias:
        model.init_output_bias(float(np.mean(win.train["label"])))
    model = model.to(dev)
    steps = math.ceil(win.n_train / win.batch_size)
    learner = Learner(model, tc.optim, dev, total_steps=steps * tc.epochs)
    eval_batches = win.eval_batches(spec.features)

    def evaluate(split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        batches = eval_batches if split == "eval" else win.eval_batches(spec.features, split)
        pred = predict(model, (_on(b, dev) for b in batches))
        return metrics(pred), pred

    def batches(epoch: int, skip: int):
        return (_on(b, dev) for b in itertools.islice(win.train_batches(spec.features, seed, epoch), skip, None))

    loop = LoopConfig(
        epochs=tc.epochs,
        steps_per_epoch=steps,
        batch_size=win.batch_size,
        validate=win.val is not None,
        patience=tc.patience,
        log_every=100,
    )
    final: dict[str, dict] = {}  # the files of the loop's last report: the result model's held-out predictions
    t0 = time.perf_counter()
    history = run_epochs(
        learner, model, batches, evaluate, loop, hooks=Hooks(report=lambda m, f: final.update(f or {}))
    )
    train_seconds = time.perf_counter() - t0
    epochs = [h for h in history if "best_epoch" not in h]  # the epochs trained (the last entry may be the best one)
    pred = final["eval_predictions.npz"]
    m = metrics(pred) | {"eval_user_auc": group_auc(pred["label"], pred["prob"], win.eval["user_id"])}
    m["eval_mean_len_long"] = float(torch.cat([b["len_long"] for b in eval_batches]).float().mean())  # events seen
    m["best_epoch"] = history[-1].get("best_epoch", epochs[-1]["epoch"]) + 1.0
    keep = ("train_loss", "train_seconds", "eval_auc", "val_auc")
    return {
        "row": spec.row,
        "arch": spec.arch,
        "seed": seed,
        **dict(spec.tags),
        **m,
        "history": [{k: h[k] for k in keep if k in h} for h in epochs],
        "train_seconds": train_seconds,
        "samples_per_s": len(epochs) * win.n_train / train_seconds,
    }


def fit_counting(win: Window, seed: int) -> dict[str, Any]:
    """The counting baseline (hyformer/counting.py) fitted on the training samples and scored on the held-out rows;
    deterministic, so every seed gets the same numbers (``seed`` only labels the run for the paired deltas)."""
    t0 = time.perf_counter()
    keys = lambda cols: {k: cols[c].astype(np.int64) for k, c in COUNTING_KEYS.items()}
    model = CountingBaseline().fit(keys(win.train), win.train["label"], win.train["request_id"])
    pred = {k: v for k, v in win.eval.items() if k in ("label", "request_id") or k.startswith("p_click")}
    pred["prob"] = model.predict(keys(win.eval))
    pred["label"] = pred["label"].astype(np.float32)
    pred.setdefault("p_click", np.full(win.n_eval, np.nan, np.float32))
    m = metrics(pred) | {"eval_user_auc": group_auc(pred["label"], pred["prob"], win.eval["user_id"])}
    train_seconds = time.perf_counter() - t0
    return {
        "row": COUNTING,
        "arch": COUNTING,
        "seed": seed,
        "table": "ref",
        "label": COUNTING_LABEL,
        **m,
        "eval_mean_len_long": float("nan"),
        "history": [],
        "train_seconds": train_seconds,
        "samples_per_s": win.n_train / train_seconds,
        "weights": model.weights.tolist(),
    }


COUNTING_SIZE = {
    "dense_params": 2 * len(COUNTING_KEYS) + 1,
    "sparse_params": 0,
    "train_gflops": 0.0,
    "d_model": "-",
    "d_seq": "-",
    "n_layers": 0,
}


# --- suites ----------------------------------------------------------------------------------------------------------


def table_specs(fs: FeatureSet, base: dict[str, Any], rows: tuple[str, ...]) -> list[Spec]:
    """Tables 1 and 2: every row at HyFormer's dense parameter count (``d_model`` matched, see module doc)."""
    target = dense_params(arch_config(fs, base, "hyformer"))
    specs = []
    for name in rows:
        if name == COUNTING:  # not a network: fit_counting
            continue
        cfg = arch_config(fs, base, name) if name == "hyformer" else matched_config(fs, name, base, target)
        table = ARCHITECTURES[name].table or "ref"
        specs.append(Spec(name, name, cfg, fs.cfg, (("table", table), ("label", ARCHITECTURES[name].label))))
    return specs


def side_info_specs(fs: FeatureSet, base: dict[str, Any], long_lens: tuple[int, ...]) -> list[Spec]:
    """Table 3: {LONGER + RankMixer, HyFormer} x side info {3, 7} types x each long-sequence length (no matching: as
    in the paper, richer side info widens the sequence tokens' input and adds parameters)."""
    specs = []
    for length in long_lens:
        for arch in (REFERENCE, "hyformer"):
            for side in (3, 7):
                f = fs.with_read_side(long_len=length, side_info=side)
                specs.append(
                    Spec(
                        f"{arch} L={length} side={side}",
                        arch,
                        arch_config(f, base, arch),
                        f.cfg,
                        (("long_len", length), ("side_info", side)),
                    )
                )
    return specs


def scaling_specs(fs: FeatureSet, base: dict[str, Any], sizes: tuple[dict[str, int], ...]) -> list[Spec]:
    """HyFormer and LONGER + RankMixer at each size (the same width, depth and sequence width for both)."""
    return [
        Spec(f"{arch} size={i}", arch, arch_config(fs, base | size, arch), fs.cfg, (("size", i), *sorted(size.items())))
        for i, size in enumerate(sizes)
        for arch in SCALING_ARCHS
    ]


def describe(specs: list[Spec], batch: int) -> dict[str, dict[str, Any]]:
    """Widths, depth, dense params and training GFLOPs per step of ``batch`` samples of every spec."""
    out = {}
    for s in specs:
        p = profile(s.model, batch)
        out[s.row] = {
            "dense_params": p.dense_params,
            "sparse_params": p.sparse_params,
            "train_gflops": p.train_flops / 1e9,
            "d_model": s.model.d_model,
            "d_seq": s.model.d_seq or s.model.d_model,
            "n_layers": s.model.n_layers,
        }
    return out


# --- MLflow ----------------------------------------------------------------------------------------------------------


class Tracker:
    """One MLflow parent run per suite and a nested run per model (``enabled=False``: no MLflow at all)."""

    def __init__(self, work: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            import mlflow

            from jobs.register import use_tracking

            mlflow.set_experiment(experiment_id=use_tracking(work, experiment))

    def start(self, name: str, params: dict[str, Any]):
        import contextlib

        if not self.enabled:
            return contextlib.nullcontext()
        import mlflow

        run = mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        return run

    def child(self, run: dict[str, Any], spec: Spec, size: dict[str, Any], tc: TrainConfig) -> None:
        if not self.enabled:
            return
        import mlflow

        with mlflow.start_run(run_name=f"{spec.row} seed {run['seed']}", nested=True):
            mlflow.log_params(
                {
                    "row": spec.row,
                    "arch": spec.arch,
                    "seed": run["seed"],
                    **{f"model.{k}": str(v)[:500] for k, v in spec.model.to_dict().items() if k != "schema"},
                }
            )
            mlflow.log_params({f"train.{k}": v for k, v in tc.flat().items() if k != "model"})
            mlflow.log_params({f"features.{k}": v for k, v in spec.features.to_dict().items() if k != "vocab"})
            mlflow.log_metrics({k: v for k, v in run.items() if k.startswith("eval_") and math.isfinite(v)})
            mlflow.log_metrics(
                {
                    "dense_params": size["dense_params"],
                    "train_gflops": size["train_gflops"],
                    "samples_per_s": run["samples_per_s"],
                }
            )
            for i, h in enumerate(run["history"]):
                mlflow.log_metric("train_loss", h["train_loss"], step=i)

    def finish(self, res: dict[str, Any], files: list[str]) -> None:
        if not self.enabled:
            return
        import mlflow

        for row, r in res["summary"].items():
            key = row.replace(" ", "_").replace("=", "").replace("+", "")
            for k in ("eval_auc", "eval_query_auc"):
                if r[k]["mean"] is not None:
                    mlflow.log_metric(f"{key}.{k}", r[k]["mean"])
        for f in files:
            mlflow.log_artifact(f)


# --- driver ----------------------------------------------------------------------------------------------------------


def run_suite(
    suite: str,
    win: Window,
    base: dict[str, Any],
    tc: TrainConfig,
    seeds: int,
    tracker: Tracker,
    long_lens: tuple[int, ...] = (128, 512),
    sizes: tuple[dict[str, int], ...] = SCALING_SIZES,
    rows: tuple[str, ...] = TABLE_ROWS,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every model of ``suite`` x ``seeds`` seeds on ``win``; returns the results (runs, summary, window, machine)."""
    fs = win.fs
    if suite == "tables":
        specs = table_specs(fs, base, rows)
    elif suite == "side-info":
        specs = side_info_specs(fs, base, long_lens)
    elif suite == "scaling":
        specs = scaling_specs(fs, base, sizes)
    else:
        raise ValueError(f"unknown suite {suite!r}; choose one of {SUITES}")
    sizes_of = describe(specs, tc.batch_size)
    counting = suite == "tables" and COUNTING in rows
    if counting:
        sizes_of[COUNTING] = COUNTING_SIZE
    log.info(
        "quality: %s, %d models x %d seeds on %d training / %d held-out samples",
        suite,
        len(specs),
        seeds,
        win.n_train,
        win.n_eval,
    )
    for s in specs:
        z = sizes_of[s.row]
        log.info(
            "  %-40s d_model %3d, %.3fM dense params, %.2f GFLOPs/step",
            s.row,
            z["d_model"],
            z["dense_params"] / 1e6,
            z["train_gflops"],
        )
    runs, t0, total = [], time.perf_counter(), (len(specs) + counting) * seeds
    for seed in range(seeds):  # seed-major: every model of a seed reuses the seed's materialised batches
        if counting:
            runs.append(fit_counting(win, seed))
            log.info(
                "quality: %s seed %d: AUC %.4f, query AUC %.4f",
                COUNTING,
                seed,
                runs[-1]["eval_auc"],
                runs[-1]["eval_query_auc"],
            )
        for s in specs:
            r = fit(win, s, tc, seed, device)
            runs.append(r)
            tracker.child(r, s, sizes_of[s.row], tc)
            done = len(runs)
            eta = (time.perf_counter() - t0) / done * (total - done)
            log.info(
                "quality: [%d/%d] %s seed %d: AUC %.4f, query AUC %.4f (oracle %.4f) in %.0f s; ETA %.0f min",
                done,
                total,
                s.row,
                seed,
                r["eval_auc"],
                r["eval_query_auc"],
                r.get("eval_oracle_auc", float("nan")),
                r["train_seconds"],
                eta / 60,
            )
    eval_requests = len(np.unique(win.eval["request_id"]))
    return {
        "suite": suite,
        "seeds": seeds,
        "epochs": tc.epochs,
        "train": tc.to_dict(),
        "base_model": base,
        "paper_encoders": paper_encoders(fs.cfg),  # jobs.train default for rows whose architecture names no encoder
        "window": {
            "store": fs.root,
            "features": fs.cfg.to_dict() | {"vocab": None},
            "train_days": len(win.train_days),
            "eval_days": len(win.eval_day_list),
            "first_day": fs.days[0],
            "last_day": fs.days[-1],
            "train_samples": win.n_train,
            "eval_samples": win.n_eval,
            "eval_requests": eval_requests,
        },
        "machine": machine_info(torch.device(device)),
        "wall_seconds": time.perf_counter() - t0,
        "runs": runs,
        "summary": summarize(runs, sizes_of, ([COUNTING] if counting else []) + [s.row for s in specs]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Model quality: Tables 1-3 and scaling curves (module doc).")
    p.add_argument("--suite", choices=SUITES, help="required unless --render")
    p.add_argument("--features", default=None, help="a window-*.json of jobs.build_features (default: synthetic logs)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="raw logs in the log contract (e.g. jobs.import_logs): ingest and build the window ending at --date",
    )
    p.add_argument("--date", default=None, help="with --data-dir or --config: the window's last day, YYYY-MM-DD")
    p.add_argument(
        "--config",
        default=None,
        help="an experiment file (configs/*.yaml): its feature spec and data directory (with --date), its model and "
        "train sections as the base every row starts from",
    )
    p.add_argument(
        "--relevance",
        default="category",
        choices=("category", "none"),
        help="with --data-dir: search/feed relevance (features.build)",
    )
    p.add_argument("--work", default="/tmp/hyformer-quality", help="synthetic data, Ray and MLflow files")
    p.add_argument("--synth-scale", type=float, default=0.5, help="x SynthConfig's per-day traffic")
    p.add_argument("--days", type=int, default=28, help="days of synthetic logs (the window)")
    p.add_argument("--eval-days", type=int, default=3, help="held-out days at the window's end")
    p.add_argument(
        "--val-days",
        type=int,
        default=0,
        help="days before the held-out ones kept out of training to pick the epoch (early stopping on their AUC)",
    )
    p.add_argument("--long-len", type=int, default=128, help="L_long of tables/scaling (side-info: --long-lens)")
    p.add_argument("--long-lens", default="128,512", help="side-info: the long-sequence lengths compared")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="default: --config's, else 1")
    p.add_argument("--lr", type=float, default=None, help=f"default: --config's, else {OptimConfig().lr}")
    p.add_argument(
        "--train",
        default="{}",
        help="TrainConfig overrides as JSON, e.g. '{\"sparse_lr\": 0.02}' "
        "(jobs/train_config.py: its fields, optimiser fields plain or as optim.<name>)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda: where the models train (bf16 autocast on CUDA)")
    p.add_argument("--rows", default=",".join(TABLE_ROWS), help="tables: the architectures (hyformer.zoo names)")
    p.add_argument("--model", default="{}", help="HyFormerConfig overrides of the base model, as JSON")
    p.add_argument("--sizes", default=None, help="scaling: a JSON list of overrides, one per size")
    p.add_argument("--name", default=None, help="results name (default quality_<suite>)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument(
        "--plots", default=os.path.join(os.path.dirname(__file__), "..", "docs", "img"), help="scaling plots folder"
    )
    p.add_argument("--experiment", default="hyformer-quality", help="MLflow experiment")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument(
        "--render",
        default=None,
        help="only rewrite the .md (and scaling plots) of a results JSON, e.g. after a format change",
    )
    a = p.parse_args(argv)
    setup_logging()
    if a.render:
        with open(a.render) as f:
            res = json.load(f)
        name = os.path.basename(a.render).removesuffix(".json")
        with open(f"{os.path.dirname(a.render) or '.'}/{name}.md", "w") as f:
            f.write(table(res))
        if res["suite"] == "scaling":
            scaling_plots(res, a.plots)
        print(table(res))
        return res
    torch.set_num_threads(os.cpu_count() or 1)
    name = a.name or f"quality_{a.suite.replace('-', '_')}"
    long_lens = tuple(int(x) for x in a.long_lens.split(","))
    if a.suite is None:
        p.error("--suite is required")
    try:
        exp = load_experiment(a.config) if a.config else None
    except ExperimentError as e:
        p.exit(2, f"quality: {e}\n")
    data_dir = a.data_dir or (exp.data.dir if exp else None)
    if (data_dir is None) != (a.date is None):
        p.error("--data-dir (or --config) and --date go together")
    long_len = max(long_lens) if a.suite == "side-info" else a.long_len
    if a.features:
        fs = FeatureSet.load(os.path.abspath(a.features))
    elif data_dir:
        fcfg = (
            exp.features if exp else FeatureConfig(long_len=long_len, search_len=50, feed_len=50, relevance=a.relevance)
        )
        fs = logs_window(os.path.abspath(data_dir), dt.date.fromisoformat(a.date), a.days, fcfg)
    else:
        fs = synthetic_window(a.work, a.synth_scale, a.days, long_len)
    if a.suite != "side-info":
        fs = fs.with_read_side(long_len=a.long_len)
    rows = tuple(r.strip() for r in a.rows.split(",") if r.strip())
    unknown = sorted(set(rows) - set(ARCHITECTURES) - {COUNTING})
    if unknown:
        p.error(f"--rows: unknown architectures {unknown}; choose from {sorted(ARCHITECTURES)}")
    sizes = tuple(json.loads(a.sizes)) if a.sizes else SCALING_SIZES
    base = (exp.train.model if exp else BASE_MODEL) | json.loads(a.model)
    first = exp.train.flat() if exp else {"epochs": 1, "lr": OptimConfig().lr}  # the file's, or the suite's defaults
    given = {k: v for k, v in (("epochs", a.epochs), ("lr", a.lr)) if v is not None}
    tc = TrainConfig.from_dict(first | given | json.loads(a.train) | {"seed": 0, "model": base})
    win = Window(fs, a.eval_days, a.val_days)
    tracker = Tracker(a.work, a.experiment, enabled=not a.no_mlflow)
    with tracker.start(
        name,
        {
            "suite": a.suite,
            "seeds": a.seeds,
            "epochs": tc.epochs,
            "base_model": json.dumps(base),
            "features": fs.root,
            "eval_days": a.eval_days,
        },
    ):
        res = run_suite(
            a.suite, win, base, tc, a.seeds, tracker, long_lens=long_lens, sizes=sizes, rows=rows, device=a.device
        )
        res["command"] = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
        md = table(res)
        write_results(a.out, name, res, md)
        files = [f"{a.out}/{name}.json", f"{a.out}/{name}.md"]
        if a.suite == "scaling":
            files += scaling_plots(res, a.plots)
        tracker.finish(res, files)
    return res


if __name__ == "__main__":
    main()

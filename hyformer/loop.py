"""The worker training loop, written once: epochs of `Learner` steps, the held-out evaluation after every epoch,
early stopping on validation days, progress lines. Plain PyTorch: what depends on where it runs comes in as
arguments.

    jobs/train.py         every Ray Train worker (so every Tune trial too): rank and world from Ray, `report` =
                          ray.train.report with a checkpoint, `broadcast` = torch.distributed
    benchmarks/quality.py one process (the defaults of `Hooks`), to spare a Ray Train start per model

    history = run_epochs(learner, model, batches, evaluate, LoopConfig(epochs=1, steps_per_epoch=n, batch_size=256))

`batches(epoch, skip)` yields the epoch's training batches (on the learner's device) after its first `skip` (a
restart resumes mid-epoch: the source skips them without building them); `evaluate(split)` scores "eval" (the
held-out days) or "val" (the validation days) and returns (metrics with "eval_auc", predictions to keep). Every rank
calls it at the same points (it may be collective: jobs/train.py scores each rank's share of the requests and gathers
the predictions) and gets the same metrics; rank 0's decisions (stop early, which epoch was best) reach every worker
through `Hooks.broadcast` all the same.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from hyformer.training import EarlyStopping, Learner, NonFiniteError

log = logging.getLogger("hyformer")

Batch = dict[str, Tensor]
Batches = Callable[[int, int], Iterable[Batch]]  # (epoch, skip) -> the epoch's batches after the first `skip`
Evaluate = Callable[[str], tuple[dict[str, float], dict[str, np.ndarray]]]


@dataclass
class Position:
    """Where training stands: ``batch`` batches of ``epoch`` are done (and ``step`` optimiser steps in all)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass(frozen=True)
class LoopConfig:
    epochs: int  # passes over the training batches (at most, with validate)
    steps_per_epoch: int  # batches per epoch and worker (progress and ETA only)
    batch_size: int  # rows per batch and worker (progress only)
    validate: bool = False  # early stopping on evaluate("val")'s AUC; the best epoch's weights are the result
    patience: int = 1  # with validate: stop after this many epochs without a better validation AUC
    log_every: int = 50  # progress line every N steps (rank 0)
    checkpoint_every: int = 0  # also report (with a checkpoint) every N steps within an epoch (0: epoch ends only)


def _same(value: Any) -> Any:
    return value


def _ignore(metrics: dict[str, float], files: dict[str, dict] | None) -> None:
    return None


def _no_progress(step: int, metrics: dict[str, float]) -> None:
    return None


@dataclass
class Hooks:
    """What the loop needs from where it runs; the defaults are one process."""

    rank: int = 0
    world: int = 1
    broadcast: Callable[[Any], Any] = _same  # rank 0's value on every worker
    # every epoch end (and every checkpoint_every steps): the metrics, and on rank 0 the files to keep with them
    report: Callable[[dict[str, float], dict[str, dict] | None], None] = _ignore
    # rank 0, every log_every steps: (global step, the progress line's numbers), e.g. to a tracking server
    progress: Callable[[int, dict[str, float]], None] = _no_progress


def train_epoch(learner: Learner, batches: Batches, cfg: LoopConfig, pos: Position, hooks: Hooks) -> dict[str, float]:
    """One epoch from ``pos`` (after its ``pos.batch`` batches done before a restart), advancing ``pos``."""
    if pos.batch:
        log.info(
            "rank %d: epoch %d resumes after batch %d (skipping the batches done before the restart)",
            hooks.rank,
            pos.epoch,
            pos.batch,
        )
    losses, n, t0 = [], 0, time.perf_counter()
    for batch in batches(pos.epoch, pos.batch):
        stats = learner.step(batch)
        losses.append(stats["loss"])
        n += len(batch["label"])
        pos.batch, pos.step = pos.batch + 1, pos.step + 1
        if hooks.rank == 0 and pos.batch % cfg.log_every == 0:
            rate = n * hooks.world / (time.perf_counter() - t0)
            left = max(0, cfg.steps_per_epoch - pos.batch) * cfg.batch_size * hooks.world / rate
            recent = float(np.mean(losses[-cfg.log_every :]))
            log.info(
                "epoch %d/%d step %d/%d: loss %.4f (last %d), grad norm %.3g, lr %.2g, %.0f samples/s (%d workers), "
                "epoch ETA %.0f s",
                pos.epoch + 1,
                cfg.epochs,
                pos.batch,
                cfg.steps_per_epoch,
                recent,
                cfg.log_every,
                stats["grad_norm"],
                stats["lr"],
                rate,
                hooks.world,
                left,
            )
            hooks.progress(
                pos.step,
                {
                    "step_train_loss": recent,
                    "step_grad_norm": float(stats["grad_norm"]),
                    "step_lr": float(stats["lr"]),
                    "step_samples_per_s": float(rate),
                    "step_epoch_eta_s": float(left),
                },
            )
        if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
            hooks.report({"train_loss_recent": float(np.mean(losses[-cfg.checkpoint_every :]))}, None)
    dt = time.perf_counter() - t0
    return {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_samples": float(n * hooks.world),
        "train_seconds": dt,
        "samples_per_s": n * hooks.world / max(dt, 1e-9),
    }


def _evaluate(evaluate: Evaluate) -> tuple[dict[str, float], dict[str, dict]]:
    m, pred = evaluate("eval")
    return m, {"eval_predictions.npz": pred}


def run_epochs(
    learner: Learner,
    model: nn.Module,
    batches: Batches,
    evaluate: Evaluate,
    cfg: LoopConfig,
    pos: Position | None = None,
    history: list[dict] | None = None,
    hooks: Hooks | None = None,
    tags: dict[str, float] | None = None,
) -> list[dict]:
    """Train from ``pos`` (a restart's position; default the start) to the end; returns the history, one entry per
    epoch (training stats, ``tags``, rank 0's evaluation) plus, with ``cfg.validate`` and a best epoch before the last,
    one entry for the restored best model (``best_epoch``). ``model`` is the unwrapped model the learner trains.

    Raises NonFiniteError (after reporting ``nonfinite_step``) when a loss or gradient became NaN/inf."""
    pos, history, hooks = pos or Position(), history if history is not None else [], hooks or Hooks()
    stopper = EarlyStopping(cfg.patience) if cfg.validate else None  # after a restart: afresh (earlier weights lost)
    first_epoch = pos.epoch  # the stopper's epoch 0
    while pos.epoch < cfg.epochs:
        try:
            m = train_epoch(learner, batches, cfg, pos, hooks)
        except NonFiniteError as e:  # on every worker at the same step: stop, with the parameters before that step
            log.error("rank %d: %s", hooks.rank, e)
            hooks.report({"nonfinite_step": float(pos.step)}, None)
            raise
        if pos.epoch == cfg.epochs - 1:
            learner.flush()  # async mode: apply the last averaged dense gradient
        m = {"epoch": pos.epoch, **(tags or {}), **m}
        stop = False
        if stopper is not None:  # every rank: the same metrics, the same weights kept for the best epoch
            m["val_auc"] = evaluate("val")[0]["eval_auc"]
            stop = stopper.update(model, m["val_auc"]) and pos.epoch < cfg.epochs - 1
        metrics, files = _evaluate(evaluate)
        m |= metrics
        if hooks.rank == 0:
            log.info("epoch %d/%d: %s", pos.epoch + 1, cfg.epochs, json.dumps({k: round(v, 5) for k, v in m.items()}))
        history.append(m)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        if stopper is not None and bool(hooks.broadcast(bool(stop))):  # every worker stops at the same epoch
            log.info(
                "rank %d: early stop after epoch %d: validation AUC has not improved for %d epoch(s)",
                hooks.rank,
                pos.epoch,
                cfg.patience,
            )
            pos.epoch = cfg.epochs
        hooks.report(m, files)
    if stopper is not None and bool(hooks.broadcast(stopper.restore(model))):  # every rank restores the same weights
        # the model of the best validation epoch is the result: one more entry (and report) with it
        best = hooks.broadcast(first_epoch + stopper.best_epoch)
        m = next(h for h in history if h["epoch"] == best) | {"epoch": len(history), "best_epoch": float(best)}
        metrics, files = _evaluate(evaluate)
        m |= metrics
        if hooks.rank == 0:
            log.info("the model of epoch %d (best validation AUC %.5f) is the result", best + 1, stopper.best_score)
        history.append(m)
        hooks.report(m, files)
    return history

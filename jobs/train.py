"""Train HyFormer with Ray Train on a built feature window; evaluate on its last day (held out).

    python -m jobs.train --features /abs/data/features/v2/<store>/window-2026-11-22-70d.json --workers 2 --grad-sync async

Data (paper §3.8.1): the window's samples (ids + sequence ordinals, a few dozen bytes each) stream from Ray Data into
the workers; the window's events are put once into the Ray object store. Each worker's collate step turns a batch
into deduplicated ID tables (``uniq_<table>`` + ``inv_<seq>``), which travel to the device, where the model embeds
the unique events only and gathers the sequences. The last day is the evaluation set, every other day trains.

Workers: ``--workers`` TorchTrainer workers, CPU + gloo by default, ``--gpu`` for one worker per GPU with nccl. Each
runs a ``hyformer.training.Learner``: dense AdamW (warmup, clipping) + row-wise Adagrad on the embedding tables,
``--grad-sync ddp`` or ``async`` (§3.8.2), bf16 autocast on GPU, a non-finite guard. Rank 0 logs progress, evaluates
the held-out day at every epoch end and writes checkpoints (model, both optimisers, position; also every
``--checkpoint-every`` steps); after a worker failure Ray Train restarts the group from the last one. See
docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from features.build import NS_GROUPS, SEQ_STREAM, SEQUENCES, FeatureConfig
from features.materialize import Materializer, Timelines
from hyformer import ARCHITECTURES, HyFormerConfig, InputSchema, build_model
from hyformer.model import RankingModel
from hyformer.training import EarlyStopping, Learner, NonFiniteError, OptimConfig, broadcast_parameters, warm_start
from hyformer.zoo import architecture
from jobs.build_features import FeatureSet
from jobs.common import absolute, init_ray, log, setup_logging
from jobs.evaluate import metrics, predict


@dataclass(frozen=True)
class TrainConfig:
    # passes over the training days (at most, with val_days: early stopping picks the best). One: sparse-id CTR models
    # overfit from the second pass on (their tables memorise; on the synthetic logs held-out AUC fell 0.696 -> 0.608
    # in epoch 2, docs/results.md), the "one-epoch phenomenon" of CTR models. Use --val-days to let data decide.
    epochs: int = 1
    val_days: int = 0  # days before the held-out day kept out of training; their AUC picks the epoch (early stopping)
    prior_bias: bool = True  # a cold start's output bias = logit(the training days' positive rate) (init_output_bias)
    patience: int = 1  # with val_days: stop after this many epochs without a better validation AUC
    batch_size: int = 256  # per worker
    lr: float = 2e-3  # dense AdamW peak learning rate
    weight_decay: float = 1e-5  # dense AdamW weight decay
    warmup_steps: int = 100  # dense LR warmup (linear), in optimiser updates
    clip_norm: float = 1.0  # dense gradient-norm clipping (0: off)
    lr_decay: str = "none"  # "cosine": both learning rates decay to min_lr_ratio x peak over the run's steps
    min_lr_ratio: float = 0.1
    sparse_optimizer: str = "rowwise_adagrad"  # embedding tables: rowwise_adagrad | adagrad | adamw (with the dense)
    sparse_lr: float = 0.05  # learning rate of the sparse optimiser
    grad_sync: str = "ddp"  # "ddp" (synchronous) | "async" (paper §3.8.2: dense gradients applied one step late)
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "fp32" | "bf16"
    workers: int = 1  # Ray Train workers (one per GPU with gpu=True)
    gpu: bool = False  # CUDA workers + nccl; else CPU workers + gloo
    cpus_per_worker: float = 2.0  # logical CPUs each worker reserves (= its torch threads)
    checkpoint_every: int = 0  # also checkpoint every N steps within an epoch (0: at epoch ends only)
    max_failures: int = 2  # Ray Train restarts the workers from the last checkpoint this many times
    init_from: str | None = None  # warm start: a checkpoint directory (config.json + model.pt) of the same architecture
    hide_sequences: bool = False  # ablation: the model masks every sequence event (HyFormerConfig.hide_sequences)
    seed: int = 0  # model init and data shuffling
    log_every: int = 50  # progress line every N steps (rank 0)
    arch: str = "hyformer"  # a name of hyformer.zoo.ARCHITECTURES: HyFormer or a baseline/ablation of Tables 1-2
    model: dict = field(default_factory=dict)  # HyFormerConfig overrides (d_model, n_layers, n_queries, ...)

    def __post_init__(self):
        self.optim()  # validates the optimiser fields

    def optim(self) -> OptimConfig:
        return OptimConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OptimConfig)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# §3.4.1 encoders as the paper uses them (HyFormerConfig.paper()): LONGER-style on the long sequence, Full Transformer
# on the 50-event search and feed sequences. Architectures that name their own encoders (hyformer/zoo.py) replace it.
PAPER_ENCODERS = {"long": "longer", "search": "transformer", "feed": "transformer"}


def input_schema(fs: FeatureSet) -> InputSchema:
    """What the feature set's batches hold: its id spaces and vocabularies, NS groups, sequence side info and lengths,
    and the dedup table each sequence indexes (the one place the model's inputs are derived from the features)."""
    return InputSchema(
        id_spaces=dict(sorted(fs.cfg.vocab.items())),
        ns_groups={g: tuple(space for _, space in cols) for g, cols in NS_GROUPS.items()},
        seq_fields=fs.cfg.seq_fields,
        sequences={s: fs.cfg.seq_len(s) for s in SEQUENCES},
        seq_tables={s: SEQ_STREAM[s] for s in SEQUENCES},  # long and search index the search-event table
        target_groups=("item",),  # the candidate's features: queries of query_source="target"
    )


def model_config(fs: FeatureSet, overrides: dict | None = None, arch: str = "hyformer", hide_sequences: bool = False) -> HyFormerConfig:
    """The config of architecture ``arch`` whose inputs match a feature set (id spaces, groups, sequences and their
    lengths), then ``overrides`` (which win over the architecture's own settings). ``hide_sequences``: the model
    masks every sequence event, in training and wherever it is scored later (it is part of the saved config)."""
    base = HyFormerConfig(
        schema=input_schema(fs),
        attn_impl="sdpa",  # the fused kernel; tests hold it equal to "reference"
        seq_encoder=PAPER_ENCODERS,
    )
    return architecture(arch).config(base, (overrides or {}) | ({"hide_sequences": True} if hide_sequences else {}))


class MaterializeCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: a batch of stored samples -> dedup ID tables (``dedup=False``: full sequences)
    as CPU tensors (device: Ray)."""

    def __init__(self, timelines: Timelines, cfg: FeatureConfig, dedup: bool = True):
        self.materialize = Materializer(timelines, cfg, dedup=dedup)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.materialize(batch).items()}


def model_dataset(fs: FeatureSet, days: list[str] | tuple[str, ...], shuffle: bool, seed: int = 0) -> ray.data.Dataset:
    """The stored samples of ``days`` (one file per day and shard); ``shuffle``: files in a seeded random order."""
    ds = ray.data.read_parquet(fs.sample_files(days), partitioning=None).drop_columns(["day"])  # strings: no tensors
    return ds.randomize_block_order(seed=seed) if shuffle else ds


def positive_rate(ds: ray.data.Dataset) -> float:
    """The share of label-1 rows, summed over a stream of label batches. Not ``Dataset.mean``: an aggregate runs
    shuffle tasks, which cannot be scheduled inside a Ray Tune trial's placement group (workflows/tune.py)."""
    positives, rows = 0.0, 0
    for batch in ds.select_columns(["label"]).iter_batches(batch_size=65_536, batch_format="numpy"):
        positives, rows = positives + float(batch["label"].sum()), rows + len(batch["label"])
    if not rows:
        raise ValueError("no training rows: the positive rate is undefined")
    return positives / rows


# --- worker side --------------------------------------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands: ``batch`` batches of ``epoch`` are done (and ``step`` optimiser steps in all)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


def save_checkpoint(directory: str, model: RankingModel, learner: Learner, pos: Position, history: list[dict]) -> None:
    """config.json + model.pt (what hyformer.load_model reads), train_state.pt (both optimisers, the async pending
    gradient, the position: everything a restarted worker group needs to go on exactly) and history.json (the
    metrics of every finished epoch; Ray keeps only the last checkpoints' metrics)."""
    model.save(directory)
    torch.save({"learner": learner.state_dict(), "position": dataclasses.asdict(pos)}, os.path.join(directory, "train_state.pt"))
    with open(os.path.join(directory, "history.json"), "w") as f:
        json.dump(history, f)


def restore_checkpoint(checkpoint: Checkpoint, model: RankingModel, learner: Learner) -> tuple[Position, list[dict]]:
    with checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location=learner.device, weights_only=True))
        state = torch.load(os.path.join(d, "train_state.pt"), map_location=learner.device, weights_only=False)
        with open(os.path.join(d, "history.json")) as f:
            history = json.load(f)
    learner.load_state_dict(state["learner"])
    return Position(**state["position"]), history


def report(metrics: dict, model: RankingModel, learner: Learner, pos: Position, history: list[dict], files: dict[str, dict] | None = None) -> None:
    """ray.train.report on every worker (a barrier); rank 0 attaches a checkpoint of ``pos`` (+ npz ``files``)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(tmp, model, learner, pos, history)
            for name, arrays in (files or {}).items():
                np.savez(os.path.join(tmp, name), **arrays)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": pos.epoch, "step": pos.step} | metrics, checkpoint=checkpoint)


def train_epoch(learner: Learner, model: RankingModel, batches, tc: TrainConfig, pos: Position, history: list[dict], steps_per_epoch: int) -> dict[str, float]:
    """Train one epoch from ``pos`` (skipping its ``pos.batch`` batches done before a restart), advancing ``pos``.
    Every ``tc.checkpoint_every`` steps all workers report a checkpoint."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if pos.batch:
        log.info("rank %d: epoch %d resumes after batch %d (skipping the batches done before the restart)", rank, pos.epoch, pos.batch)
        batches = itertools.islice(batches, pos.batch, None)
    losses, n, t0 = [], 0, time.perf_counter()
    for batch in batches:
        stats = learner.step(batch)
        losses.append(stats["loss"])
        n += len(batch["label"])
        pos.batch, pos.step = pos.batch + 1, pos.step + 1
        if rank == 0 and pos.batch % tc.log_every == 0:
            rate = n * world / (time.perf_counter() - t0)
            left = max(0, steps_per_epoch - pos.batch) * tc.batch_size * world / rate
            log.info(
                "epoch %d/%d step %d/%d: loss %.4f (last %d), grad norm %.3g, lr %.2g, %.0f samples/s (%d workers), epoch ETA %.0f s",
                pos.epoch + 1, tc.epochs, pos.batch, steps_per_epoch, np.mean(losses[-tc.log_every :]), tc.log_every,
                stats["grad_norm"], stats["lr"], rate, world, left,
            )
        if tc.checkpoint_every and pos.step % tc.checkpoint_every == 0:
            report({"train_loss_recent": float(np.mean(losses[-tc.checkpoint_every :]))}, model, learner, pos, history)
    dt = time.perf_counter() - t0
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "train_samples": float(n * world), "train_seconds": dt, "samples_per_s": n * world / max(dt, 1e-9)}


def train_fn_per_worker(config: dict) -> None:
    tc = TrainConfig(**config["train"])
    mc = HyFormerConfig.from_dict(config["model"])
    torch.manual_seed(tc.seed)
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    model = build_model(mc)
    if tc.prior_bias:
        model.init_output_bias(config["positive_rate"])
    if config["init_state"] is not None:  # merged on the driver (load_init_state)
        model.load_state_dict(ray.get(config["init_state"]))
    raw = model
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if tc.grad_sync == "ddp" else None)
    device = ray.train.torch.get_device()
    if tc.grad_sync == "async":
        broadcast_parameters(model)  # what DDP does at construction
    steps_per_epoch = math.ceil(config["train_rows"] / (tc.batch_size * ray.train.get_context().get_world_size()))
    learner = Learner(model, tc.optim(), device, total_steps=steps_per_epoch * tc.epochs)
    pos, restored, history = Position(), -1, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        pos, history = restore_checkpoint(checkpoint, raw, learner)
        restored = pos.step
        if rank == 0:
            log.info("restored from checkpoint at epoch %d batch %d (step %d)", pos.epoch, pos.batch, pos.step)
    collate = MaterializeCollate(ray.get(config["timelines"]), FeatureConfig(**config["features"]))
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    val_shard = ray.train.get_dataset_shard("val") if tc.val_days else None
    # early stopping starts afresh after a restart (the weights of epochs before it are not kept)
    stopper = EarlyStopping(tc.patience) if tc.val_days else None
    first_epoch = pos.epoch  # the stopper's epoch 0
    while pos.epoch < tc.epochs:
        batches = train_shard.iter_torch_batches(
            batch_size=tc.batch_size, collate_fn=collate, device=device,
            local_shuffle_buffer_size=4 * tc.batch_size, local_shuffle_seed=tc.seed + pos.epoch,
        )
        try:
            m = train_epoch(learner, raw, batches, tc, pos, history, steps_per_epoch)
        except NonFiniteError as e:  # on every worker at the same step: stop (no retry), and let the driver fail the run
            log.error("rank %d: %s", rank, e)
            # with a checkpoint (the parameters before the failing step), or the driver would not see these metrics
            report({"nonfinite_step": float(pos.step)}, raw, learner, pos, history)
            return
        if pos.epoch == tc.epochs - 1:
            learner.flush()  # async mode: apply the last averaged dense gradient
        m = {"epoch": pos.epoch, "restored_step": float(restored), **m}
        files, stop = None, False
        if rank == 0:  # eval is not split: rank 0 scores the whole held-out day (and the validation days)
            if val_shard is not None:
                m["val_auc"] = metrics(predict(raw, val_shard.iter_torch_batches(batch_size=1024, collate_fn=collate, device=device)))["eval_auc"]
                stop = stopper.update(raw, m["val_auc"]) and pos.epoch < tc.epochs - 1
            pred = predict(raw, eval_shard.iter_torch_batches(batch_size=1024, collate_fn=collate, device=device))
            m |= metrics(pred)
            files = {"eval_predictions.npz": pred}
            log.info("epoch %d/%d: %s", pos.epoch + 1, tc.epochs, json.dumps({k: round(v, 5) for k, v in m.items()}))
        history.append(m)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        if stopper is not None and broadcast_flag(stop):  # every worker stops at the same epoch
            log.info("rank %d: early stop after epoch %d: validation AUC has not improved for %d epoch(s)", rank, pos.epoch, tc.patience)
            pos.epoch = tc.epochs
        report(m, raw, learner, pos, history, files)
    if stopper is not None:  # the model of the best validation epoch is the result: one more report with it
        keep = broadcast_flag(rank == 0 and stopper.restore(raw))
        if keep:
            best = broadcast_value(first_epoch + stopper.best_epoch if rank == 0 else None)  # only rank 0 validates
            files = None
            m = next(h for h in history if h["epoch"] == best) | {"epoch": len(history), "best_epoch": float(best)}
            if rank == 0:
                pred = predict(raw, eval_shard.iter_torch_batches(batch_size=1024, collate_fn=collate, device=device))
                m |= metrics(pred)
                files = {"eval_predictions.npz": pred}
                log.info("the model of epoch %d (best validation AUC %.5f) is the result", best + 1, stopper.best_score)
            history.append(m)
            report(m, raw, learner, pos, history, files)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every worker (a decision only rank 0 can make, which every worker must follow)."""
    return bool(broadcast_value(bool(flag)))


def broadcast_value(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every worker; the value itself without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


# --- driver side --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    checkpoint_dir: str  # last checkpoint: config.json, model.pt, eval_predictions.npz
    metrics: dict[str, float]  # last epoch
    history: list[dict[str, float]]  # every epoch
    model_config: HyFormerConfig
    train_config: TrainConfig


def load_init_state(tc: TrainConfig, mc: HyFormerConfig) -> dict[str, torch.Tensor] | None:
    """The initial weights of a warm start from ``tc.init_from``: merged here, once, into the model a worker would
    build (same seed), so a wrong architecture fails before any worker starts and grown tables get the rows a worker
    would have initialised."""
    if tc.init_from is None:
        return None
    path = absolute(tc.init_from)
    if not os.path.exists(os.path.join(path, "model.pt")):
        raise FileNotFoundError(f"init_from={tc.init_from!r}: no model.pt there (a checkpoint directory of jobs.train or hyformer's model.save)")
    state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    with torch.random.fork_rng():
        torch.manual_seed(tc.seed)  # as train_fn_per_worker
        model = build_model(mc)
    try:
        adapted = warm_start(model, state)
    except ValueError as e:
        raise ValueError(f"init_from={tc.init_from!r}: {e}") from e
    log.info("train: warm start from %s%s", path, f"; grown tables: {'; '.join(adapted)}" if adapted else "")
    return model.state_dict()


def train(
    fs: FeatureSet, tc: TrainConfig, storage_path: str, run_name: str, callbacks: list | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Fit on every day of ``fs`` but the last, evaluate on the last. ``run_name`` must be new (Ray resumes reused names).
    ``callbacks``: Ray Train ``RunConfig`` callbacks (e.g. Tune's ``TuneReportCallback``, which forwards every report).
    ``init_state``: the warm start's merged weights when the caller already built them with ``load_init_state`` (else
    they are built here from ``tc.init_from``).

    Raises NonFiniteError when the loss or a gradient became NaN/inf (training stops on every worker at that step).
    """
    if len(fs.days) < 2 + tc.val_days:
        raise ValueError(f"need at least {2 + tc.val_days} days (train + {tc.val_days} validation + held-out), the feature window has {len(fs.days)}")
    mc = model_config(fs, tc.model, tc.arch, tc.hide_sequences)
    if init_state is None:
        init_state = load_init_state(tc, mc)
    first_val = len(fs.days) - 1 - tc.val_days
    datasets = {
        "train": model_dataset(fs, fs.days[:first_val], shuffle=True, seed=tc.seed),
        "eval": model_dataset(fs, fs.days[-1:], shuffle=False),
    }
    if tc.val_days:
        datasets["val"] = model_dataset(fs, fs.days[first_val:-1], shuffle=False)
    t0 = time.perf_counter()
    timelines = fs.timelines()
    log.info("train: window events loaded in %.1f s (%.1f MB), shared through the object store", time.perf_counter() - t0, timelines.nbytes() / 1e6)
    loop_config = {
        "train": tc.to_dict(), "model": mc.to_dict(), "features": fs.cfg.to_dict(), "timelines": ray.put(timelines),
        "init_state": None if init_state is None else ray.put(init_state), "train_rows": datasets["train"].count(),
        "positive_rate": positive_rate(model_dataset(fs, fs.days[:first_val], shuffle=False)) if tc.prior_bias else None,
    }
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tc.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=tc.gpu, resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=absolute(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2), failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    log.info(
        "train: %s, %d workers (%s, grad sync %s), %d training samples, days %s..%s, held out %s",
        tc.arch, tc.workers, "gpu/nccl" if tc.gpu else "cpu/gloo", tc.grad_sync, loop_config["train_rows"], fs.days[0], fs.days[first_val - 1], fs.days[-1],
    )
    result = trainer.fit()
    if "nonfinite_step" in (result.metrics or {}):
        raise NonFiniteError(
            f"training {run_name!r} stopped: non-finite loss or gradient at step {int(result.metrics['nonfinite_step'])} "
            f"(epoch {int(result.metrics['epoch'])}); parameters and checkpoints before it are finite (lower the lr?)"
        )
    with open(os.path.join(result.checkpoint.path, "history.json")) as f:
        history = [{k: float(v) for k, v in h.items()} for h in json.load(f)]
    return TrainResult(result.checkpoint.path, history[-1] | {"step": float(result.metrics["step"])}, history, mc, tc)


def add_train_arguments(p: argparse.ArgumentParser, defaults: TrainConfig = TrainConfig()) -> None:
    """The training flags shared by this job's CLI and the daily workflow (read back by `train_config`)."""
    d = defaults
    g = p.add_argument_group("training (jobs.train)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training days (at most, with --val-days)")
    g.add_argument("--val-days", type=int, default=d.val_days, help="days before the held-out one kept out of training; their AUC picks the best epoch (early stopping, 0: off)")
    g.add_argument("--patience", type=int, default=d.patience, help="with --val-days: stop after this many epochs without a better validation AUC")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker")
    g.add_argument("--lr", type=float, default=d.lr, help="dense AdamW peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="dense LR linear warmup (updates)")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm, help="dense gradient-norm clipping, 0: off")
    g.add_argument("--lr-decay", choices=("none", "cosine"), default=d.lr_decay, help="after warmup: constant LRs, or a half cosine to min_lr_ratio x peak over the run")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="with --lr-decay cosine: the last step's LR / peak")
    g.add_argument("--sparse-optimizer", default=d.sparse_optimizer, choices=("rowwise_adagrad", "adagrad", "adamw"), help="optimiser of the embedding tables")
    g.add_argument("--sparse-lr", type=float, default=d.sparse_lr)
    g.add_argument("--grad-sync", default=d.grad_sync, choices=("ddp", "async"), help="ddp: synchronous; async: paper §3.8.2, dense gradients all-reduced during the next step and applied one step late")
    g.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers")
    g.add_argument("--gpu", action="store_true", help="one worker per GPU (nccl) instead of CPU/gloo")
    g.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="also checkpoint every N steps (0: epoch ends)")
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts from the last checkpoint")
    g.add_argument("--arch", default=d.arch, choices=sorted(ARCHITECTURES), help="HyFormer or a baseline/ablation of the paper's Tables 1-2 (hyformer/zoo.py)")
    g.add_argument("--model", default=json.dumps(d.model), help='HyFormerConfig overrides as JSON, e.g. \'{"d_model": 64}\'')
    g.add_argument("--hide-sequences", action="store_true", help="ablation: mask every behaviour sequence out")
    g.add_argument("--prior-bias", action=argparse.BooleanOptionalAction, default=d.prior_bias, help="start the output bias at logit(the training days' positive rate)")
    g.add_argument("--seed", type=int, default=d.seed)


def train_config(a: argparse.Namespace, **extra) -> TrainConfig:
    """The TrainConfig of flags added by `add_train_arguments` (+ ``extra`` fields)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return TrainConfig(**({k: v for k, v in vars(a).items() if k in names} | {"model": json.loads(a.model)} | extra))


def load_train_overrides(path: str) -> dict:
    """The TrainConfig fields of a best_config.json written by workflows/tune.py (``{"train": {...}, "metric": ...}``).

    Returns a dict of TrainConfig field -> value (``"model"``: the full HyFormerConfig overrides of the tuned model);
    apply it over the run's own config, e.g. ``dataclasses.replace(tc, **load_train_overrides(path))``. Raises
    ValueError when the file is not in that format or a field is unknown or invalid.
    """
    with open(path) as f:
        doc = json.load(f)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(doc, dict) or not isinstance(doc.get("train"), dict):
        raise ValueError(f"{path}: not a tuning result (expected a JSON object with a 'train' object)")
    unknown = sorted(set(doc["train"]) - train_fields)
    if unknown:
        raise ValueError(f"{path}: 'train' has fields TrainConfig does not know: {unknown}")
    model = doc["train"].get("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"{path}: 'train.model' must be an object of HyFormerConfig overrides")
    unknown = sorted(set(model) - {f.name for f in dataclasses.fields(HyFormerConfig)})
    if unknown:
        raise ValueError(f"{path}: 'train.model' has fields HyFormerConfig does not know: {unknown}")
    try:
        TrainConfig(**doc["train"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'train' is not a valid TrainConfig: {e}") from e
    return dict(doc["train"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train HyFormer on a feature window with Ray Train; the last day is held out.")
    p.add_argument("--features", required=True, help="window-*.json written by jobs.build_features")
    p.add_argument("--storage", default=None, help="Ray Train storage path (default: <data>/train)")
    p.add_argument("--name", default=None, help="run name (default: train-<timestamp>)")
    p.add_argument("--init-from", default=None, help="warm start: a checkpoint directory of the same architecture")
    add_train_arguments(p)
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    fs = FeatureSet.load(absolute(a.features))
    tc = train_config(a)
    res = train(fs, tc, a.storage or os.path.normpath(f"{fs.root}/../../../train"), a.name or f"train-{int(time.time())}")
    print(json.dumps({"checkpoint": res.checkpoint_dir, **res.metrics}))


if __name__ == "__main__":
    main()

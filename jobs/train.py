"""Train HyFormer with Ray Train on a built feature window; evaluate on its last day (held out).

    python -m jobs.train --features /abs/data/features/v2/<store>/window-2026-11-22-70d.json --workers 1 --epochs 2

Data (paper §3.8.1): the window's samples (ids + sequence ordinals, a few dozen bytes each) stream from Ray Data into
the workers; the window's events are put once into the Ray object store and shared by the workers of a node. Each
worker's collate step (in Ray Data's prefetch threads) turns a batch of ordinals into deduplicated ID tables
(``uniq_<stream>`` + ``inv_<seq>``), which travel to the device. There the model embeds and projects only the
unique events and gathers the (B, L, Ds) sequence tokens; backward sums the gradients into the unique rows. The last
day is the evaluation set, every other day trains. Workers: ``--workers`` TorchTrainer workers, CPU + gloo by default, ``--gpu`` for one worker per GPU with nccl. Every epoch each worker
reports (a barrier); rank 0 evaluates the held-out day and saves a checkpoint (``config.json`` + ``model.pt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint, CheckpointConfig, DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from features.build import NS_GROUPS, SEQ_STREAM, SEQUENCES, FeatureConfig
from features.materialize import Materializer, Timelines
from hyformer import ARCHITECTURES, HyFormerConfig, build_model
from hyformer.zoo import architecture
from jobs.build_features import FeatureSet
from jobs.common import absolute, init_ray, log, setup_logging
from jobs.evaluate import mask_sequences, metrics, predict


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2  # passes over the training days
    batch_size: int = 256  # per worker
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-5  # AdamW weight decay (dense and embeddings alike, for now)
    workers: int = 1  # Ray Train workers (one per GPU with gpu=True)
    gpu: bool = False  # CUDA workers + nccl; else CPU workers + gloo
    cpus_per_worker: float = 2.0  # logical CPUs each worker reserves (= its torch threads)
    hide_sequences: bool = False  # ablation: every sequence length set to 0 (train and eval)
    seed: int = 0  # model init and data shuffling
    log_every: int = 50  # progress line every N steps (rank 0)
    arch: str = "hyformer"  # a name of hyformer.zoo.ARCHITECTURES: HyFormer or a baseline/ablation of Tables 1-2
    model: dict = field(default_factory=dict)  # HyFormerConfig overrides (d_model, n_layers, n_queries, ...)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config(fs: FeatureSet, overrides: dict | None = None, arch: str = "hyformer") -> HyFormerConfig:
    """The config of architecture ``arch`` whose inputs match a feature set (id spaces, groups, sequences and their
    lengths), then ``overrides`` (which win over the architecture's own settings)."""
    base = HyFormerConfig(
        id_spaces=tuple(sorted(fs.cfg.vocab.items())),
        ns_groups=tuple((g, tuple(space for _, space in cols)) for g, cols in NS_GROUPS.items()),
        seq_fields=fs.cfg.seq_fields,
        sequences=tuple((s, fs.cfg.seq_len(s)) for s in SEQUENCES),
        target_groups=("item",),  # the candidate's features: queries of query_source="target"
        seq_tables=tuple((s, SEQ_STREAM[s]) for s in SEQUENCES),  # long and search index the search-event table
        attn_impl="sdpa",  # the fused kernel; tests hold it equal to "reference"
    )
    return architecture(arch).config(base, overrides)


class MaterializeCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: a batch of stored samples -> dedup ID tables as CPU tensors (device: Ray)."""

    def __init__(self, timelines: Timelines, cfg: FeatureConfig):
        self.materialize = Materializer(timelines, cfg, dedup=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.materialize(batch).items()}


def model_dataset(fs: FeatureSet, days: list[str] | tuple[str, ...], shuffle: bool) -> ray.data.Dataset:
    """The stored samples of ``days`` (one file per day and shard)."""
    ds = ray.data.read_parquet(fs.sample_files(days), partitioning=None).drop_columns(["day"])  # strings: no tensors
    return ds.randomize_block_order() if shuffle else ds


# --- worker side --------------------------------------------------------------------------------------------------


def train_epoch(model, opt, batches, tc: TrainConfig, epoch: int, device) -> dict[str, float]:
    model.train()
    rank = ray.train.get_context().get_world_rank()
    losses, n, t0 = [], 0, time.perf_counter()
    for step, batch in enumerate(batches):
        if tc.hide_sequences:
            batch = mask_sequences(batch)
        logits = model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch} step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        n += len(batch["label"])
        if rank == 0 and (step + 1) % tc.log_every == 0:
            dt = time.perf_counter() - t0
            log.info("epoch %d step %d: loss %.4f (last %d), %.0f samples/s/worker", epoch, step + 1, np.mean(losses[-tc.log_every :]), tc.log_every, n / dt)
    dt = time.perf_counter() - t0
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "train_samples": float(n), "train_seconds": dt, "samples_per_s": n / max(dt, 1e-9)}


def train_fn_per_worker(config: dict) -> None:
    tc = TrainConfig(**config["train"])
    mc = HyFormerConfig.from_dict(config["model"])
    torch.manual_seed(tc.seed)
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model = ray.train.torch.prepare_model(build_model(mc))
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    collate = MaterializeCollate(ray.get(config["timelines"]), FeatureConfig(**config["features"]))
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    raw = model.module if hasattr(model, "module") else model
    for epoch in range(tc.epochs):
        batches = train_shard.iter_torch_batches(
            batch_size=tc.batch_size, collate_fn=collate, device=device,
            local_shuffle_buffer_size=4 * tc.batch_size, local_shuffle_seed=tc.seed + epoch,
        )
        m = {"epoch": epoch} | train_epoch(model, opt, batches, tc, epoch, device)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:  # eval is not split: rank 0 scores the whole held-out day
                pred = predict(raw, eval_shard.iter_torch_batches(batch_size=1024, collate_fn=collate, device=device), hide_sequences=tc.hide_sequences)
                m |= metrics(pred)
                raw.save(tmp)
                np.savez(os.path.join(tmp, "eval_predictions.npz"), **pred)
                checkpoint = Checkpoint.from_directory(tmp)
                log.info("epoch %d: %s", epoch, json.dumps({k: round(v, 5) for k, v in m.items()}))
            ray.train.report(m, checkpoint=checkpoint)


# --- driver side --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    checkpoint_dir: str  # last checkpoint: config.json, model.pt, eval_predictions.npz
    metrics: dict[str, float]  # last epoch
    history: list[dict[str, float]]  # every epoch
    model_config: HyFormerConfig
    train_config: TrainConfig


def train(fs: FeatureSet, tc: TrainConfig, storage_path: str, run_name: str) -> TrainResult:
    """Fit on every day of ``fs`` but the last, evaluate on the last. ``run_name`` must be new (Ray resumes reused names)."""
    if len(fs.days) < 2:
        raise ValueError(f"need at least 2 days (train + held-out), the feature window has {len(fs.days)}")
    mc = model_config(fs, tc.model, tc.arch)
    datasets = {
        "train": model_dataset(fs, fs.days[:-1], shuffle=True),
        "eval": model_dataset(fs, fs.days[-1:], shuffle=False),
    }
    t0 = time.perf_counter()
    timelines = fs.timelines()
    log.info("train: window events loaded in %.1f s (%.1f MB), shared through the object store", time.perf_counter() - t0, timelines.nbytes() / 1e6)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"train": tc.to_dict(), "model": mc.to_dict(), "features": fs.cfg.to_dict(), "timelines": ray.put(timelines)},
        torch_config=TorchConfig(backend="nccl" if tc.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=tc.gpu, resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=absolute(storage_path), checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    log.info("train: %d workers (%s), days %s..%s, held out %s", tc.workers, "gpu/nccl" if tc.gpu else "cpu/gloo", fs.days[0], fs.days[-2], fs.days[-1])
    result = trainer.fit()
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [result.metrics]
    history = [{k: float(v) for k, v in h.items() if isinstance(v, (int, float, np.number))} for h in history]
    return TrainResult(result.checkpoint.path, dict(history[-1]), history, mc, tc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train HyFormer on a feature window with Ray Train; the last day is held out.")
    p.add_argument("--features", required=True, help="window-*.json written by jobs.build_features")
    p.add_argument("--storage", default=None, help="Ray Train storage path (default: <data>/train)")
    p.add_argument("--name", default=None, help="run name (default: train-<timestamp>)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="one worker per GPU, nccl")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hide-sequences", action="store_true", help="ablation: mask every behaviour sequence out")
    p.add_argument("--arch", default="hyformer", choices=sorted(ARCHITECTURES), help="HyFormer or a baseline/ablation of the paper's Tables 1-2 (hyformer/zoo.py)")
    p.add_argument("--model", default="{}", help='HyFormerConfig overrides as JSON, e.g. \'{"d_model": 64}\'')
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    fs = FeatureSet.load(absolute(a.features))
    tc = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, workers=a.workers, gpu=a.gpu, hide_sequences=a.hide_sequences, arch=a.arch, model=json.loads(a.model))
    res = train(fs, tc, a.storage or os.path.normpath(f"{fs.root}/../../../train"), a.name or f"train-{int(time.time())}")
    print(json.dumps({"checkpoint": res.checkpoint_dir, **res.metrics}))


if __name__ == "__main__":
    main()

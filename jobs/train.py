"""Train HyFormer with Ray Train on a built feature window; evaluate on its last day (held out).

    python -m jobs.train --features /abs/data/features/v2/<store>/window-2026-11-22-70d.json \
        --workers 2 --grad-sync async

Data (paper §3.8.1): the driver plans, the workers read. Each worker owns a slice of the users
(features.shards.UserSlice: the store's user shards dealt out to the workers) and reads its users' events of the
window and their samples (ids + sequence ordinals, a few dozen bytes each) from storage itself, a piece (day x shard)
at a time; the driver reads only the days' pointers and the Parquet footers, so its memory does not grow with the
window. Every worker runs the same number of steps per epoch (the largest slice's; smaller slices start over, as
torch's DistributedSampler pads). A background thread turns each batch into deduplicated ID tables
(``uniq_<table>`` + ``inv_<seq>``), which travel to the device, where the model embeds the unique events only and
gathers the sequences. The last day is the evaluation set, every other day trains.

Workers: ``--workers`` TorchTrainer workers, CPU + gloo by default, ``--gpu`` for one worker per GPU with nccl. Each
runs a ``hyformer.training.Learner``: dense AdamW (warmup, clipping) + row-wise Adagrad on the embedding tables,
``--grad-sync ddp`` or ``async`` (§3.8.2), bf16 autocast on GPU, a non-finite guard. At every epoch end each worker
scores its own users' held-out requests (a request is whole in one slice) and the predictions are gathered, so
every worker has the metrics; rank 0 logs progress and writes checkpoints (model, both optimisers, position; also every
``--checkpoint-every`` steps); after a worker failure Ray Train restarts the group from the last one. See
docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from features import storage
from features.build import FeatureConfig
from features.materialize import Materializer, Timelines
from features.shards import Samples, UserSlice, prefetched
from hyformer import HyFormerConfig, InputSchema, build_model
from hyformer.loop import Hooks, LoopConfig, Position, run_epochs
from hyformer.model import RankingModel
from hyformer.training import Learner, NonFiniteError, broadcast_parameters, ddp_ignored_parameters, warm_start
from hyformer.zoo import architecture
from jobs.build_features import FeatureSet
from jobs.common import init_ray, log, setup_logging
from jobs.evaluate import metrics, predict
from jobs.train_config import TrainConfig, add_train_arguments, train_config


def paper_encoders(cfg: FeatureConfig) -> dict[str, str]:
    """§3.4.1 encoders as the paper uses them (HyFormerConfig.paper()): LONGER-style on the long-term sequence (the
    one without a relevance rule), Full Transformer on the query-relevant ones. Architectures that name their own
    encoders (hyformer/zoo.py), and model.seq_encoder, replace it."""
    return {n: "longer" if s.relevance == "none" else "transformer" for n, s in cfg.sequence_specs().items()}


def input_schema(fs: FeatureSet) -> InputSchema:
    """What the feature set's batches hold (features.spec): its id spaces and vocabularies, one NS group per token
    (its id features' spaces, its dense features), sequence side info and lengths, the dedup table each sequence
    indexes (the one place the model's inputs are derived from the features)."""
    cfg = fs.cfg
    groups = cfg.token_groups()
    ids = {g: tuple(cfg.id_space(n) for n in names if cfg.feature_kind(n) == "id") for g, names in groups.items()}
    dense = {g: tuple(n for n in names if cfg.feature_kind(n) == "dense") for g, names in groups.items()}
    bags = {g: tuple(cfg.id_space(n) for n in names if cfg.feature_kind(n) == "ids") for g, names in groups.items()}
    return InputSchema(
        id_spaces=dict(sorted(cfg.vocab.items())),
        ns_groups=ids,
        dense={g: names for g, names in dense.items() if names},
        bags={g: spaces for g, spaces in bags.items() if spaces},
        seq_fields=cfg.seq_fields,
        seq_side={n: f for n in cfg.sequence_specs() if (f := cfg.seq_fields_of(n)) != cfg.seq_fields},
        sequences={s: cfg.seq_len(s) for s in cfg.sequence_specs()},
        seq_tables=cfg.seq_tables(),  # sequences of one unfiltered table share its dedup table
        target_groups=cfg.candidate_tokens(),  # the candidate's features: queries of query_source="target"
    )


def model_config(
    fs: FeatureSet, overrides: dict | None = None, arch: str = "hyformer", hide_sequences: bool = False
) -> HyFormerConfig:
    """The config of architecture ``arch`` whose inputs match a feature set (id spaces, groups, sequences and their
    lengths), then ``overrides`` (which win over the architecture's own settings). ``hide_sequences``: the model
    masks every sequence event, in training and wherever it is scored later (it is part of the saved config)."""
    # not validated on its own: the schema's token count may need the overrides' d_model (validated once, at the end)
    base = {
        "schema": dataclasses.asdict(input_schema(fs)),
        "attn_impl": "sdpa",  # the fused kernel; tests hold it equal to "reference"
        "seq_encoder": paper_encoders(fs.cfg),
    }
    return architecture(arch).config(base, (overrides or {}) | ({"hide_sequences": True} if hide_sequences else {}))


def match_width(
    fs: FeatureSet,
    overrides: dict,
    arch: str,
    distance: Callable[[HyFormerConfig], float],
    widths: Iterable[int],
) -> HyFormerConfig:
    """The model_config of ``arch`` at the ``d_model`` among ``widths`` (ascending) that the architecture accepts and
    whose ``distance`` is smallest (ties: the wider). Token mixing splits D into T = queries + NS tokens parts and
    attention splits it into heads, so which widths are valid depends on the rest of the config. ``distance`` must
    fall, then rise, with the width (e.g. |d_model - target| or |dense params - target|): the search stops once it
    rises past the best. Raises the config's own error (naming the violated rule) when no width is valid."""
    best: tuple[tuple[float, int], HyFormerConfig] | None = None
    for d in widths:
        try:
            cfg = model_config(fs, overrides | {"d_model": d}, arch)
        except ValueError:  # a width the architecture cannot split into its heads / tokens
            continue
        key = (distance(cfg), -d)
        if best is not None and key[0] > best[0][0]:
            break
        if best is None or key < best[0]:
            best = (key, cfg)
    if best is None:
        model_config(fs, overrides, arch)  # raises the error naming the violated constraint
        raise ValueError(f"{arch}: no valid d_model among the widths tried, with overrides {overrides}")
    return best[1]


class MaterializeCollate:
    """A batch of stored samples (numpy columns) -> dedup ID tables (``dedup=False``: full sequences) as CPU
    tensors."""

    def __init__(self, timelines: Timelines, cfg: FeatureConfig, dedup: bool = True):
        self.materialize = Materializer(timelines, cfg, dedup=dedup)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.materialize(batch).items()}


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank; ``[value]`` without a group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, value)
    return parts


def gather_predictions(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's predictions (``jobs.evaluate.predict``'s columns), concatenated, on every rank (a rank with none
    adds nothing: its empty columns carry no dtype)."""
    parts = [p for p in gather(pred) if len(p["label"])] or [pred]
    return {k: np.concatenate([p[k] for p in parts]) for k in pred}


# --- worker side --------------------------------------------------------------------------------------------------


def save_checkpoint(directory: str, model: RankingModel, learner: Learner, pos: Position, history: list[dict]) -> None:
    """config.json + model.pt (what hyformer.load_model reads), train_state.pt (both optimisers, the async pending
    gradient, the position: everything a restarted worker group needs to go on exactly) and history.json (the
    metrics of every finished epoch; Ray keeps only the last checkpoints' metrics)."""
    model.save(directory)
    torch.save(
        {"learner": learner.state_dict(), "position": dataclasses.asdict(pos)},
        os.path.join(directory, "train_state.pt"),
    )
    with open(os.path.join(directory, "history.json"), "w") as f:
        json.dump(history, f)


def restore_checkpoint(checkpoint: Checkpoint, model: RankingModel, learner: Learner) -> tuple[Position, list[dict]]:
    with checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location=learner.device, weights_only=True))
        state = torch.load(os.path.join(d, "train_state.pt"), map_location=learner.device, weights_only=True)
        with open(os.path.join(d, "history.json")) as f:
            history = json.load(f)
    learner.load_state_dict(state["learner"])
    return Position(**state["position"]), history


def report(
    metrics: dict,
    model: RankingModel,
    learner: Learner,
    pos: Position,
    history: list[dict],
    files: dict[str, dict] | None = None,
) -> None:
    """ray.train.report on every worker (a barrier); rank 0 attaches a checkpoint of ``pos`` (+ npz ``files``)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(tmp, model, learner, pos, history)
            for name, arrays in (files or {}).items():
                np.savez(os.path.join(tmp, name), **arrays)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": pos.epoch, "step": pos.step} | metrics, checkpoint=checkpoint)


def train_fn_per_worker(config: dict) -> None:
    """One Ray Train worker: build the model (prior bias, warm start), restore a checkpoint after a restart, and run
    the training loop of hyformer/loop.py on this worker's shard, reporting every epoch (with a checkpoint)."""
    tc = TrainConfig.from_dict(config["train"])
    mc = HyFormerConfig.from_dict(config["model"])
    torch.manual_seed(tc.seed)
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # this worker's users: their events of the window and their samples of each split, read from storage here
    layout = config["layout"]
    owner = UserSlice(layout.n_shards, rank, world)
    own = {split: Samples(layout.pieces("samples", days, owner)) for split, days in config["splits"].items()}
    counts = gather(own["train"].count())  # (rows, positives) of every rank
    rows, positives, most = sum(c[0] for c in counts), sum(c[1] for c in counts), max(c[0] for c in counts)
    if min(c[0] for c in counts) == 0:
        raise ValueError(
            f"training rows per worker {[c[0] for c in counts]}: a worker whose users have no training samples "
            "(fewer workers, or a longer window)"
        )
    collate = MaterializeCollate(layout.timelines(owner), FeatureConfig(**config["features"]))
    model = build_model(mc)
    if tc.prior_bias:
        model.init_output_bias(positives / rows)
    if config["init_state"] is not None:  # merged on the driver (load_init_state)
        model.load_state_dict(ray.get(config["init_state"]))
    raw = model
    ddp = tc.optim.grad_sync == "ddp"
    ignored = ddp_ignored_parameters(raw, tc.optim) if ddp else []  # large tables: exchanged row-sparse instead
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if ddp else None)
    device = ray.train.torch.get_device()
    if not ddp:
        broadcast_parameters(model)  # what DDP does at construction
    elif ignored:
        broadcast_parameters(raw, names=ignored)  # DDP does not broadcast the parameters it ignores
    steps_per_epoch = math.ceil(most / tc.batch_size)  # the largest slice's; the others start over to keep in step
    learner = Learner(model, tc.optim, device, total_steps=steps_per_epoch * tc.epochs)
    pos, restored, history = Position(), -1, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        pos, history = restore_checkpoint(checkpoint, raw, learner)
        restored = pos.step
        if rank == 0:
            log.info("restored from checkpoint at epoch %d batch %d (step %d)", pos.epoch, pos.batch, pos.step)

    def on_device(batches: Iterable[dict[str, np.ndarray]]):
        for b in prefetched(collate(b) for b in batches):  # the next batch is materialized while this one trains
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}

    def batches(epoch: int, skip: int):
        return on_device(own["train"].batches(tc.batch_size, most, seed=(tc.seed, epoch, rank), skip=skip))

    def evaluate(split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Collective: each rank scores its own users' requests of the split, every rank gets the metrics of all of
        them (query-level AUC exact: a request is whole in one slice)."""
        pred = gather_predictions(predict(raw, on_device(own[split].in_order(1024))))
        return metrics(pred), pred

    loop = LoopConfig(
        epochs=tc.epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=tc.batch_size,
        validate=bool(tc.val_days),
        patience=tc.patience,
        log_every=tc.log_every,
        checkpoint_every=tc.checkpoint_every,
    )
    hooks = Hooks(rank, world, broadcast_value, lambda m, files: report(m, raw, learner, pos, history, files))
    if rank == 0 and config.get("live") is not None:  # step metrics into the MLflow run while it trains
        from jobs.register import live_metrics  # noqa: PLC0415 - MLflow in this one worker only

        hooks.progress = live_metrics(*config["live"])
    try:
        run_epochs(learner, raw, batches, evaluate, loop, pos, history, hooks, tags={"restored_step": float(restored)})
    except NonFiniteError:
        return  # reported with a checkpoint (the parameters before the failing step): the driver fails the run


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
    checkpoint_dir: str  # last checkpoint (a local path or a URI): config.json, model.pt, eval_predictions.npz
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
    path = storage.absolute(tc.init_from)
    if not storage.exists(storage.join(path, "model.pt")):
        raise FileNotFoundError(
            f"init_from={tc.init_from!r}: no model.pt there (a checkpoint directory of jobs.train or hyformer's "
            "model.save)"
        )
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, "model.pt"))), "cpu", weights_only=True)
    with torch.random.fork_rng():
        torch.manual_seed(tc.seed)  # as train_fn_per_worker
        model = build_model(mc)
    try:
        adapted = warm_start(model, state)
    except ValueError as e:
        raise ValueError(f"init_from={tc.init_from!r}: {e}") from e
    log.info("train: warm start from %s%s", path, f"; grown tables: {'; '.join(adapted)}" if adapted else "")
    return model.state_dict()


def warm_start_state(
    fs: FeatureSet, tc: TrainConfig, from_champion: bool
) -> tuple[TrainConfig, dict[str, torch.Tensor] | None]:
    """``tc`` and the merged initial weights of its warm start (``load_init_state``; None without ``tc.init_from``).
    ``from_champion`` (the daily default: ``tc.init_from`` is the champion's checkpoint): a champion of another shape
    (e.g. a newly tuned config) is a cold start, logged, instead of an error; ``tc.init_from`` is then cleared."""
    try:
        return tc, load_init_state(tc, model_config(fs, tc.model, tc.arch, tc.hide_sequences))
    except ValueError as e:
        if not (from_champion and tc.init_from):
            raise
        log.warning("warm start: the champion cannot start this model (%s): training from scratch", e)
        return dataclasses.replace(tc, init_from=None), None


class EvaluationDataError(ValueError):
    """The held-out day cannot give a meaningful AUC (too few rows, or one class only)."""


def check_eval_day(day: str, rows: int, positives: int, min_rows: int) -> None:
    if rows < min_rows or positives in (0, rows):
        raise EvaluationDataError(
            f"held-out day {day}: {rows} rows, {positives} positive: too few to evaluate (need >= {min_rows} rows, "
            "--min-eval-rows) or only one class (AUC undefined). Is the day's data complete, or was it quarantined?"
        )


def train(
    fs: FeatureSet,
    tc: TrainConfig,
    storage_path: str,
    run_name: str,
    callbacks: list | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    live: tuple[str, str] | None = None,
) -> TrainResult:
    """Fit on every day of ``fs`` but the last, evaluate on the last. ``run_name`` must be new (Ray resumes reused
    names). ``callbacks``: Ray Train ``RunConfig`` callbacks (e.g. Tune's ``TuneReportCallback``, which forwards
    every report). ``init_state``: the warm start's merged weights when the caller already built them with
    ``load_init_state`` (else they are built here from ``tc.init_from``). ``live``: (tracking URI, run id) of an
    open MLflow run (jobs.register.start_training_run): rank 0 logs its step metrics there every ``log_every``
    steps while training.

    Raises NonFiniteError when the loss or a gradient became NaN/inf (training stops on every worker at that step).
    """
    if len(fs.days) < 2 + tc.val_days:
        raise ValueError(
            f"need at least {2 + tc.val_days} days (train + {tc.val_days} validation + held-out), the feature "
            f"window has {len(fs.days)}"
        )
    mc = model_config(fs, tc.model, tc.arch, tc.hide_sequences)
    if init_state is None:
        init_state = load_init_state(tc, mc)
    first_val = len(fs.days) - 1 - tc.val_days
    splits = {"train": fs.days[:first_val], "eval": fs.days[-1:]} | (
        {"val": fs.days[first_val:-1]} if tc.val_days else {}
    )
    layout = fs.layout()  # the days' pointers: each worker reads its own users' files (features.shards)
    loop_config = {
        "train": tc.to_dict(),
        "model": mc.to_dict(),
        "features": fs.cfg.to_dict(),
        "layout": layout,
        "splits": splits,
        "init_state": None if init_state is None else ray.put(init_state),
        "live": live,
    }
    train_rows = storage.num_rows(layout.files("samples", splits["train"]))  # Parquet footers only
    labels = storage.read_parquet(layout.files("samples", splits["eval"]), columns=["label"])["label"]  # one day
    check_eval_day(fs.days[-1], len(labels), int(labels.sum()), tc.min_eval_rows)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tc.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.workers, use_gpu=tc.gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.absolute(storage_path),  # a local folder or a URI (Ray Train's pyarrow.fs)
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks,
        ),
    )
    log.info(
        "train: %s, %d workers (%s, grad sync %s), %d training samples, days %s..%s, held out %s",
        tc.arch,
        tc.workers,
        "gpu/nccl" if tc.gpu else "cpu/gloo",
        tc.optim.grad_sync,
        train_rows,
        fs.days[0],
        fs.days[first_val - 1],
        fs.days[-1],
    )
    result = trainer.fit()
    if "nonfinite_step" in (result.metrics or {}):
        raise NonFiniteError(
            f"training {run_name!r} stopped: non-finite loss or gradient at step "
            f"{int(result.metrics['nonfinite_step'])} "
            f"(epoch {int(result.metrics['epoch'])}); parameters and checkpoints before it are finite (lower the lr?)"
        )
    checkpoint = storage.uri_of(storage.absolute(storage_path), result.checkpoint.path)
    history = [{k: float(v) for k, v in h.items()} for h in storage.read_json(storage.join(checkpoint, "history.json"))]
    return TrainResult(checkpoint, history[-1] | {"step": float(result.metrics["step"])}, history, mc, tc)


def main(argv: list[str] | None = None) -> None:
    from jobs.experiment import add_config_arguments, experiment_of_argv  # noqa: PLC0415 - pydantic: the CLI only

    p = argparse.ArgumentParser(
        description="Train HyFormer on a feature window with Ray Train; the last day is held out."
    )
    p.add_argument("--features", required=True, help="window-*.json written by jobs.build_features")
    p.add_argument("--storage", default=None, help="Ray Train storage path (default: <data>/train)")
    p.add_argument("--name", default=None, help="run name (default: train-<timestamp>)")
    p.add_argument("--init-from", default=None, help="warm start: a checkpoint directory of the same architecture")
    add_config_arguments(p)  # its model and train sections: the training flags' defaults
    exp = experiment_of_argv(p, argv, "train")
    add_train_arguments(p, exp.train if exp else TrainConfig())
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    fs = FeatureSet.load(a.features)
    tc = train_config(a, init_from=a.init_from)
    data_dir = storage.parent(storage.parent(storage.parent(fs.root)))  # <data>/features/v<N>/<store>
    res = train(fs, tc, a.storage or storage.join(data_dir, "train"), a.name or f"train-{int(time.time())}")
    print(json.dumps({"checkpoint": res.checkpoint_dir, **res.metrics}))


if __name__ == "__main__":
    main()

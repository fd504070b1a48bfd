"""The training settings, written once: `TrainConfig` (the optimiser's `OptimConfig` nested in it, the model as
HyFormerConfig overrides), the command-line flags made from their fields, and the best-config file that
workflows/tune.py writes and workflows/daily_train.py reads.

    tc = TrainConfig(epochs=2, optim=OptimConfig(lr=1e-3), model={"d_model": 64})
    tc = tc.override({"lr": 3e-3, "model.n_layers": 3, "batch_size": 512})   # what a Tune trial or a best config does
    add_train_arguments(parser, defaults=tc); tc = train_config(parser.parse_args())

Each field's help text and allowed values sit next to its default (`setting`); the flags (`--batch-size`,
`--sparse-lr`, ...), the search-space check of workflows/tune.py and the best-config file all read them from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from features import storage
from hyformer import ARCHITECTURES, HyFormerConfig
from hyformer.config import SCHEMA_FIELDS
from hyformer.training import OptimConfig, setting

OPTIM_FIELDS = tuple(f.name for f in fields(OptimConfig))
MODEL_FIELDS = tuple(f.name for f in fields(HyFormerConfig))


@dataclass(frozen=True)
class TrainConfig:
    # One pass by default: sparse-id CTR models overfit from the second pass on (their tables memorise; on the
    # synthetic logs held-out AUC fell 0.696 -> 0.608 in epoch 2, docs/results.md). Use val_days to let data decide.
    epochs: int = setting(1, "passes over the training days (at most, with --val-days)")
    val_days: int = setting(
        0, "days before the held-out one kept out of training; their AUC picks the best epoch (early stopping, 0: off)"
    )
    patience: int = setting(1, "with --val-days: stop after this many epochs without a better validation AUC")
    prior_bias: bool = setting(True, "start the output bias at logit(the training days' positive rate) (cold starts)")
    batch_size: int = setting(256, "rows per batch, per worker")
    optim: OptimConfig = field(default_factory=OptimConfig)  # dense and sparse optimisers, gradient sync, precision
    workers: int = setting(1, "Ray Train workers (one per GPU with --gpu)")
    gpu: bool = setting(False, "CUDA workers + nccl instead of CPU workers + gloo")
    cpus_per_worker: float = setting(2.0, "logical CPUs each worker reserves (= its torch threads)")
    checkpoint_every: int = setting(0, "also checkpoint every N steps within an epoch (0: at epoch ends only)")
    min_eval_rows: int = setting(
        100, "fail before training when the held-out day has fewer rows than this, or only one class (no AUC)"
    )
    max_failures: int = setting(2, "Ray Train restarts the workers from the last checkpoint this many times")
    init_from: str | None = None  # warm start: a checkpoint directory (config.json + model.pt), set by the caller
    hide_sequences: bool = setting(False, "ablation: the model masks every behaviour sequence event")
    seed: int = setting(0, "model initialisation and data order")
    log_every: int = setting(50, "a progress line every N steps (rank 0)")
    arch: str = setting(
        "hyformer",
        "HyFormer or a baseline/ablation of the paper's Tables 1-2 (hyformer/zoo.py)",
        tuple(sorted(ARCHITECTURES)),
    )
    model: dict = field(default_factory=dict)  # HyFormerConfig overrides (d_model, n_layers, n_queries, ...)

    def __post_init__(self) -> None:
        if isinstance(self.optim, Mapping):
            object.__setattr__(self, "optim", OptimConfig(**self.optim))
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"TrainConfig.arch={self.arch!r} must be one of {sorted(ARCHITECTURES)}")
        unknown = sorted(set(self.model) - set(MODEL_FIELDS) - set(SCHEMA_FIELDS))
        if unknown:
            raise ValueError(f"TrainConfig.model has fields HyFormerConfig does not know: {unknown}")

    def override(self, changes: Mapping[str, Any]) -> TrainConfig:
        """A copy with ``changes`` (keys as `route` reads them); "optim" and "model" may also be dicts of fields, the
        model's merged into the current overrides."""
        top, optim, model = {}, {}, dict(self.model)
        for key, value in changes.items():
            if key in ("model", "optim"):
                (model if key == "model" else optim).update(value)
                continue
            where, name = route(key)
            {"train": top, "optim": optim, "model": model}[where][name] = value
        return dataclasses.replace(self, **top, optim=dataclasses.replace(self.optim, **optim), model=model)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def flat(self) -> dict[str, Any]:
        """to_dict() with the optimiser's settings at the top level ("lr", not "optim.lr"): the MLflow params of a
        run (from_dict reads this form too)."""
        d = self.to_dict()
        return {k: v for k, v in d.items() if k != "optim"} | d["optim"]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config of a to_dict() dict; OptimConfig fields at the top level (files written before the optimiser
        was nested) are moved into optim."""
        return cls().override(d)


def route(key: str) -> tuple[str, str]:
    """Where a setting lives: ("train", field) for a TrainConfig field, ("optim", field) for an OptimConfig field
    ("lr" or "optim.lr"), ("model", field) for "model.<HyFormerConfig field>". Raises ValueError for anything else."""
    if key.startswith("model.") and key.removeprefix("model.") in MODEL_FIELDS + SCHEMA_FIELDS:
        return "model", key.removeprefix("model.")
    if key.removeprefix("optim.") in OPTIM_FIELDS:
        return "optim", key.removeprefix("optim.")
    if key in {f.name for f in fields(TrainConfig)} - {"optim", "model"}:
        return "train", key
    raise ValueError(
        f"{key!r} is neither a TrainConfig field, an OptimConfig field (lr or optim.lr) nor "
        "model.<HyFormerConfig field>"
    )


# --- command-line flags -----------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add(g: argparse._ArgumentGroup, f: dataclasses.Field, default: Any, dest: str) -> None:
    help_text, choices = f.metadata["help"], f.metadata["choices"]
    if isinstance(default, bool):
        g.add_argument(_flag(f.name), dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    else:
        metavar = None if choices else f.name.upper()
        g.add_argument(
            _flag(f.name),
            dest=dest,
            type=type(default),
            default=default,
            choices=choices,
            metavar=metavar,
            help=help_text,
        )


def _flagged() -> list[tuple[dataclasses.Field, str]]:
    """(field, argparse dest) of every setting with a flag: TrainConfig's with a help text, then OptimConfig's."""
    return [(f, f.name) for f in fields(TrainConfig) if "help" in f.metadata] + [
        (f, f"optim.{f.name}") for f in fields(OptimConfig)
    ]


def add_train_arguments(p: argparse.ArgumentParser, defaults: TrainConfig = TrainConfig()) -> None:
    """A flag per TrainConfig and OptimConfig setting (their help and choices), plus --model (JSON overrides of the
    model); `train_config` reads them back. ``defaults``: the flags' defaults (e.g. a best config's values)."""
    g = p.add_argument_group("training (jobs.train)")
    for f, dest in _flagged():
        _add(g, f, getattr(defaults.optim if dest.startswith("optim.") else defaults, f.name), dest)
    g.add_argument(
        "--model", default=json.dumps(defaults.model), help="HyFormerConfig overrides as JSON, e.g. '{\"d_model\": 64}'"
    )


def train_config(a: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The TrainConfig of the flags `add_train_arguments` added (+ ``extra`` fields)."""
    flags = {dest for _, dest in _flagged()}
    values = {k: v for k, v in vars(a).items() if k in flags}
    try:
        model = json.loads(a.model)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model is not JSON: {e}") from e
    return TrainConfig().override(values | {"model": model} | extra)


# --- the best-config file (workflows/tune.py writes it, workflows/daily_train.py --train-config reads it) ---------

# What defines the model and its optimisation, written besides the searched fields; run-time settings (workers, gpu,
# epochs, grad_sync, precision, init_from, seed, ...) stay with the run that reads the file.
BEST_FIELDS = ("arch", "model", "batch_size")
BEST_OPTIM_FIELDS = ("lr", "weight_decay", "warmup_steps", "clip_norm", "sparse_optimizer", "sparse_lr")


def best_config(tc: TrainConfig, searched: Mapping[str, Any], metric: str, value: float, trial: str) -> dict[str, Any]:
    """The best-config document of a tuning: the best trial's BEST_FIELDS, BEST_OPTIM_FIELDS and searched settings."""
    keys = {k.removeprefix("optim.") for k in searched if not k.startswith("model.")}
    optim = {n: getattr(tc.optim, n) for n in OPTIM_FIELDS if n in BEST_OPTIM_FIELDS or n in keys}
    train = {f.name: getattr(tc, f.name) for f in fields(TrainConfig) if f.name in BEST_FIELDS or f.name in keys}
    return {
        "train": json.loads(json.dumps(train | {"optim": optim})),
        "metric": metric,
        "value": float(value),
        "trial": trial,
        "tuned_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_best_config(path: str, doc: dict[str, Any]) -> None:
    """Write atomically: a daily run starting now reads the old file or the new one."""
    storage.write_json(path, doc)


def read_best_config(path: str) -> dict[str, Any]:
    """The "train" settings of a best-config file, validated: apply them with ``tc.override(...)``. Raises
    ValueError naming the file when it is not a tuning result or a setting is unknown or invalid."""
    doc = storage.read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("train"), dict):
        raise ValueError(f"{path}: not a tuning result (expected a JSON object with a 'train' object)")
    if not isinstance(doc["train"].get("model", {}), dict):
        raise ValueError(f"{path}: 'train.model' must be an object of HyFormerConfig overrides")
    try:
        TrainConfig().override(doc["train"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'train' is not a valid training config: {e}") from e
    return dict(doc["train"])


# --- a search space (workflows/tune.py, the experiment file's tune section) -----------------------------------------

DISTRIBUTION_NAMES = ("choice", "uniform", "loguniform", "randint")  # jobs.tune.DISTRIBUTIONS: Ray Tune's


def check_space(space: dict[str, dict[str, list]]) -> None:
    """Raise ValueError unless every key is a setting TrainConfig.override knows (jobs.train_config.route) and every
    distribution is one of choice/uniform/loguniform/randint with its arguments."""
    for key, dist in space.items():
        try:
            route(key)
        except ValueError as e:
            raise ValueError(f"search space: {e}") from None
        if not (isinstance(dist, dict) and len(dist) == 1):
            raise ValueError(f"search space: {key!r} must map to one {{distribution: arguments}}, got {dist!r}")
        ((kind, args),) = dist.items()
        if kind not in DISTRIBUTION_NAMES:
            raise ValueError(f"search space: {key!r}: unknown distribution {kind!r} ({', '.join(DISTRIBUTION_NAMES)})")
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            wants = "a list of values" if kind == "choice" else "[low, high]"
            raise ValueError(f"search space: {key!r}: {kind} takes {wants}, got {args!r}")

"""One experiment file (YAML): the data window, the feature spec, the model, training and promotion, validated.

    python workflows/daily_train.py --config configs/demo.yaml --set train.optim.lr=0.002 --set data.days=28

Sections (every key optional; configs/demo.yaml lists them all with the demo's values, docs/features.md explains)::

    data:       dir, days, max_quarantine_share, synthetic, synth_scale          (DataSettings)
    features:   features.build.FeatureConfig: the spec (tokens, features, sequences), relevance, vocab caps, shards
    model:      preset (tiny | demo | paper), arch, and any HyFormerConfig field (d_model, n_layers, seq_encoder...)
    train:      jobs.train_config.TrainConfig fields (epochs, batch_size, workers, ...), optim: {lr, ...}
    promotion:  margin, init_from                                                  (PromotionSettings)
    tune:       space, samples, max_concurrent, grace_period                       (TuneSettings, workflows/tune.py)

A file is checked before anything runs: an unknown key, a value of the wrong type, or a rule a section breaks (a
sequence on a table that is not an event table, a feature on a column its table does not have, a model the features
cannot feed) is one ``ExperimentError`` naming the file, the line and the key. ``--set key=value`` (a YAML value)
overrides one key; the workflows' own flags override theirs. ``Experiment.to_yaml()`` is the resolved file, logged
to MLflow with every run: ``--config`` on it runs the same experiment again.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic
import yaml

from features import storage
from features.build import FeatureConfig
from features.spec import SpecError
from hyformer import HyFormerConfig
from hyformer.config import SCHEMA_FIELDS
from jobs.common import DEFAULT_DATA_DIR, MAX_QUARANTINE_SHARE
from jobs.train_config import MODEL_FIELDS, TrainConfig, check_space

# the demo's model (the quality suite's base, docs/results.md): LONGER on the long sequence, small widths
DEMO_MODEL = dict(d_model=32, d_seq=16, n_heads=2, n_layers=2, ffn_mult=2, head_hidden=(64,), longer_queries=32)
# the schema and the per-sequence encoders come from the feature spec, not from a preset
_NOT_PRESET = ("schema", "seq_encoder", "n_queries")
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {k: v for k, v in dataclasses.asdict(HyFormerConfig.tiny()).items() if k not in _NOT_PRESET},
    "demo": DEMO_MODEL,
    "paper": {k: v for k, v in dataclasses.asdict(HyFormerConfig.paper()).items() if k not in _NOT_PRESET},
}
SECTIONS = ("data", "features", "model", "train", "promotion", "tune")


@dataclass(frozen=True)
class DataSettings:
    dir: str = DEFAULT_DATA_DIR  # project data directory (logs/, clean/, features/, mlflow/, ...): a path or s3://
    days: int = 70  # training window in days, ending at the run's date (held out)
    max_quarantine_share: float = MAX_QUARANTINE_SHARE  # ingest fails a partition with more rows quarantined
    synthetic: bool = False  # generate the demo's synthetic logs when dir has none
    synth_scale: float = 1.0  # multiplies the synthetic request/event counts


@dataclass(frozen=True)
class PromotionSettings:
    margin: float = 0.0  # promote only if the challenger's query AUC beats the champion's by more than this
    init_from: str = "champion"  # warm start: champion | latest | none | models:/... | a checkpoint directory


@dataclass(frozen=True)
class TuneSettings:
    """workflows/tune.py: the search space around the train section (keys as jobs.train_config.route reads them:
    ``lr``, ``batch_size``, ``model.d_model`` ...; each {choice: [...]} | {uniform|loguniform|randint: [lo, hi]})."""

    space: dict[str, dict[str, list]] | None = None  # None: jobs.tune.SEARCH_SPACE
    samples: int = 8  # trials
    max_concurrent: int = 1  # trials at a time
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped


@dataclass(frozen=True)
class Experiment:
    data: DataSettings = field(default_factory=DataSettings)
    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(long_len=128))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(model=DEMO_MODEL))
    promotion: PromotionSettings = field(default_factory=PromotionSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)

    def to_dict(self) -> dict[str, Any]:
        """The resolved file's content (what ``load_experiment`` reads back into an equal Experiment)."""
        features = {k: v for k, v in self.features.to_dict().items() if k != "vocab"}  # vocab: planned per store
        train = self.train.to_dict()
        train.pop("init_from")  # set per run from promotion.init_from (the champion's checkpoint, ...)
        model = {"arch": train.pop("arch"), **train.pop("model")}
        return {
            "data": dataclasses.asdict(self.data),
            "features": features,
            "model": model,
            "train": train,
            "promotion": dataclasses.asdict(self.promotion),
            "tune": dataclasses.asdict(self.tune),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class ExperimentError(ValueError):
    """A bad experiment file: the message starts with ``<file>:<line>: <key>:``."""


# --- reading --------------------------------------------------------------------------------------------------------


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Key path -> 1-based line of every mapping key and sequence item of a composed YAML document."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[(*path, k.value)] = k.start_mark.line + 1
            _lines(v, (*path, k.value), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[(*path, i)] = v.start_mark.line + 1
            _lines(v, (*path, i), out)
    return out


class _Source:
    """A YAML text and where its keys are; ``error`` names the line of a key path (or of its nearest ancestor)."""

    def __init__(self, name: str, text: str):
        self.name = name
        try:
            node = yaml.compose(text)
            self.doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ExperimentError(f"{name}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
        self.lines = _lines(node) if node is not None else {}
        self.doc = {} if self.doc is None else self.doc

    def error(self, path: tuple, message: str) -> ExperimentError:
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = f":{self.lines[p]}" if p else ""
        key = ".".join(str(x) for x in path) or "(top level)"
        return ExperimentError(f"{self.name}{line}: {key}: {message}")


def _check_keys(value: Any, tp: Any, path: tuple, src: _Source) -> None:
    """Walk ``value`` along type ``tp`` (dataclasses, dicts of them, Optional) and raise at its first unknown key."""
    if value is None:
        return
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        _check_keys(value, args[0], path, src)
    elif dataclasses.is_dataclass(tp):
        _unknown_keys(value, tp, path, src)
    elif typing.get_origin(tp) in (dict, Mapping) and len(args) == 2 and isinstance(value, Mapping):
        for name, item in value.items():
            _check_keys(item, args[1], (*path, name), src)


def _unknown_keys(value: Any, cls: type, path: tuple, src: _Source, skip: tuple[str, ...] = ()) -> None:
    """The first key of ``value`` (a mapping for dataclass ``cls``, recursively) that ``cls`` has no field for."""
    if not isinstance(value, Mapping):
        raise src.error(path, f"must be a mapping of {cls.__name__} fields, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    for key, v in value.items():
        if key in skip:
            continue
        if key not in hints:
            raise src.error((*path, key), f"unknown key; known: {sorted(set(hints) - set(skip))}")
        _check_keys(v, hints[key], (*path, key), src)


def _validate(cls: type, value: Mapping, path: tuple, src: _Source) -> Any:
    """``cls(**value)`` with every field's type checked (pydantic) and ``cls``'s own rules; errors located."""
    try:
        return pydantic.TypeAdapter(cls).validate_python(dict(value))
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        where = (*path, *err["loc"])
        if isinstance(cause, SpecError) and cause.path:
            where = (*path, *cause.path)
        msg = str(cause) if cause is not None else f"{err['msg']} (got {err.get('input')!r})"
        raise src.error(where, msg) from None
    except (TypeError, ValueError) as e:
        raise src.error(path, str(e)) from None


def _set(doc: dict, assignment: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into ``doc``."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ExperimentError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ExperimentError(f"--set {assignment!r}: the value is not YAML: {e}") from None
    *parents, last = key.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"--set {assignment!r}: {p} is not a mapping")
    node[last] = value


def parse_experiment(text: str, name: str = "<config>", overrides: list[str] = ()) -> Experiment:
    """The Experiment of a YAML text (``name`` is how errors call it), with ``--set`` overrides applied."""
    src = _Source(name, text)
    doc = src.doc
    if not isinstance(doc, dict):
        raise src.error((), "an experiment file is a mapping of sections")
    for assignment in overrides:
        _set(doc, assignment)
    for section in doc:
        if section not in SECTIONS:
            raise src.error((section,), f"unknown section; sections: {list(SECTIONS)}")
        if not isinstance(doc[section] or {}, Mapping):
            raise src.error((section,), "must be a mapping")
    default = Experiment()
    raw = {s: dict(doc.get(s) or {}) for s in SECTIONS}
    _unknown_keys(raw["data"], DataSettings, ("data",), src)
    _unknown_keys(raw["promotion"], PromotionSettings, ("promotion",), src)
    _unknown_keys(raw["features"], FeatureConfig, ("features",), src, skip=("vocab",))
    _unknown_keys(raw["train"], TrainConfig, ("train",), src, skip=("model", "arch"))
    _unknown_keys(raw["tune"], TuneSettings, ("tune",), src)
    if "init_from" in raw["train"]:
        raise src.error(("train", "init_from"), "the warm start is promotion.init_from")
    data = _validate(DataSettings, raw["data"], ("data",), src)
    promotion = _validate(PromotionSettings, raw["promotion"], ("promotion",), src)
    features = _validate(FeatureConfig, {"long_len": default.features.long_len, **raw["features"]}, ("features",), src)
    model = _model_overrides(raw["model"], src)
    arch = model.pop("arch", default.train.arch)
    train = _validate(TrainConfig, {**raw["train"], "arch": arch, "model": model}, ("train",), src)
    tune = _validate(TuneSettings, raw["tune"], ("tune",), src)
    if tune.space is not None:
        try:
            check_space(tune.space)
        except ValueError as e:
            raise src.error(("tune", "space"), str(e)) from None
    return Experiment(data, features, train, promotion, tune)


def _model_overrides(section: dict, src: _Source) -> dict[str, Any]:
    """The model section as HyFormerConfig overrides: the preset's values, then the section's keys, type-checked."""
    section = dict(section)
    preset = section.pop("preset", "demo")
    if preset not in MODEL_PRESETS:
        raise src.error(("model", "preset"), f"{preset!r} is not a preset; presets: {list(MODEL_PRESETS)}")
    hints = typing.get_type_hints(HyFormerConfig)
    known = set(MODEL_FIELDS) - {"schema"}
    for key, value in section.items():
        if key not in known:
            hint = " (the schema comes from the features section)" if key in SCHEMA_FIELDS else ""
            raise src.error(("model", key), f"unknown key{hint}; known: preset, {sorted(known)}")
        try:
            section[key] = pydantic.TypeAdapter(hints[key]).validate_python(value)
        except pydantic.ValidationError as e:
            raise src.error(("model", key), f"{e.errors()[0]['msg']} (got {value!r})") from None
    return {**MODEL_PRESETS[preset], **section}


def load_experiment(path: str, overrides: list[str] = ()) -> Experiment:
    """The Experiment of a YAML file (local or object storage), ``--set`` overrides applied."""
    try:
        text = storage.read_bytes(path).decode()
    except (FileNotFoundError, OSError) as e:
        raise ExperimentError(f"{path}: cannot read the experiment file: {e}") from None
    return parse_experiment(text, path, overrides)


# --- the workflows' flags ---------------------------------------------------------------------------------------------


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (read back by ``experiment_of_argv``)."""
    p.add_argument(
        "--config",
        default=None,
        help="experiment file (YAML, configs/demo.yaml): data, features, model, train, promotion, tune; flags override",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key of the experiment file, e.g. --set features.sequences.long.length=64 (repeatable)",
    )


def experiment_of_argv(p: argparse.ArgumentParser, argv: list[str] | None, prog: str) -> Experiment | None:
    """The experiment of ``--config``/``--set`` in ``argv`` (parsed ahead of the other flags, whose defaults it
    sets); None without ``--config``. A bad file exits 2 with its one error."""
    pre, _ = p.parse_known_args(argv)
    if pre.config is None:
        if pre.overrides:
            p.error("--set needs --config (an experiment file whose keys it overrides)")
        return None
    try:
        return load_experiment(pre.config, pre.overrides)
    except ExperimentError as e:
        p.exit(2, f"{prog}: {e}\n")


def data_defaults(exp: Experiment) -> dict[str, Any]:
    """The data section as the workflows' flag defaults (argparse dests: --data-dir, --days, ...)."""
    d = exp.data
    return {
        "data_dir": d.dir,
        "days": d.days,
        "max_quarantine_share": d.max_quarantine_share,
        "synthetic": d.synthetic,
        "synth_scale": d.synth_scale,
    }

"""jobs/train_config.py: every training setting has one flag made from its field, flags and dicts round-trip, and
override() routes each key to where the setting lives."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hyformer.training import OptimConfig
from jobs.train_config import TrainConfig, add_train_arguments, route, train_config


def parser(defaults: TrainConfig | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_train_arguments(p, defaults or TrainConfig())
    return p


def test_every_setting_has_a_flag_with_its_help_and_choices() -> None:
    p = parser()
    flags = {opt: a for a in p._actions for opt in a.option_strings}
    for cls in (TrainConfig, OptimConfig):
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:  # optim, model (--model JSON) and init_from (set by the caller)
                continue
            action = flags["--" + f.name.replace("_", "-")]
            assert action.help == f.metadata["help"]
            assert (tuple(action.choices) if action.choices else None) == f.metadata["choices"]
    assert "--model" in flags and "--init-from" not in flags


def test_flags_round_trip_and_defaults_come_from_the_given_config() -> None:
    assert train_config(parser().parse_args([])) == TrainConfig()
    a = parser().parse_args(
        ["--lr", "0.01", "--grad-sync", "async", "--no-prior-bias", "--batch-size", "32", "--model", '{"d_model": 16}']
    )
    tc = train_config(a, init_from="/ckpt")
    assert (tc.optim.lr, tc.optim.grad_sync, tc.prior_bias, tc.batch_size) == (0.01, "async", False, 32)
    assert tc.model == {"d_model": 16} and tc.init_from == "/ckpt"
    tuned = TrainConfig(epochs=3, optim=OptimConfig(sparse_lr=0.2), model={"n_layers": 3})
    assert train_config(parser(tuned).parse_args([])) == tuned
    with pytest.raises(SystemExit):
        parser().parse_args(["--sparse-optimizer", "sgd"])  # the choices of OptimConfig


def test_override_routes_keys_and_keeps_the_model_overrides() -> None:
    tc = TrainConfig(model={"emb_dim": 8}).override(
        {"lr": 3e-3, "optim.sparse_lr": 0.1, "batch_size": 64, "model.d_model": 32, "optim": {"clip_norm": 0.5}}
    )
    assert (tc.optim.lr, tc.optim.sparse_lr, tc.optim.clip_norm, tc.batch_size) == (3e-3, 0.1, 0.5, 64)
    assert tc.model == {"emb_dim": 8, "d_model": 32}
    assert [route(k) for k in ("lr", "optim.lr", "epochs", "model.sequences")] == [
        ("optim", "lr"),
        ("optim", "lr"),
        ("train", "epochs"),
        ("model", "sequences"),
    ]
    for bad in ("d_model", "model.width", "optim.epochs", "nope"):
        with pytest.raises(ValueError, match="neither a TrainConfig field"):
            route(bad)
    with pytest.raises(ValueError, match="HyFormerConfig does not know.*width"):
        TrainConfig(model={"width": 1})
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(arch="dlrm")


def test_dict_and_flat_forms_read_back() -> None:
    tc = TrainConfig(epochs=2, optim=OptimConfig(lr=1e-3, precision="fp32"), model={"d_model": 16})
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    assert TrainConfig.from_dict(tc.flat()) == tc  # the MLflow params' form (and best configs before nesting)
    assert tc.flat()["lr"] == 1e-3 and "optim" not in tc.flat()

"""Training-step semantics (hyformer/training.py): optimisers, one-step-stale async sync (§3.8.2), guards, resume,
warm start; and the same on 2 gloo workers under Ray Train against a hand-written single-process reference."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from hyformer import HyFormerConfig, build_model
from hyformer.testing import make_batch
from hyformer.training import (
    EarlyStopping,
    Learner,
    NonFiniteError,
    OptimConfig,
    RowWiseAdagrad,
    split_parameters,
    warm_start,
)

CONFIG = HyFormerConfig.tiny(dropout=0.0)
# no warmup or clipping here, so the hand-written reference below is plain AdamW + row-wise Adagrad
OPTIM = OptimConfig(lr=1e-2, weight_decay=1e-4, warmup_steps=0, clip_norm=0.0, sparse_lr=0.1)
STEPS, HALF = 4, 6  # steps; rows per worker (the concatenated batch has 2 * HALF)


def batches() -> list[dict[str, torch.Tensor]]:
    return [make_batch(CONFIG, 2 * HALF, seed=100 + k) for k in range(STEPS)]


def half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * HALF : (rank + 1) * HALF] for k, v in batch.items()}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def concatenated_batch_gradient(model: torch.nn.Module, batch: dict[str, torch.Tensor], parts: int) -> None:
    """Leave in ``.grad`` the gradient of the mean loss over ``batch``, summed from its ``parts`` equal slices'
    mean-loss gradients divided by ``parts``: mathematically the same; numerically the same sums a data-parallel
    all-reduce does. That matters under Adam: a parameter whose true gradient is 0 (the attention key bias) gets
    rounding noise as its gradient, and Adam scales any noise up to a full lr-sized step."""
    grads = None
    for r in range(parts):
        model.zero_grad(set_to_none=True)
        part = {k: v[r * len(v) // parts : (r + 1) * len(v) // parts] for k, v in batch.items()}
        F.binary_cross_entropy_with_logits(model(part), part["label"]).backward()
        g = [p.grad / parts for p in model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    for p, g in zip(model.parameters(), grads):
        p.grad = g


def reference(mode: str, parts: int = 1) -> list[dict[str, torch.Tensor]]:
    """Parameters after each step (and, last, after the async flush) of single-process training on the concatenated
    batches, written out by hand: sync applies g_k to everything; async applies g_k to the embedding tables and
    g_{k-1} to the dense parameters (nothing dense at step 0; the last gradient is applied by the flush)."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    dense, sparse = split_parameters(model)
    dense_opt = torch.optim.AdamW(dense, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay)
    sparse_opt = RowWiseAdagrad(sparse, lr=OPTIM.sparse_lr)
    previous, out = None, []
    for batch in batches():
        concatenated_batch_gradient(model, batch, parts)
        sparse_opt.step()
        if mode == "sync":
            dense_opt.step()
        else:
            current = [p.grad.clone() for p in dense]
            if previous is not None:
                for p, g in zip(dense, previous):
                    p.grad = g
                dense_opt.step()
            previous = current
        out.append(snapshot(model))
    if mode == "async":
        for p, g in zip(dense, previous):
            p.grad = g
        dense_opt.step()
        out.append(snapshot(model))
    return out


def learner_trajectory(mode: str) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    learner = Learner(model, dataclasses.replace(OPTIM, grad_sync="ddp" if mode == "sync" else "async"))
    out = []
    for batch in batches():
        learner.step(batch)
        out.append(snapshot(model))
    if learner.flush():
        out.append(snapshot(model))
    return out


def assert_trajectories_equal(got, want, atol=1e-6):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for k in w:
            torch.testing.assert_close(
                g[k], w[k], atol=atol, rtol=1e-5, msg=lambda m, k=k, step=step: f"step {step}, {k}: {m}"
            )


# --- one process ------------------------------------------------------------------------------------------------


def test_parameters_split_into_embedding_tables_and_the_rest():
    model = build_model(CONFIG)
    dense, sparse = split_parameters(model)
    assert len(sparse) == len(CONFIG.schema.id_spaces) and all(p.dim() == 2 for p in sparse)
    assert len(dense) + len(sparse) == len(list(model.parameters()))


def test_rowwise_adagrad_moves_only_rows_with_a_gradient_by_the_formula():
    w = torch.nn.Parameter(torch.ones(4, 3))
    opt = RowWiseAdagrad([w], lr=0.5, eps=1e-8)
    g = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    w.grad = g.clone()
    opt.step()
    s = (g**2).mean(dim=1)  # one accumulator per row
    want = torch.ones(4, 3) - 0.5 * g / (s.sqrt() + 1e-8).unsqueeze(1)
    torch.testing.assert_close(w.detach(), want)
    assert torch.equal(w.detach()[[0, 2]], torch.ones(2, 3))  # rows not in the batch did not move
    assert opt.state[w]["sum"].shape == (4,)


def test_sync_learner_equals_the_hand_written_reference():
    assert_trajectories_equal(learner_trajectory("sync"), reference("sync"))


def test_async_learner_applies_dense_gradients_one_step_late_and_sparse_at_once():
    got, want = learner_trajectory("async"), reference("async")
    assert_trajectories_equal(got, want)
    torch.manual_seed(0)
    init = snapshot(build_model(CONFIG))
    dense_keys = [k for k in init if "tables" not in k]
    table_keys = [k for k in init if "tables" in k]
    # step 0: the tables moved, no dense parameter did
    assert all(torch.equal(got[0][k], init[k]) for k in dense_keys)
    assert any(not torch.equal(got[0][k], init[k]) for k in table_keys)
    # and the staleness is real: from step 1 the dense parameters differ from synchronous training's
    sync = reference("sync")
    assert max((got[1][k] - sync[1][k]).abs().max().item() for k in dense_keys) > 1e-4


def test_warmup_and_clipping_act_on_the_dense_optimiser():
    torch.manual_seed(0)
    learner = Learner(build_model(CONFIG), OptimConfig(lr=1e-2, warmup_steps=4, clip_norm=1e-3))
    stats = [learner.step(b) for b in batches()]
    assert [round(s["lr"], 6) for s in stats] == [0.0025, 0.005, 0.0075, 0.01]
    assert all(s["grad_norm"] > 1e-3 for s in stats)  # the norm before clipping ...
    norm = torch.nn.utils.get_total_norm([p.grad for p in learner.dense if p.grad is not None])
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)  # ... and after it
    assert learner.sparse_opt.param_groups[0]["lr"] == OptimConfig().sparse_lr  # no warmup on the tables


@pytest.mark.parametrize("mode", ["ddp", "async"])
def test_a_non_finite_loss_stops_before_any_parameter_moves(mode):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    learner = Learner(model, dataclasses.replace(OPTIM, grad_sync=mode))
    learner.step(batches()[0])
    before = snapshot(model)
    bad = dict(batches()[1], label=torch.full((2 * HALF,), float("nan")))
    with pytest.raises(NonFiniteError, match="step 1"):
        learner.step(bad)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", ["ddp", "async"])
def test_a_non_finite_sparse_gradient_stops_before_any_parameter_moves(mode):
    """The loss and the dense gradients are finite; only an embedding table's gradient is not (both sync modes)."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    learner = Learner(model, dataclasses.replace(OPTIM, grad_sync=mode))
    learner.step(batches()[0])
    before = snapshot(model)
    table = model.tokenizer.tables["item"].weight
    hook = table.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteError, match="step 1"):
        learner.step(batches()[1])
    hook.remove()
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_from_a_state_dict_continues_the_async_trajectory_exactly():
    """A checkpoint taken mid-run (model + both optimisers + the pending averaged gradient) resumes bit for bit."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    learner = Learner(model, dataclasses.replace(OPTIM, grad_sync="async"))
    data = batches()
    for b in data[:2]:
        learner.step(b)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(learner.state_dict())
    assert saved_state["sync"]["pending"] is not None  # step 1's gradient is owed to the next dense update
    for b in data[2:]:
        learner.step(b)
    uninterrupted = snapshot(model)

    torch.manual_seed(1)  # another init: everything must come from the checkpoint
    resumed = build_model(CONFIG)
    resumed.load_state_dict(saved_model)
    learner2 = Learner(resumed, dataclasses.replace(OPTIM, grad_sync="async"))
    learner2.load_state_dict(saved_state)
    for b in data[2:]:
        learner2.step(b)
    assert learner2.steps == STEPS
    assert all(torch.equal(uninterrupted[k], v) for k, v in snapshot(resumed).items())


def test_warm_start_copies_old_rows_into_grown_tables_and_rejects_other_architectures():
    torch.manual_seed(0)
    old = build_model(CONFIG)
    grown = dict(CONFIG.schema.id_spaces) | {"item": 120}
    new = build_model(CONFIG.replace(id_spaces=grown))
    fresh_rows = new.tokenizer.tables["item"].weight[100:].detach().clone()
    adapted = warm_start(new, old.state_dict())
    assert adapted == ["tokenizer.tables.item.weight: 100 -> 120 rows"]
    torch.testing.assert_close(new.tokenizer.tables["item"].weight[:100], old.tokenizer.tables["item"].weight)
    torch.testing.assert_close(new.tokenizer.tables["item"].weight[100:], fresh_rows)
    assert 0.01 < fresh_rows.std().item() < 0.03  # the added rows get the model's own small initialisation
    torch.testing.assert_close(new.head[0].weight, old.head[0].weight)
    with pytest.raises(ValueError, match="different architecture: .*shape"):
        warm_start(build_model(dataclasses.replace(CONFIG, d_model=16)), old.state_dict())


def test_early_stopping_keeps_the_best_epochs_weights_and_stops_after_patience():
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(patience=2)
    weights = []
    for score in (0.60, 0.70, 0.65, 0.69):  # best at epoch 1, then two epochs without improvement
        with torch.no_grad():
            model.weight.add_(1.0)
        weights.append(model.weight.detach().clone())
        stop = stopper.update(model, score)
        assert stop == (score == 0.69)
    assert (stopper.best_epoch, stopper.best_score) == (1, 0.70)
    assert stopper.restore(model) and torch.equal(model.weight, weights[1])
    fresh = EarlyStopping(patience=1)
    assert not fresh.update(model, 0.5) and not fresh.restore(model)  # the last epoch is the best: nothing to load
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_cosine_decay_takes_both_learning_rates_from_peak_to_the_floor_over_total_steps():
    torch.manual_seed(0)
    config = OptimConfig(lr=1e-2, sparse_lr=0.04, warmup_steps=2, lr_decay="cosine", min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        Learner(build_model(CONFIG), config)
    learner = Learner(build_model(CONFIG), config, total_steps=6)
    dense, sparse = [], []
    for b in batches() + batches():  # 8 steps: 2 warmup, 4 decaying, then held at the floor
        sparse.append(learner.sparse_opt.param_groups[0]["lr"])
        dense.append(learner.step(b)["lr"])
    # dense: warmup 0.005, 0.01; then 0.01 * (0.1 + 0.9 * (1 + cos(pi * k / 4)) / 2) for k = 0..4; the floor after
    expected = [0.005, 0.01, 0.01, 0.01 * (0.1 + 0.9 * 0.8535534), 0.0055, 0.01 * (0.1 + 0.9 * 0.1464466), 0.001, 0.001]
    assert dense == pytest.approx(expected, rel=1e-6)
    # sparse: no warmup, the same decay factor (peak for the first warmup_steps + 1 updates)
    assert sparse == pytest.approx([0.04 * e / 0.01 for e in [0.01, 0.01] + expected[2:]], rel=1e-6)
    assert OptimConfig().decay(10**6, None) == 1.0  # "none": constant, no total needed


def test_optim_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="grad_sync"):
        OptimConfig(grad_sync="sometimes")


# --- two gloo workers (Ray Train) ---------------------------------------------------------------------------------


MODES = ("sync", "async", "sync-rows", "async-rows")  # -rows: every embedding table exchanged row-sparse


def two_worker_fn(config: dict) -> None:
    """On each of 2 workers: every mode, each from the same seed, on this rank's half of every batch; every step's
    parameters are written to ``out/<mode>-rank<r>.pt`` (and the row exchange's bytes per step to ``...-bytes.pt``)."""
    import ray.train
    import ray.train.torch

    from hyformer.training import broadcast_parameters, ddp_ignored_parameters

    rank = ray.train.get_context().get_world_rank()
    for mode in MODES:
        sync = mode.startswith("sync")
        optim = dataclasses.replace(OPTIM, grad_sync="ddp" if sync else "async")
        if mode.endswith("-rows"):
            optim = dataclasses.replace(optim, row_exchange_rows=0)
        torch.manual_seed(0)
        raw = build_model(CONFIG)
        if sync:
            ddp_ignored_parameters(raw, optim)  # the row-exchanged tables stay out of DDP's all-reduce
        model = ray.train.torch.prepare_model(raw, parallel_strategy="ddp" if sync else None)
        if not sync:
            broadcast_parameters(model)
        learner = Learner(model, optim)
        trajectory, sent = [], []
        for batch in batches():
            learner.step(half(batch, rank))
            trajectory.append(snapshot(raw))
            sent.append((learner.rows.bytes_per_step, learner.rows.dense_bytes_per_step))
        if learner.flush():
            trajectory.append(snapshot(raw))
        torch.save(trajectory, os.path.join(config["out"], f"{mode}-rank{rank}.pt"))
        torch.save(sent, os.path.join(config["out"], f"{mode}-rank{rank}-bytes.pt"))
    ray.train.report({"done": 1})


@pytest.fixture(scope="module")
def two_worker_trajectories(ray_local, tmp_path_factory):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    out = tmp_path_factory.mktemp("trajectories")
    TorchTrainer(
        two_worker_fn,
        train_loop_config={"out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="semantics", storage_path=str(tmp_path_factory.mktemp("ray"))),
    ).fit()
    got = {(mode, r): torch.load(out / f"{mode}-rank{r}.pt") for mode in MODES for r in (0, 1)}
    return got | {(mode, r, "bytes"): torch.load(out / f"{mode}-rank{r}-bytes.pt") for mode in MODES for r in (0, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_two_gloo_workers_follow_the_single_process_reference(two_worker_trajectories, mode):
    """sync (DDP) on 2 workers = one process on the concatenated batch; async = the hand-written one-step-stale
    schedule on the concatenated batch; with the embedding tables exchanged row-sparse (-rows) the same trajectory.
    Both workers hold identical parameters after every step. (Workers run with one thread: so does the reference.)"""
    rank0, rank1 = two_worker_trajectories[(mode, 0)], two_worker_trajectories[(mode, 1)]
    assert_trajectories_equal(rank0, rank1, atol=0.0)
    sent = two_worker_trajectories[(mode, 0, "bytes")]
    if mode.endswith("-rows"):  # ids and touched rows travelled (fewer bytes than the tables once they are large:
        assert all(rows > 0 and dense > 0 for rows, dense in sent), sent  # benchmarks/embedding_exchange.py)
    else:
        assert all(rows == 0 for rows, _ in sent), sent
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = reference(mode.removesuffix("-rows"), parts=2)
    finally:
        torch.set_num_threads(threads)
    assert_trajectories_equal(rank0, want, atol=1e-6)

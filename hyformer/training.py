"""One training step of paper §3.8 in plain PyTorch: dense/sparse optimisers, gradient sync, precision, guards.

A `Learner` owns a model's optimisation. Parameters split in two (`split_parameters`):

- **sparse**: the embedding tables (``nn.Embedding``). Row-wise Adagrad by default (one accumulator per row, as
  torchrec/FBGEMM's ROWWISE_ADAGRAD): rows that are not in the batch have a zero gradient and do not move.
- **dense**: everything else. AdamW with linear LR warmup and gradient-norm clipping.

Gradient sync between data-parallel workers (``grad_sync``):

- ``"ddp"``: the model is a ``DistributedDataParallel`` (or a single process). Gradients are averaged during backward;
  every parameter is updated with step k's gradient. Training on W workers equals one process on the concatenated
  batch (tests hold this).
- ``"async"`` (§3.8.2): the dense gradient of step k is all-reduced in the background while step k+1 runs forward and
  backward, and applied one step late: the dense update of step k uses step k-1's averaged gradient (``W_k = W_{k-1}
  + g_{k-1}``; step 0 makes no dense update). Sparse gradients are averaged at once (a blocking all-reduce, so the
  tables stay identical on every worker) and applied with the current step: sparse parameters stay one step ahead.
  The model is *not* wrapped in DDP.

Embedding tables with at least ``row_exchange_rows`` rows are exchanged **row-sparse** in both modes (`RowExchange`):
each worker sends only the rows its step touched (their ids and gradient rows) and every worker sums them into the
averaged gradient: the same sum as all-reducing the whole table (tests hold the trajectories equal), with bytes that
grow with the batch instead of the table. In DDP mode these tables are left out of DDP's reducer
(`ddp_ignored_parameters`). Smaller tables go the dense way.

Non-finite values stop training with `NonFiniteError` on every worker at the same step, before any parameter moves:
the decision is made on all-reduced values, so no worker goes on alone.
Precision: ``"bf16"`` runs the forward under ``torch.autocast`` (weights, gradients and optimiser state stay fp32);
``"auto"`` is bf16 on CUDA and fp32 elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, sparse): sparse = the weights of the ``nn.Embedding`` tables, dense = every other parameter."""
    sparse = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    ids = {id(p) for p in sparse}
    return [p for p in model.parameters() if id(p) not in ids], sparse


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per embedding row: ``s_r += mean(g_r²)``, ``w_r -= lr · g_r / (√s_r + eps)``.

    State is (rows,) instead of Adagrad's (rows, dim). A row with a zero gradient (not in the batch) does not move.
    """

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim.Optimizer's signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad updates 2-d tables, got a parameter of shape {tuple(p.shape)}")
                g = p.grad
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)  # (V,)
                state["sum"].add_(g.float().pow(2).mean(dim=1))  # (V,)
                p.addcdiv_(g, (state["sum"].sqrt() + group["eps"]).unsqueeze(1).to(p.dtype), value=-group["lr"])
        return None


SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adamw")
GRAD_SYNCS = ("ddp", "async")
PRECISIONS = ("auto", "fp32", "bf16")
LR_DECAYS = ("none", "cosine")


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:  # noqa: A002 - argparse's name
    """A config field with its help text and allowed values (jobs/train_config.py makes the command-line flags of
    them, so each knob is written once)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class OptimConfig:
    lr: float = setting(2e-3, "dense AdamW peak learning rate")
    weight_decay: float = setting(1e-5, "dense AdamW decoupled weight decay")
    warmup_steps: int = setting(
        100, "dense LR rises linearly from lr/warmup_steps to lr over this many updates (0: none)"
    )
    clip_norm: float = setting(1.0, "clip the dense gradient's global L2 norm (0: no clipping)")
    # "cosine": after warmup both learning rates follow a half cosine from their peak down to min_lr_ratio x peak at
    # the Learner's total_steps (the last batches then move the weights little: less seed-to-seed noise)
    lr_decay: str = setting(
        "none", "after warmup: constant LRs, or a half cosine to min_lr_ratio x peak over the run", LR_DECAYS
    )
    min_lr_ratio: float = setting(0.1, "with lr_decay cosine: the last step's LR / peak")
    sparse_optimizer: str = setting(
        "rowwise_adagrad", "optimiser of the embedding tables (adamw: the dense one's)", SPARSE_OPTIMIZERS
    )
    sparse_lr: float = setting(0.05, "learning rate of the sparse optimiser (ignored for adamw: uses lr)")
    grad_sync: str = setting(
        "ddp",
        "ddp: synchronous; async: paper §3.8.2, dense gradients all-reduced during the next step and applied one "
        "step late",
        GRAD_SYNCS,
    )
    precision: str = setting("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere", PRECISIONS)
    row_exchange_rows: int = setting(
        100_000,
        "embedding tables with at least this many rows send only the rows a step touched (ids + gradient rows) "
        "between workers; smaller ones all-reduce the whole table (0: every table row-sparse)",
    )

    def __post_init__(self):
        for f in fields(self):
            allowed = f.metadata["choices"]
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"OptimConfig.{f.name} must be one of {allowed}, got {getattr(self, f.name)!r}")
        if self.lr <= 0 or self.sparse_lr <= 0 or self.warmup_steps < 0 or self.clip_norm < 0:
            raise ValueError(f"OptimConfig: lr, sparse_lr > 0 and warmup_steps, clip_norm >= 0 required, got {self}")
        if self.row_exchange_rows < 0:
            raise ValueError(f"OptimConfig.row_exchange_rows must be >= 0, got {self.row_exchange_rows}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def decay(self, step: int, total_steps: int | None) -> float:
        """The decay factor of both learning rates at update `step` (1.0 without decay; warmup is separate)."""
        if self.lr_decay == "none":
            return 1.0
        if not total_steps or total_steps < 1:
            raise ValueError('lr_decay="cosine" needs the run\'s total_steps (Learner(..., total_steps=N))')
        progress = min(1.0, max(0, step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN/inf. Raised on every worker at the same step, before any parameter moved."""


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _flat_grads(params: list[nn.Parameter]) -> Tensor:
    """Every gradient in one fp32 vector (zeros for parameters without one)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def _set_grads(params: list[nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def row_exchanged(model: nn.Module, config: OptimConfig) -> dict[str, nn.Parameter]:
    """The embedding tables exchanged row-sparse (by parameter name): those of the sparse optimiser with at least
    ``config.row_exchange_rows`` rows."""
    if config.sparse_optimizer == "adamw":  # the tables are dense parameters then
        return {}
    tables = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {n: p for n, p in model.named_parameters() if n in tables and p.shape[0] >= max(1, config.row_exchange_rows)}


def ddp_ignored_parameters(model: nn.Module, config: OptimConfig) -> list[str]:
    """Leave the row-exchanged tables of ``model`` (not yet wrapped) out of DDP's gradient all-reduce: call before
    wrapping it in DistributedDataParallel; the Learner exchanges their gradients. Returns their names."""
    names = sorted(row_exchanged(model, config))
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


class RowExchange:
    """Row-sparse gradient sync of large embedding tables. ``exchange()`` after backward: every worker all-gathers the
    ids of the rows its step touched (non-zero gradient rows) and those rows, and sums all workers' rows into the
    table's gradient, divided by the world size: the averaged gradient, as a dense all-reduce would give it.
    ``bytes_per_step``: what this worker put on the wire in the last exchange (ids + rows, padded to the largest
    worker's count), next to ``dense_bytes_per_step``, a ring all-reduce of the same tables."""

    def __init__(self, tables: list[nn.Parameter]):
        self.tables = tables
        self.bytes_per_step = 0
        self.dense_bytes_per_step = 0

    def exchange(self) -> None:
        world = _world()
        if world == 1 or not self.tables:
            return
        sent = dense = 0
        for p in self.tables:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            rows = (g != 0).any(dim=1).nonzero().squeeze(1)  # (R,) touched rows (NaN rows included)
            counts = [torch.zeros(1, dtype=torch.int64, device=g.device) for _ in range(world)]
            dist.all_gather(counts, torch.tensor([len(rows)], dtype=torch.int64, device=g.device))
            width = max(int(c.item()) for c in counts)
            ids = torch.zeros(width, dtype=torch.int64, device=g.device)
            ids[: len(rows)] = rows
            vals = torch.zeros(width, g.shape[1], dtype=torch.float32, device=g.device)
            vals[: len(rows)] = g[rows].float()
            all_ids = [torch.empty_like(ids) for _ in range(world)]
            all_vals = [torch.empty_like(vals) for _ in range(world)]
            dist.all_gather(all_ids, ids)
            dist.all_gather(all_vals, vals)
            total = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            for c, i, v in zip(counts, all_ids, all_vals):  # rank order: the same sum on every worker
                n = int(c.item())
                total.index_add_(0, i[:n], v[:n])
            p.grad = total.div_(world).to(p.dtype)
            sent += (world - 1) * width * (8 + 4 * g.shape[1])  # ring all-gather: each block passes W-1 links
            dense += 2 * (world - 1) * g.numel() * 4 // world  # ring all-reduce of the fp32 table
        self.bytes_per_step, self.dense_bytes_per_step = sent, dense


class AsyncAllReduce:
    """§3.8.2 gradient sync for one process group: `sync()` after backward leaves averaged gradients in ``.grad``:
    the sparse ones of this step, the dense ones of the previous step (None at the first step), and starts the
    all-reduce of this step's dense gradient, which runs while the next step computes."""

    def __init__(self, dense: list[nn.Parameter], sparse: list[nn.Parameter]):
        self.dense, self.sparse = dense, sparse
        self.work: Any = None  # the in-flight all-reduce (torch.distributed Work) of `inflight`
        self.inflight: Tensor | None = None  # this step's summed dense gradient, being all-reduced
        self.ready: Tensor | None = None  # the previous step's averaged dense gradient, when complete

    def _finish(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.inflight is not None:
            self.ready, self.inflight = self.inflight, None

    def pop_pending(self) -> Tensor | None:
        """The previous step's averaged dense gradient (waits for its all-reduce), or None; it is handed out once."""
        self._finish()
        ready, self.ready = self.ready, None
        return ready

    def sync(self, local_bad: bool) -> bool:
        """Average gradients as described above; returns True when any worker saw a non-finite loss or gradient."""
        world = _world()
        dense_now = _flat_grads(self.dense).div_(world)
        # the sparse gradients and the workers' non-finite flags travel together in one blocking all-reduce
        bad = float(local_bad or not bool(torch.isfinite(dense_now).all()))
        sparse_now = [_flat_grads(self.sparse).div_(world)] if self.sparse else []  # (none: all row-exchanged)
        head = torch.cat([*sparse_now, dense_now.new_tensor([bad])])
        if world > 1:
            dist.all_reduce(head)  # queued behind step k-1's dense all-reduce, which overlapped this step's compute
        # a non-finite sparse gradient on any worker is non-finite in the sum: every worker sees it and stops
        if head[-1].item() > 0 or not bool(torch.isfinite(head[:-1]).all()):
            return True
        previous = self.pop_pending()
        _set_grads(self.sparse, head[:-1])
        for p in self.dense:
            p.grad = None
        if previous is not None:
            _set_grads(self.dense, previous)
        self.inflight = dense_now
        self.work = dist.all_reduce(self.inflight, async_op=True) if world > 1 else None
        return False

    def state_dict(self) -> dict[str, Tensor | None]:
        """The averaged dense gradient not yet applied (it belongs to the next update; waits for its all-reduce)."""
        self._finish()
        return {"pending": None if self.ready is None else self.ready.detach().cpu()}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        pending = state.get("pending")
        self.work, self.inflight = None, None
        self.ready = None if pending is None else pending.to(self.dense[0].device)


class Learner:
    """The optimisation of one (possibly DDP-wrapped) model on one worker: `step(batch)` is forward, loss, backward,
    gradient sync, clipping and both optimisers' updates. `state_dict` holds everything needed to resume exactly."""

    def __init__(
        self, model: nn.Module, config: OptimConfig, device: torch.device | str = "cpu", total_steps: int | None = None
    ):
        """total_steps: the updates this run will make (epochs x batches), which lr_decay="cosine" decays over."""
        self.model, self.config, self.device = model, config, torch.device(device)
        config.decay(0, total_steps)  # a clear error now, not at the first step
        if config.grad_sync == "async" and isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError('grad_sync="async" syncs gradients itself: pass the model without DistributedDataParallel')
        self.dense, self.sparse = split_parameters(model)
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        warmup = max(1, config.warmup_steps)
        if config.sparse_optimizer == "adamw":
            self.dense += self.sparse
            self.sparse = []
        self.dense_opt = torch.optim.AdamW(self.dense, lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.dense_opt, lambda n: min(1.0, (n + 1) / warmup) * config.decay(n, total_steps)
        )
        self.sparse_opt = self.sparse_schedule = None
        if self.sparse:
            cls = RowWiseAdagrad if config.sparse_optimizer == "rowwise_adagrad" else torch.optim.Adagrad
            self.sparse_opt = cls(self.sparse, lr=config.sparse_lr)
            self.sparse_schedule = torch.optim.lr_scheduler.LambdaLR(
                self.sparse_opt, lambda n: config.decay(n, total_steps)
            )
        rows = {id(p) for p in row_exchanged(model, config).values()}
        self.rows = RowExchange([p for p in self.sparse if id(p) in rows])
        whole = [p for p in self.sparse if id(p) not in rows]  # the tables all-reduced whole
        self.sync = AsyncAllReduce(self.dense, whole) if config.grad_sync == "async" else None
        self.steps = 0  # steps taken (each one updates sparse; dense from the second on in async mode)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean binary cross-entropy of the model's logits against ``batch["label"]`` (fp32)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(batch)  # (B,)
        return F.binary_cross_entropy_with_logits(logits.float(), batch["label"].float())

    def step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One optimisation step; returns loss, dense gradient norm (before clipping) and the dense LR used."""
        loss = self.loss(batch)
        for p in self.dense + self.sparse:
            p.grad = None
        loss.backward()
        loss_value = loss.item()
        self.rows.exchange()  # large tables, both modes: averaged (identical on every worker) from here on
        if self.sync is not None:
            rows_bad = not all(bool(torch.isfinite(p.grad).all()) for p in self.rows.tables if p.grad is not None)
            if self.sync.sync(local_bad=not math.isfinite(loss_value) or rows_bad):
                raise NonFiniteError(
                    f"non-finite loss or gradient on a worker at step {self.steps} (local loss {loss_value})"
                )
        has_dense = any(p.grad is not None for p in self.dense)
        norm = self._clip() if has_dense else 0.0
        if self.sync is None:  # DDP/single process: every gradient here is averaged already, identical on all ranks
            grads = [p.grad for p in self.sparse if p.grad is not None]
            sparse_norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
            if not (math.isfinite(norm) and math.isfinite(sparse_norm)):
                raise NonFiniteError(
                    f"non-finite gradient at step {self.steps} (local loss {loss_value}, dense grad norm {norm}, "
                    f"sparse {sparse_norm})"
                )
        lr = self.schedule.get_last_lr()[0] if has_dense else 0.0
        if self.sparse_opt is not None:
            self.sparse_opt.step()
            self.sparse_schedule.step()
        if has_dense:
            self._dense_update()
        self.steps += 1
        return {"loss": loss_value, "grad_norm": norm, "lr": lr}

    def flush(self) -> bool:
        """Async mode, at the end of training: apply the last averaged dense gradient (one more dense update, no new
        step), so no computed gradient is lost. Returns whether there was one."""
        pending = self.sync.pop_pending() if self.sync is not None else None
        if pending is None:
            return False
        _set_grads(self.dense, pending)
        self._clip()
        self._dense_update()
        return True

    def _clip(self) -> float:
        """Clip the dense gradient's norm (when clip_norm > 0); returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.dense, self.config.clip_norm or math.inf))

    def _dense_update(self) -> None:
        self.dense_opt.step()
        self.schedule.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "dense_opt": self.dense_opt.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sparse_opt": None if self.sparse_opt is None else self.sparse_opt.state_dict(),
            "sparse_schedule": None if self.sparse_schedule is None else self.sparse_schedule.state_dict(),
            "sync": None if self.sync is None else self.sync.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense_opt.load_state_dict(state["dense_opt"])
        self.schedule.load_state_dict(state["schedule"])
        if self.sparse_opt is not None:
            self.sparse_opt.load_state_dict(state["sparse_opt"])
            if state.get("sparse_schedule") is not None:  # checkpoints from before lr_decay have none
                self.sparse_schedule.load_state_dict(state["sparse_schedule"])
        if self.sync is not None:
            self.sync.load_state_dict(state["sync"] or {})
        self.steps = int(state["steps"])


def broadcast_parameters(model: nn.Module, src: int = 0, names: list[str] | None = None) -> None:
    """Give every worker rank ``src``'s parameters and buffers (what DDP does at construction; async mode needs it);
    ``names``: only those parameters (e.g. the tables DDP ignores)."""
    if _world() > 1:
        if names is None:
            tensors = [*model.parameters(), *model.buffers()]
        else:
            wanted = set(names)
            tensors = [p for n, p in model.named_parameters() if n in wanted]
        for t in tensors:
            dist.broadcast(t.data, src)


def warm_start(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Load a previous model's weights into ``model`` for continued training; returns what was adapted.

    Embedding tables may have grown (new ids since the previous model): the old rows are copied, new rows keep their
    fresh initialisation. Any other difference (a missing or extra weight, another shape) raises ValueError naming it:
    the previous model is a different architecture.
    """
    own = model.state_dict()
    tables = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    problems = [f"missing {k}" for k in own.keys() - state.keys()] + [
        f"unexpected {k}" for k in state.keys() - own.keys()
    ]
    adapted, merged = [], {}
    for k in own.keys() & state.keys():
        new, old = own[k], state[k]
        if new.shape == old.shape:
            merged[k] = old
        elif k in tables and new.shape[1:] == old.shape[1:]:
            rows = min(new.shape[0], old.shape[0])
            merged[k] = torch.cat([old[:rows].to(new.dtype), new[rows:]])
            adapted.append(f"{k}: {old.shape[0]} -> {new.shape[0]} rows")
        else:
            problems.append(f"{k}: shape {tuple(old.shape)} in the previous model, {tuple(new.shape)} here")
    if problems:
        raise ValueError("cannot warm-start from a different architecture: " + "; ".join(sorted(problems)[:10]))
    model.load_state_dict(merged)
    return adapted


class EarlyStopping:
    """Model selection on a validation set, epoch by epoch: keeps the weights of the best epoch so far (higher score
    is better, e.g. validation AUC) and says when to stop, after ``patience`` epochs without an improvement larger
    than ``min_delta``. ``restore(model)`` loads the best weights back. With one pass over fresh data the first epoch
    is usually best for sparse-id models (the tables overfit from the second pass on); how many passes a data set
    can take is what this measures instead of a fixed epoch count."""

    def __init__(self, patience: int = 1, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1, got {patience}")
        self.patience, self.min_delta = patience, min_delta
        self.best_score, self.best_epoch, self.epochs, self.bad = -math.inf, -1, 0, 0
        self.best_state: dict[str, Tensor] | None = None

    def update(self, model: nn.Module, score: float) -> bool:
        """Record this epoch's validation ``score``; returns True when training should stop."""
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.bad = score, self.epochs, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad += 1
        self.epochs += 1
        return self.bad >= self.patience

    def restore(self, model: nn.Module) -> bool:
        """Load the best epoch's weights into ``model`` when a later epoch was worse; returns whether it did."""
        if self.best_state is None or self.best_epoch == self.epochs - 1:
            return False
        model.load_state_dict(self.best_state)
        return True

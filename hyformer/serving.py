"""Scoring many candidates per request with KV reuse (paper §3.7): each request's sequences are encoded once.

A ranking request scores its candidates against one user's behaviour sequences. In a batch of scoring rows the
candidates of a request share their sequence inputs (``seq_*``/``inv_*``/``len_*``: same user, same time, same
query), so ``predict_requests`` encodes every request's sequences once (``model.encode_sequences`` on one row per
request) and scores its m candidates against that memory (``model.score``), grouping requests by their number of
candidates. The logits equal ``model(batch)`` on the same rows (tests/test_serving.py).

Models without the two halves (the baselines of hyformer/baselines.py), and batches whose rows of one request do not
share their sequence inputs, are scored with a plain forward. Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hyformer.model import SequenceMemory

SEQUENCE_KEYS = ("seq_", "inv_", "len_")  # per-row sequence inputs (uniq_* tables are shared by the whole batch)


def supports_kv_reuse(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "encode_sequences", None)) and callable(getattr(model, "score", None))


def select_memory(memory: SequenceMemory, idx: Tensor) -> SequenceMemory:
    """The memory of requests ``idx`` (R',) out of R."""
    return SequenceMemory(memory.pooled[idx], [[(k[idx], v[idx], m[idx]) for k, v, m in layer] for layer in memory.kv])


@torch.no_grad()
def predict_requests(
    model: torch.nn.Module, batch: Mapping[str, Tensor], request_id: Tensor | None = None
) -> tuple[Tensor, int]:
    """Logits (B,) of the rows of ``batch`` and the number of sequence encodings run (R with KV reuse, else B).

    ``request_id`` (B,) groups the rows (default ``batch["request_id"]``); rows need not be sorted.
    """
    rid = batch["request_id"] if request_id is None else request_id
    B = len(rid)
    if not supports_kv_reuse(model) or B == 0:
        return model(batch), B
    order = torch.argsort(rid, stable=True)  # (B,) request-major
    _, inverse, counts = torch.unique_consecutive(rid[order], return_inverse=True, return_counts=True)  # (B,), (R,)
    starts = torch.cumsum(counts, 0) - counts  # (R,) first sorted position of each request
    first = order[starts]  # (R,) one row per request
    seq_keys = [k for k in batch if k.startswith(SEQUENCE_KEYS)]
    if not all(torch.equal(batch[k][order], batch[k][first][inverse]) for k in seq_keys):
        return model(batch), B  # rows of one request differ in their sequences: no reuse possible
    requests = {k: v[first] for k, v in batch.items() if k.startswith(SEQUENCE_KEYS)}
    requests |= {k: v for k, v in batch.items() if k.startswith("uniq_")}  # the dedup tables, shared
    memory = model.encode_sequences(requests)  # pooled (R, S, Ds), per layer K/V (R, H, L', Ds/H)
    logits = torch.empty(B, device=rid.device)
    candidates = {k: v for k, v in batch.items() if k.startswith(("ns_", "bag_", "dense_"))}
    for m in torch.unique(counts).tolist():
        reqs = torch.nonzero(counts == m).squeeze(1)  # (R_m,) requests with m candidates
        rows = order[(starts[reqs, None] + torch.arange(m, device=rid.device)).flatten()]  # (R_m * m,) request-major
        out = model.score({k: v[rows] for k, v in candidates.items()}, select_memory(memory, reqs))  # (R_m * m,)
        logits[rows] = out.to(logits.dtype)
    return logits, len(counts)

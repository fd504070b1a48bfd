"""HyFormer: a hybrid transformer for CTR prediction (arXiv 2601.12681), in one file.

Read top to bottom, classes in dependency order:

    attention            masked multi-head attention kernel: "reference" (plain softmax) or "sdpa"
    CrossAttention       queries attend to another token set (self-attention when both are the same); the K/V
                         projection is separate so that K/V can be computed once and reused (KV reuse)
    MLP                  two-layer feed-forward network
    TransformerEncoderLayer  Full Transformer sequence encoder layer, §3.4.1 (i)
    LongerEncoderLayer   LONGER-style layer: the L_H most recent events attend over all events, §3.4.1 (ii)
    SwiGLU               W_down(silu(W_gate x) * W_up x)
    SwiGLUEncoderLayer   attention-free per-event sequence encoder layer, §3.4.1 (iii)
    TokenMixer           parameter-free RankMixer / MLP-Mixer token mixing, §3.5
    PerTokenFFN          one feed-forward network per token, batched in one einsum, §3.5
    QueryBoost           Q + PerTokenFFN(TokenMixer(norm(Q))), §3.5; also the RankMixer interaction block
    TokenTransformer     self-attention + per-token FFN interaction block over the T tokens (Table 1's Transformer)
    WukongLayer          Wukong interaction block: factorization machine + linear compression (Table 1)
    Tokenizer            semantic NS tokens and per-event sequence tokens, §3.3.1; merge_sequences (Table 2)
    QueryGenerator       N_s queries per sequence from the (selected, optionally compressed) Global Info, §3.3.2
    QueryDecoder         one sequence's encoder layer (-> that layer's K/V) + cross-attention of its queries, §3.4
    HyFormerLayer        Query Decoding for every sequence, then Query Boosting, §3.6-3.7
    HyFormerConfig       frozen config with tiny() and paper() presets
    SequenceMemory       what the sequences contribute: pooled summaries + every layer's K/V (candidate-free)
    HyFormer             tokenise -> encode sequences (layer-wise K/V) -> generate queries
                         -> n_layers x (decode, boost) -> MLP head -> logits.
                         arch="two_stage" is the paper's BaseArch on the same parts: n_layers x decode, then
                         n_layers of RankMixer / Transformer / Wukong interaction (hyformer/baselines.py: MTGR)

Shape notation (used in the trailing comments):
    B  batch size
    S  number of behaviour sequences
    L  length of one sequence (L_s: its maximum)
    L_H  events kept as queries by a LONGER-style encoder layer (longer_queries); L' = min(L, L_H)
    N  queries per sequence (N_s when sequences have different numbers); Q = sum of N_s over sequences
    M  non-sequential (NS) tokens, one per semantic feature group
    T  = Q + M tokens mixed by Query Boosting
    D  model width (d_model): NS tokens, queries, mixer
    Ds sequence width (d_seq, default D): sequence tokens, sequence encoders, cross-attention inside
    H  attention heads
    R  requests whose sequences are encoded once for m candidates each (KV reuse: B = R*m)
    E  embedding width (emb_dim)
    F  number of id columns (fields) of one NS group or of one sequence event

Input contract (produced by the data pipeline; extra keys are ignored):
    batch["ns_<group>"]  LongTensor (B, F_g)       ids in [0, vocab), 0 = missing
    batch["seq_<name>"]  LongTensor (B, L_s, F_e)  per-event side-info ids, most recent event first
    batch["len_<name>"]  LongTensor (B,)           number of valid events; positions >= len are padding
  or, instead of seq_<name>, the deduplicated ID tables of §3.8.1 (what jobs/train.py feeds):
    batch["uniq_<table>"] LongTensor (U, F_e)      the batch's unique events; row 0 = padding (all ids 0)
    batch["inv_<name>"]   LongTensor (B, L_s)      row of uniq_<table> for each position; <table> is
                                                   config.seq_table(name) (sequences may share one table)
  Only the U unique rows are embedded and projected; the (B, L_s, Ds) tokens are then gathered on the device, and
  autograd's backward of that gather sums each position's gradient into its unique row.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_IMPLS = ("reference", "sdpa")
# Sequence encoders of §3.4.1, built by `make_seq_encoder`: (i) "transformer" (full self-attention), (ii) "longer"
# (cross-attention from the L_H most recent events to the full sequence), (iii) "swiglu" (attention-free).
SEQ_ENCODERS = ("transformer", "longer", "swiglu")
# Architectures (config.arch): "hyformer" (§3), "two_stage" (Table 1's BaseArch: sequence modelling, then feature
# interaction), "unified" (Table 1's MTGR/OneTrans, hyformer/baselines.py), "din" (DIN-style target attention of the
# candidate item over each sequence, a reference row every ranking engineer knows: hyformer/baselines.py). Build any
# of them with build_model.
ARCHS = ("hyformer", "two_stage", "unified", "din")
INTERACTIONS = ("rankmixer", "transformer", "wukong")  # feature interaction of "two_stage" (Table 1)
# dense (non-embedding) weights at the start: PyTorch's defaults (U(±1/sqrt(fan_in)) for Linear) or N(0, 0.02²) with
# zero biases for every Linear and per-token FFN (BERT / GPT-2 style); RankingModel.init_dense
DENSE_INITS = ("default", "normal")
QUERY_SOURCES = ("global", "ns", "target")  # Global Info of §3.3.2 / without pooling / candidate only (Table 2)


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, impl: str) -> Tensor:
    """Masked scaled dot-product attention.

    q: (B, H, Lq, D/H); k, v: (B, H, Lk, D/H); key_mask: (B, Lk) bool, True = valid key.
    Returns (B, H, Lq, D/H). Padded keys get exactly zero weight. A row whose keys are all padding (an empty
    sequence) returns exactly zero, with finite gradients: we unmask key 0 so the softmax stays finite, then multiply
    the output by `has_key`. `impl` picks the kernel: "reference" is the plain softmax written out, "sdpa" is
    torch's fused scaled_dot_product_attention; both compute the same function.
    """
    has_key = key_mask.any(dim=-1)  # (B,)
    first = torch.arange(key_mask.shape[-1], device=key_mask.device) == 0  # (Lk,)
    mask = (key_mask | (first & ~has_key[:, None]))[:, None, None, :]  # (B, 1, 1, Lk)
    if impl == "reference":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1) @ v  # (B, H, Lq, D/H)
    elif impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, D/H)
    else:
        raise ValueError(f"unknown attn_impl {impl!r}; expected one of {ATTN_IMPLS}")
    return out * has_key[:, None, None, None].to(out.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of queries `x` (B, Lq, D_q) over keys/values projected from `kv` (B, Lk, D_kv).

    §3.4.1-3.4.2: K_l = H_l W^K_l, V_l = H_l W^V_l are computed here from the layer's sequence states, so they are
    recomputed at every layer. Self-attention is `attn(x, x, mask)`. Rows with no valid key return exactly zero.
    The attention runs at width D_kv (the sequence width Ds when the queries are D wide) and projects back to D_q.

    `project_kv` and `attend` are the two halves of `forward`, for KV reuse: K/V computed for R requests serve
    B = R*m query rows (request-major: rows r*m .. r*m+m-1 belong to request r). The m candidates' queries of one
    request are stacked along the query axis of one attention call, so K/V are never copied.
    """

    def __init__(self, d_q: int, d_kv: int, n_heads: int, dropout: float, attn_impl: str) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_impl = attn_impl  # flipped in place by HyFormer.set_attn_impl
        self.q_proj = nn.Linear(d_q, d_kv)
        self.kv_proj = nn.Linear(d_kv, 2 * d_kv)
        self.out_proj = nn.Linear(d_kv, d_q, bias=False)  # no bias: an empty sequence adds exactly 0
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, kv: Tensor, key_mask: Tensor) -> Tensor:
        return self.attend(x, *self.project_kv(kv), key_mask)  # (B, Lq, D_q)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """kv (R, Lk, D_kv) -> K, V, each (R, H, Lk, D_kv/H)."""
        R, Lk, Dk = kv.shape
        k, v = self.kv_proj(kv).view(R, Lk, 2, self.n_heads, Dk // self.n_heads).permute(2, 0, 3, 1, 4)
        return k, v  # 2 x (R, H, Lk, D_kv/H)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        """x (B, Lq, D_q) with B = R*m rows over K/V and key_mask of R rows -> (B, Lq, D_q)."""
        B, Lq, _ = x.shape
        R, H, _, dh = k.shape
        q = self.q_proj(x).view(R, (B // R) * Lq, H, dh).transpose(1, 2)  # (R, H, m*Lq, D_kv/H)
        out = attention(q, k, v, key_mask, self.attn_impl)  # (R, H, m*Lq, D_kv/H)
        out = out.transpose(1, 2).reshape(B, Lq, H * dh)  # (B, Lq, D_kv)
        return self.dropout(self.out_proj(out))  # (B, Lq, D_q)


class MLP(nn.Module):
    """Position-wise feed-forward network D -> hidden -> D with GELU."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class TransformerEncoderLayer(nn.Module):
    """§3.4.1 (i) Full Transformer encoding, one layer: H_l = TransformerEnc_l(H_{l-1}), pre-norm, bidirectional.

    Padded events are masked as keys, so they never reach valid events; their own states are computed but unused.
    Every sequence encoder returns (states, mask) so that encoders which shorten the sequence (LONGER) fit too.
    """

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float, attn_impl: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CrossAttention(d_model, d_model, n_heads, dropout, attn_impl)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ffn_mult * d_model, dropout)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm1(h)  # (B, L, D)
        h = h + self.attn(x, x, mask)  # (B, L, D)
        h = h + self.mlp(self.norm2(h))  # (B, L, D)
        return h, mask


class LongerEncoderLayer(TransformerEncoderLayer):
    """§3.4.1 (ii) LONGER-style encoding, one layer: H_l = CrossAttn(S_short, S, S), then the FFN, pre-norm.

    S_short is the L_H most recent events (positions 0..L_H-1: events are stored most recent first, padding last);
    they are the queries, and every valid event of S is a key/value, so attention costs O(L_H * L), not O(L^2).
    As in LONGER (arXiv 2505.04421), the layer's output is the L_H-long sequence: the next layer's keys, values and
    queries are these L_H states, so only the first LONGER layer reads the full sequence and the later ones are
    self-attention over L_H states. The mask is cut to the same L_H positions.

    The weights and the per-position function are those of TransformerEncoderLayer (a query's output does not
    depend on the other queries), so the output equals the Full Transformer layer's output at positions < L_H, and
    with L_H >= L the two layers are the same function. Two differences from LONGER: no causal mask (bidirectional,
    like our Full Transformer) and no global tokens inside the encoder (HyFormer's queries play that role, §3.4.2).
    """

    def __init__(self, config: HyFormerConfig) -> None:
        c = config
        super().__init__(c.seq_width, c.n_heads, c.ffn_mult, c.dropout, c.attn_impl)
        self.n_recent = c.longer_queries  # L_H

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm1(h)  # (B, L, D)
        h, short_mask = h[:, : self.n_recent], mask[:, : self.n_recent]  # (B, L', D), (B, L'); L' = min(L, L_H)
        h = h + self.attn(x[:, : self.n_recent], x, mask)  # (B, L', D): L' queries over all L keys
        h = h + self.mlp(self.norm2(h))  # (B, L', D)
        return h, short_mask


class SwiGLU(nn.Module):
    """SwiGLU feed-forward network D -> hidden -> D: W_down(silu(W_gate x) * W_up x), without biases."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class SwiGLUEncoderLayer(nn.Module):
    """§3.4.1 (iii) decoder-style lightweight encoding, one layer: H_l = H_{l-1} + SwiGLU_l(norm(H_{l-1})).

    Attention-free: each event is transformed on its own, so padded events never reach valid ones and the mask
    passes through unchanged. The paper writes H_l = SwiGLU_l(S); the pre-norm and residual are ours, as in every
    other block. The hidden width is ffn_mult * D, like the other FFNs (the paper gives none).
    """

    def __init__(self, d_model: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ffn = SwiGLU(d_model, ffn_mult * d_model, dropout)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return h + self.ffn(self.norm(h)), mask  # (B, L, D), (B, L)


# ---------------------------------------------------------------------------------------------------------------------
# Query Boosting (§3.5)
# ---------------------------------------------------------------------------------------------------------------------


class TokenMixer(nn.Module):
    """Parameter-free token mixing: token h of the output is the concatenation of subspace h of every input token.

    Each of the T tokens is split into T subspaces of width D/T; q~_h = Concat(q_1^(h), ..., q_T^(h)). Applying it
    twice is the identity.
    """

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        x = x.view(B, T, T, D // T)  # (B, T tokens, T subspaces, D/T)
        return x.transpose(1, 2).reshape(B, T, D)  # (B, T subspaces -> new tokens, D)


class PerTokenFFN(nn.Module):
    """An independent two-layer FFN for each of T tokens, batched as einsums over (T, d_in, hidden) weights.

    Also used by QueryGenerator for its N*S query FFNs, which is why input and output widths may differ.
    """

    def __init__(self, n_tokens: int, d_in: int, hidden: int, d_out: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_tokens, d_in, hidden))
        self.b1 = nn.Parameter(torch.empty(n_tokens, hidden))
        self.w2 = nn.Parameter(torch.empty(n_tokens, hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(n_tokens, d_out))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same as nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(torch.einsum("btd,tdh->bth", x, self.w1) + self.b1)  # (B, T, hidden)
        return self.dropout(torch.einsum("bth,tho->bto", h, self.w2) + self.b2)  # (B, T, d_out)


class QueryBoost(nn.Module):
    """§3.5 Query Boosting: Q_boost = Q + PerTokenFFN(TokenMixer(LayerNorm(Q))) on the T = N*S + M tokens.

    The paper writes Q + PerToken-FFN(Mix(Q)); the LayerNorm is our pre-norm, as in every other block here.
    """

    def __init__(self, n_tokens: int, d_model: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mix = TokenMixer()
        self.ffn = PerTokenFFN(n_tokens, d_model, ffn_mult * d_model, d_model, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(self.mix(self.norm(x)))  # (B, T, D)


class TokenTransformer(nn.Module):
    """Self-attention feature interaction over the T tokens (Table 1's "Full Transformer" interaction):
    x = x + SelfAttn(norm(x)); x = x + PerTokenFFN(norm(x)).

    The FFN is per token, as in RankMixer and Query Boosting, so this block differs from the RankMixer block only
    in how tokens exchange information (attention instead of parameter-free token mixing) and has about as many
    parameters (the paper reports 416M vs 386M for the two).
    """

    def __init__(self, n_tokens: int, d_model: int, n_heads: int, ffn_mult: int, dropout: float, attn_impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CrossAttention(d_model, d_model, n_heads, dropout, attn_impl)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = PerTokenFFN(n_tokens, d_model, ffn_mult * d_model, d_model, dropout)

    def forward(self, x: Tensor) -> Tensor:
        everything = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, T): no padding among tokens
        y = self.norm1(x)  # (B, T, D)
        x = x + self.attn(y, y, everything)  # (B, T, D)
        return x + self.ffn(self.norm2(x))  # (B, T, D)


class WukongLayer(nn.Module):
    """One Wukong interaction layer (Zhang et al., arXiv 2403.02545) on T tokens, the third interaction of Table 1:

        X' = LayerNorm(Concat(FMB(X), LCB(X)) + X)
        FMB(X) = MLP(LayerNorm(flatten(X X^T Y)))  -> T_fm tokens   (factorization machine block, "optimized FM":
                                                                     the T x T dot-product matrix projected by a
                                                                     learned Y (T, k) to T x k)
        LCB(X) = W X                               -> T - T_fm tokens (linear compression block)

    T_fm = T // 2 and k = min(T, 16) are our choices (Wukong tunes them per model). The MLP's hidden width is set
    so that the block has about the parameters of a RankMixer block with the same T, D and ffn_mult (T per-token
    FFNs of 2 * ffn_mult * D^2): the paper compares the interactions at about equal parameters (385M vs 386M).
    The output keeps T tokens so blocks stack and the head is unchanged.
    """

    def __init__(self, n_tokens: int, d_model: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        T, k = n_tokens, min(n_tokens, 16)
        self.n_fm = max(1, T // 2)
        self.y = nn.Parameter(torch.randn(T, k) / math.sqrt(T))
        self.fm_norm = nn.LayerNorm(T * k)
        hidden = max(1, round(T * 2 * ffn_mult * d_model**2 / (T * k + self.n_fm * d_model)))
        self.fm_mlp = nn.Sequential(nn.Linear(T * k, hidden), nn.GELU(), nn.Linear(hidden, self.n_fm * d_model))
        self.lcb = nn.Linear(T, T - self.n_fm, bias=False) if T > self.n_fm else None
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        fm = x @ (x.transpose(1, 2) @ self.y)  # (B, T, k) = X X^T Y without forming the (T, T) matrix
        fm = self.fm_mlp(self.fm_norm(fm.flatten(1))).view(B, self.n_fm, D)  # (B, T_fm, D)
        parts = [fm]
        if self.lcb is not None:
            parts.append(self.lcb(x.transpose(1, 2)).transpose(1, 2))  # (B, T - T_fm, D)
        return self.norm(x + self.dropout(torch.cat(parts, dim=1)))  # (B, T, D)


def make_interaction(config: HyFormerConfig) -> nn.Module:
    """One feature-interaction block over the T tokens for arch="two_stage" (config.interaction, Table 1)."""
    c = config
    if c.interaction == "rankmixer":  # RankMixer's block is token mixing + per-token FFN, i.e. Query Boosting
        return QueryBoost(c.n_tokens, c.d_model, c.ffn_mult, c.dropout)
    if c.interaction == "transformer":
        return TokenTransformer(c.n_tokens, c.d_model, c.n_heads, c.ffn_mult, c.dropout, c.attn_impl)
    if c.interaction == "wukong":
        return WukongLayer(c.n_tokens, c.d_model, c.ffn_mult, c.dropout)
    raise ValueError(f"unknown interaction {c.interaction!r}; expected one of {INTERACTIONS}")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenisation, Query Generation and Query Decoding (§3.3-3.4)
# ---------------------------------------------------------------------------------------------------------------------


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Mean of h (B, L, D) over valid positions mask (B, L); zeros where a row has none. Returns (B, D)."""
    m = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, D)


EMB_INIT_STD = 0.02  # sd of the embedding tables' initial rows (BERT/GPT-2's 0.02; torch's default is N(0, 1))


@torch.no_grad()
def init_embedding(weight: Tensor) -> Tensor:
    """An embedding table's initial rows: N(0, EMB_INIT_STD²), padding row 0 exactly zero.

    Why not torch's N(0, 1): most ids are rare, and a rare id's row barely moves from its initial value, so with
    N(0, 1) it enters the model as a unit-scale random vector, noise as loud as a learned row. Small rows start every
    id near "nothing known" and let the data move them (the sparse optimiser's first steps are ~sparse_lr per
    coordinate, far above 0.02). On the held-out days of a real rating log this alone moved HyFormer from AUC
    0.723 ± 0.017 to 0.7625 on both seeds (issue #15). Rows a warm start adds to a grown table get the same initialisation.
    """
    weight.normal_(0.0, EMB_INIT_STD)
    weight[0] = 0.0
    return weight


class Tokenizer(nn.Module):
    """§3.3.1 semantic tokenisation.

    One embedding table (E wide, padding_idx 0) per id space, shared by every column that uses that space (the
    candidate item and the items in the sequences use one "item" table). NS group g -> concat of its F_g field
    embeddings -> Linear -> one D-wide token. Sequence s -> per event, concat of its F_e side-info embeddings ->
    Linear -> Ds, plus a learned embedding of the event's position (recency rank; the paper does not say how order
    is encoded, LONGER feeds position as side information).
    """

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        c = config
        self.ns_spaces = dict(c.ns_groups)
        self.seq_fields = c.seq_fields
        self.seq_tables = {s: c.seq_table(s) for s, _ in c.sequences}
        self.merge = c.merge_sequences
        self.hide = c.hide_sequences
        self.id_dropout = c.id_dropout
        # merge_sequences orders events by age: the "dt" side-info id (log2-minute age bucket) when events carry it
        self.age_field = c.seq_fields.index("dt") if "dt" in c.seq_fields else None
        self.tables = nn.ModuleDict({n: nn.Embedding(vocab, c.emb_dim, padding_idx=0) for n, vocab in c.id_spaces})
        for table in self.tables.values():
            init_embedding(table.weight)
        self.ns_proj = nn.ModuleDict({g: nn.Linear(len(sp) * c.emb_dim, c.d_model) for g, sp in c.ns_groups})
        self.seq_proj = nn.ModuleDict(
            {s: nn.Linear(len(c.seq_fields) * c.emb_dim, c.seq_width) for s, _ in c.sequences}
        )
        self.seq_pos = nn.ParameterDict({s: nn.Parameter(torch.randn(L, c.seq_width) * 0.02) for s, L in c.sequences})
        # id_bias: the first-order ("wide") term, one learned scalar per id of every NS column, zero at the start
        spaces = sorted({sp for _, cols in c.ns_groups for sp in cols})
        vocab = dict(c.id_spaces)
        self.id_bias = nn.ModuleDict({sp: nn.Embedding(vocab[sp], 1, padding_idx=0) for sp in spaces}) if c.id_bias else None
        for table in (self.id_bias or {}).values():
            nn.init.zeros_(table.weight)

    def embed(self, ids: Tensor, spaces: tuple[str, ...]) -> Tensor:
        """ids (..., F) -> concatenated field embeddings (..., F*E); column j is looked up in table spaces[j]."""
        if ids.shape[-1] != len(spaces):
            raise ValueError(f"expected {len(spaces)} id columns {spaces}, got shape {tuple(ids.shape)}")
        return torch.cat([self.tables[sp](ids[..., j]) for j, sp in enumerate(spaces)], dim=-1)  # (..., F*E)

    def first_order(self, batch: Mapping[str, Tensor]) -> Tensor | float:
        """The id_bias term of each row: sum of the learned scalars of its NS ids, (B,); 0.0 without id_bias.

        Wide & Deep's wide part / an FM's first-order term: an id's own click propensity reaches the logit directly,
        learned as fast as a counting rate, while the deep part learns how features interact."""
        if self.id_bias is None:
            return 0.0
        terms = [
            self.id_bias[sp](batch[f"ns_{g}"][:, j]).squeeze(-1)  # (B,)
            for g, spaces in self.ns_spaces.items() for j, sp in enumerate(spaces)
        ]
        return torch.stack(terms, dim=-1).sum(dim=-1)  # (B,)

    def ns_tokens(self, batch: Mapping[str, Tensor]) -> Tensor:
        """One D-wide token per NS group: (B, M, D)."""
        return torch.stack(
            [proj(self.embed(self.drop_ids(batch[f"ns_{g}"]), self.ns_spaces[g])) for g, proj in self.ns_proj.items()],
            dim=1,
        )  # (B, M, D)

    def drop_ids(self, ids: Tensor) -> Tensor:
        """id_dropout: in training, each NS id is replaced by 0 (missing, the zero padding row) with probability p,
        so the model also learns to score an impression from the ids it has left (a cold item from its side
        features); the identity in eval mode."""
        if not (self.training and self.id_dropout > 0):
            return ids
        return ids.masked_fill(torch.rand(ids.shape, device=ids.device) < self.id_dropout, 0)  # (B, F)

    def seq_tokens(self, batch: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per sequence (h (B, L_s, Ds), valid mask (B, L_s)); one merged sequence with merge_sequences."""
        seqs, ages, unique_emb = [], [], {}  # unique_emb: table -> (U, F*E), looked up once per shared table
        for s, proj in self.seq_proj.items():
            if f"inv_{s}" in batch:  # §3.8.1: look up and project the unique events only, then gather
                table = self.seq_tables[s]
                if table not in unique_emb:
                    unique_emb[table] = self.embed(batch[f"uniq_{table}"], self.seq_fields)  # (U, F*E)
                # (U, Ds) projected, then gathered: (B, L, Ds). F.embedding, not indexing: the same gather, but its
                # backward (a segment sum into the U rows) is ~5x faster on CPU than indexing's index_put
                h = F.embedding(batch[f"inv_{s}"], proj(unique_emb[table]))
            else:
                h = proj(self.embed(batch[f"seq_{s}"], self.seq_fields))  # (B, L, Ds)
            L = h.shape[1]
            h = h + self.seq_pos[s][:L]  # (B, L, Ds)
            mask = torch.arange(L, device=h.device) < batch[f"len_{s}"][:, None]  # (B, L)
            if self.hide:  # the no-sequence ablation: every event is padding
                mask = torch.zeros_like(mask)
            seqs.append((h, mask))
            if self.merge and self.age_field is not None:
                j = self.age_field
                ids = batch[f"uniq_{self.seq_tables[s]}"][:, j][batch[f"inv_{s}"]] if f"inv_{s}" in batch else batch[f"seq_{s}"][..., j]
                ages.append(ids)  # (B, L): age bucket of each event
        return [merge_sequences(seqs, ages or None)] if self.merge else seqs


def merge_sequences(seqs: list[tuple[Tensor, Tensor]], ages: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Table 2's "Merge Seq": the sequences (already aligned to width Ds) as one stream, most recent first, as a
    merged behaviour log would be: events ordered by age (``ages``: one (B, L_s) age key per sequence, smaller =
    more recent; the "dt" side-info bucket), ties (and every event when ``ages`` is None) by recency rank within
    their own sequence, then by sequence order; padding last. Ordering by time matters for LONGER-style encoders,
    whose queries are the first L_H events: concatenating the sequences would give them the long sequence's events
    only. Returns (B, sum L_s, Ds), (B, sum L_s)."""
    h = torch.cat([h for h, _ in seqs], dim=1)  # (B, L, Ds)
    mask = torch.cat([m for _, m in seqs], dim=1)  # (B, L)
    longest = max(m.shape[1] for _, m in seqs)
    rank = torch.cat([torch.arange(m.shape[1], device=mask.device).expand_as(m) for _, m in seqs], dim=1)  # (B, L)
    age = torch.cat(ages, dim=1).long() if ages is not None else torch.zeros_like(rank)  # (B, L)
    key = (age * longest + rank).masked_fill(~mask, torch.iinfo(torch.int64).max)  # (B, L): padding last
    order = torch.argsort(key, dim=1, stable=True)  # (B, L): equal keys keep the sequence order
    return h.gather(1, order[..., None].expand_as(h)), mask.gather(1, order)


class QueryGenerator(nn.Module):
    """§3.3.2 Query Generation (first layer only; deeper layers reuse the boosted queries).

    For each sequence s: Global Info G_s = Concat(F_1, ..., F_M, MeanPool(seq_s)) in R^{M*D + Ds}, and
    Q_s = [FFN_{s,1}(G_s), ..., FFN_{s,N_s}(G_s)] in R^{N_s x D}. The Q = sum N_s separate FFNs run as one
    PerTokenFFN. The options the paper names for serving efficiency (config fields):

    - feature selection: `query_groups` picks which NS tokens enter G_s (default all);
    - query_source "ns" drops MeanPool(seq_s) and "target" keeps only the candidate's groups (`target_groups`),
      the two query ablations of Table 2 ("target" is also the query of the two-stage baselines);
    - query compression: `query_compress` > 0 first maps G_s through one shared Linear to that width, so the
      Q FFNs read a small vector instead of (M+1) tokens (our reading of "optional query compression");
    - per-sequence N_s (`n_queries` as a mapping): "adaptive allocation of more global tokens to more important
      sequences" (§4.2.2).
    - beyond the paper, `query_pool_all`: every sequence's MeanPool in every G_s (the paper's G_s holds its own),
      so the long sequence's queries also know what the query-relevant search and feed events look like.
    """

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        c = config
        groups = [g for g, _ in c.ns_groups]
        self.register_buffer("ns_index", torch.tensor([groups.index(g) for g in c.query_ns_groups]), persistent=False)
        self.pool = c.query_source == "global"
        self.pool_all = c.query_pool_all  # every sequence's mean pool in every sequence's Global Info
        n_pools = (len(c.seq_plan) if self.pool_all else 1) if self.pool else 0
        d_info = len(c.query_ns_groups) * c.d_model + n_pools * c.seq_width
        self.compress = nn.Linear(d_info, c.query_compress) if c.query_compress else None
        counts = [n for _, _, n, _ in c.seq_plan]
        # query j reads the Global Info of sequence source[j] (sequence-major, N_s queries each)
        source = torch.tensor([s for s, n in enumerate(counts) for _ in range(n)])
        self.register_buffer("source", source, persistent=False)
        self.ffn = PerTokenFFN(sum(counts), c.query_compress or d_info, c.d_model, c.d_model, c.dropout)

    def forward(self, ns: Tensor, pooled: Tensor) -> Tensor:
        """ns (B, M, D); pooled (R, S, Ds) sequence means, R = B / m requests (KV reuse) -> queries (B, Q, D)."""
        B, S = ns.shape[0], pooled.shape[1]
        g = ns[:, self.ns_index].flatten(1).unsqueeze(1).expand(B, S, -1)  # (B, S, M'*D)
        if self.pool:
            pooled = pooled.repeat_interleave(B // pooled.shape[0], dim=0)  # (B, S, Ds): a request's m candidates
            if self.pool_all:
                pooled = pooled.flatten(1).unsqueeze(1).expand(B, S, -1)  # (B, S, S*Ds): every sequence's pool
            g = torch.cat([g, pooled], dim=-1)  # (B, S, M'*D + Ds) or (B, S, M'*D + S*Ds)
        if self.compress is not None:
            g = self.compress(g)  # (B, S, query_compress)
        return self.ffn(g[:, self.source])  # (B, Q, D)


def make_seq_encoder(config: HyFormerConfig, kind: str) -> nn.Module:
    """One layer of the §3.4.1 sequence encoder `kind` (one of SEQ_ENCODERS), at the sequence width Ds.

    Every encoder layer is forward(h (B, L, Ds), mask (B, L)) -> (h (B, L', Ds), mask (B, L')); only "longer"
    shortens the sequence (L' = min(L, L_H)).
    """
    c = config
    if kind == "transformer":
        return TransformerEncoderLayer(c.seq_width, c.n_heads, c.ffn_mult, c.dropout, c.attn_impl)
    if kind == "longer":
        return LongerEncoderLayer(c)
    if kind == "swiglu":
        return SwiGLUEncoderLayer(c.seq_width, c.ffn_mult, c.dropout)
    raise ValueError(f"unknown seq_encoder {kind!r}; expected one of {SEQ_ENCODERS}")


class QueryDecoder(nn.Module):
    """§3.4 Query Decoding for one sequence at one layer, with that sequence's encoder `kind` (§3.4.1).

    encode: H_l = Enc_l(H_{l-1}) and the layer's K_l, V_l (projected from norm(H_l) by the cross-attention);
    decode: the sequence's N queries attend over them, Q~ = Q + CrossAttn(norm(Q), K_l, V_l).
    Encoding never sees the queries, so it depends on the user and request only, not on the candidate: K/V can be
    computed once per request (KV reuse). Padded events are masked; an empty sequence leaves the queries unchanged.
    """

    def __init__(self, config: HyFormerConfig, kind: str) -> None:
        super().__init__()
        c = config
        self.encoder = make_seq_encoder(c, kind)
        # longer_full_kv: the queries of a LONGER layer decode its L_H outputs followed by the older input events
        self.full_kv = c.longer_full_kv and kind == "longer"
        self.norm_q = nn.LayerNorm(c.d_model)
        self.norm_kv = nn.LayerNorm(c.seq_width)
        self.cross_attn = CrossAttention(c.d_model, c.seq_width, c.n_heads, c.dropout, c.attn_impl)

    def forward(self, q: Tensor, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Both halves for one layer: (decoded queries (B, N, D), next states (B, L', Ds), their mask (B, L'))."""
        h, mask, (k, v, key_mask) = self.encode(h, mask)
        return self.decode(q, k, v, key_mask), h, mask

    def encode(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """-> next states (R, L', Ds), their mask (R, L'), and this layer's (K, V, key mask) for decoding."""
        h_in, mask_in = h, mask
        h, mask = self.encoder(h, mask)  # (R, L', Ds), (R, L')
        kv, key_mask = h, mask
        if self.full_kv:  # the L_H encoded recent events, then the older events as they came in: (R, L, Ds)
            kv = torch.cat([h, h_in[:, h.shape[1] :]], dim=1)
            key_mask = torch.cat([mask, mask_in[:, h.shape[1] :]], dim=1)  # (R, L)
        k, v = self.cross_attn.project_kv(self.norm_kv(kv))  # 2 x (R, H, L' or L, Ds/H)
        return h, mask, (k, v, key_mask)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return q + self.cross_attn.attend(self.norm_q(q), k, v, mask)  # (B, N, D)


LayerKV = list[tuple[Tensor, Tensor, Tensor]]  # per sequence: K (R, H, L', Ds/H), V (same), key mask (R, L')


class HyFormerLayer(nn.Module):
    """§3.6-3.7 one HyFormer layer: Query Decoding of each sequence with its own queries and weights, then Query
    Boosting over Concat(decoded queries of all sequences, NS tokens), split back into queries and NS tokens.

    With boost=False (arch="two_stage") the layer only decodes: the queries of different sequences and the NS
    tokens do not meet until the interaction stack after the last layer.

    Beyond the paper, config.target_attention: the candidate's NS tokens (target_groups) are also decoded by every
    sequence's decoder, t <- t + sum_s CrossAttn_s(norm(t), K_s, V_s), before boosting: the candidate attends over
    the history directly (DIN's target attention), with T unchanged and K/V still candidate-free (KV reuse).
    """

    def __init__(self, config: HyFormerConfig, boost: bool = True) -> None:
        super().__init__()
        self.n_queries = [n for _, _, n, _ in config.seq_plan]
        self.decoders = nn.ModuleList(QueryDecoder(config, kind) for _, _, _, kind in config.seq_plan)
        self.boost = QueryBoost(config.n_tokens, config.d_model, config.ffn_mult, config.dropout) if boost else None
        groups = [g for g, _ in config.ns_groups]
        target = [groups.index(g) for g in config.target_groups] if config.target_attention else []
        self.register_buffer("target", torch.tensor(target, dtype=torch.long), persistent=False)

    def encode(self, seqs: list[tuple[Tensor, Tensor]]) -> tuple[list[tuple[Tensor, Tensor]], LayerKV]:
        """This layer's sequence encoding: next layer's sequence states and this layer's K/V per sequence."""
        next_seqs, kv = [], []
        for decoder, (h, mask) in zip(self.decoders, seqs):
            h, mask, layer_kv = decoder.encode(h, mask)  # (R, L', Ds), (R, L'), (K, V, key mask)
            next_seqs.append((h, mask))
            kv.append(layer_kv)
        return next_seqs, kv

    def forward(self, q: Tensor, ns: Tensor, kv: LayerKV) -> tuple[Tensor, Tensor]:
        decoded = [
            decoder.decode(q_s, k, v, mask)  # (B, N_s, D)
            for decoder, q_s, (k, v, mask) in zip(self.decoders, q.split(self.n_queries, dim=1), kv)
        ]
        q = torch.cat(decoded, dim=1)  # (B, Q, D)
        if len(self.target):  # target attention: the candidate's tokens (B, G_t, D) decode every sequence too
            t = ns[:, self.target]  # (B, G_t, D)
            delta = sum(
                decoder.cross_attn.attend(decoder.norm_q(t), k, v, mask) for decoder, (k, v, mask) in zip(self.decoders, kv)
            )  # (B, G_t, D)
            ns = ns.index_add(1, self.target, delta.to(ns.dtype))  # (B, M, D)
        if self.boost is None:
            return q, ns
        x = self.boost(torch.cat([q, ns], dim=1))  # (B, T, D)
        return x[:, : q.shape[1]], x[:, q.shape[1] :]  # (B, Q, D), (B, M, D)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """Mappings -> tuples of (key, value) pairs and lists -> tuples, recursively (JSON and dict conveniences)."""
    if isinstance(value, Mapping):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class HyFormerConfig:
    """Everything needed to build a HyFormer. Mapping fields also accept dicts (stored as tuples of pairs).

    Example:
        HyFormerConfig(
            id_spaces={"user_id": 1_000_000, "item": 5_000_000, "author": 100_000, "action": 8},
            ns_groups={"user": ("user_id",), "item": ("item", "author")},
            seq_fields=("item", "author", "action"),
            sequences={"long": 1000, "search": 50},
            d_model=64, n_heads=4,  # D must be divisible by n_heads and by T = n_queries * 2 + 2 = 4
            seq_encoder={"long": "longer", "search": "transformer"},  # or one name for every sequence
        )
    """

    id_spaces: tuple[tuple[str, int], ...]  # (name, vocab size including padding id 0): one embedding table each
    ns_groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group, id space of each column): one NS token per group
    seq_fields: tuple[str, ...]  # id space of each per-event side-info column, same for every sequence
    sequences: tuple[tuple[str, int], ...]  # (sequence name, max length L_s): one query set per sequence
    emb_dim: int = 16  # E, width of every embedding table
    d_model: int = 64  # D, width of all tokens
    n_layers: int = 2  # HyFormer layers (each: sequence encoder layer + Query Decoding + Query Boosting)
    n_heads: int = 4  # H, heads of the cross-attention and of the sequence self-attention
    # N, queries per sequence: one number for every sequence, or (sequence, N_s) pairs naming every sequence
    # ("adaptive allocation", §4.2.2)
    n_queries: int | tuple[tuple[str, int], ...] = 1
    ffn_mult: int = 4  # hidden width of every FFN (encoder MLP, per-token FFN) as a multiple of D
    dropout: float = 0.0  # dropout after attention, FFNs and in the head
    # §3.4.1 sequence encoder, one of SEQ_ENCODERS: one name for every sequence, or (sequence, name) pairs naming
    # every sequence (a dict also works)
    seq_encoder: str | tuple[tuple[str, str], ...] = "transformer"
    longer_queries: int = 100  # L_H, most recent events kept as queries by each "longer" encoder layer
    attn_impl: str = "reference"  # attention kernel: "reference" (plain softmax) or "sdpa" (fused)
    head_hidden: tuple[int, ...] = (256,)  # hidden widths of the output MLP on the flattened T*D tokens
    d_seq: int = 0  # Ds, width of sequence tokens, encoders and cross-attention; 0 = d_model (§4.2.1: sequence
    #                 and interaction widths scale independently)
    # §3.3.2 query generation: Global Info from "global" (selected NS tokens + the sequence's mean pool), "ns" (no
    # pool) or "target" (only target_groups, no pool); query_groups selects NS groups (() = all); query_compress > 0
    # maps the Global Info to that width with one shared Linear before the per-query FFNs
    query_source: str = "global"
    query_groups: tuple[str, ...] = ()
    target_groups: tuple[str, ...] = ()  # NS groups that describe the candidate item (query_source="target")
    query_compress: int = 0
    query_pool_all: bool = False  # Global Info of each sequence holds every sequence's mean pool, not only its own
    merge_sequences: bool = False  # Table 2 "Merge Seq": one merged sequence decoded by all Q queries together
    # beyond the paper: the queries of a "longer" layer decode its L_H outputs followed by the older events of its
    # input, so the first layer's queries read the full-length sequence (later layers' inputs are L_H long already)
    longer_full_kv: bool = False
    # beyond the paper: in every layer the candidate's NS tokens (target_groups) are one more query of every
    # sequence's decoder (DIN-style target attention, the decoder's own weights), the decoded values added to them
    target_attention: bool = False
    hide_sequences: bool = False  # ablation ("no-seq"): every sequence event is masked, the model sees NS tokens only
    dense_init: str = "default"  # one of DENSE_INITS, applied by hyformer.zoo.build_model
    id_dropout: float = 0.0  # training only: each NS id is replaced by 0 (missing) with this probability
    id_bias: bool = False  # a first-order term: one learned scalar per NS id added to the logit (Tokenizer.first_order)
    arch: str = "hyformer"  # one of ARCHS
    # (sequence, table): the uniq_<table> key a sequence's inv_<sequence> indexes when the batch carries
    # deduplicated ID tables; a sequence not named uses uniq_<sequence>
    seq_tables: tuple[tuple[str, str], ...] = ()
    interaction: str = "rankmixer"  # one of INTERACTIONS: the feature-interaction blocks of arch="two_stage"

    def __post_init__(self) -> None:
        for f in (
            "id_spaces", "ns_groups", "seq_fields", "sequences", "head_hidden", "seq_encoder", "n_queries",
            "query_groups", "target_groups", "seq_tables",
        ):
            object.__setattr__(self, f, _freeze(getattr(self, f)))
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"HyFormerConfig: {msg}")

        spaces = dict(self.id_spaces)
        for what, names in (
            ("id space", [n for n, _ in self.id_spaces]),
            ("NS group", [n for n, _ in self.ns_groups]),
            ("sequence", [n for n, _ in self.sequences]),
        ):
            if not names:
                fail(f"needs at least one {what}")
            if len(set(names)) != len(names):
                fail(f"duplicate {what} names in {names}")
            for n in names:
                if not (isinstance(n, str) and n.isidentifier()):
                    fail(f"{what} name {n!r} must be a Python identifier")
        for name, vocab in self.id_spaces:
            if not (isinstance(vocab, int) and vocab >= 2):
                fail(f"id space {name!r} vocab {vocab!r} must be an int >= 2 (id 0 is padding)")
        for group, cols in (*self.ns_groups, ("seq_fields", self.seq_fields)):
            if not cols:
                fail(f"{group!r} has no columns")
            for sp in cols:
                if sp not in spaces:
                    fail(f"{group!r} uses unknown id space {sp!r}; known: {sorted(spaces)}")
        for name, max_len in self.sequences:
            if not (isinstance(max_len, int) and max_len >= 1):
                fail(f"sequence {name!r} max length {max_len!r} must be an int >= 1")
        for f in ("emb_dim", "d_model", "n_layers", "n_heads", "ffn_mult", "longer_queries"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                fail(f"{f}={getattr(self, f)!r} must be an int >= 1")
        for f in ("d_seq", "query_compress"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 0):
                fail(f"{f}={getattr(self, f)!r} must be an int >= 0 (0 = off)")
        if not all(isinstance(h, int) and h >= 1 for h in self.head_hidden):
            fail(f"head_hidden={self.head_hidden!r} must be ints >= 1")
        for f in ("dropout", "id_dropout"):
            if not 0.0 <= getattr(self, f) < 1.0:
                fail(f"{f}={getattr(self, f)} must be in [0, 1)")
        for what, value, allowed in (
            ("attn_impl", self.attn_impl, ATTN_IMPLS), ("arch", self.arch, ARCHS), ("dense_init", self.dense_init, DENSE_INITS),
            ("interaction", self.interaction, INTERACTIONS), ("query_source", self.query_source, QUERY_SOURCES),
        ):
            if value not in allowed:
                fail(f"{what}={value!r} must be one of {allowed}")
        for w in ("d_model", "seq_width"):
            if getattr(self, w) % self.n_heads:
                fail(f"{w}={getattr(self, w)} must be divisible by n_heads={self.n_heads}")
        groups = [g for g, _ in self.ns_groups]
        for f in ("query_groups", "target_groups"):
            unknown = [g for g in getattr(self, f) if g not in groups]
            if unknown or len(set(getattr(self, f))) != len(getattr(self, f)):
                fail(f"{f}={getattr(self, f)!r} must name distinct NS groups of {groups}")
        if any(seq not in dict(self.sequences) for seq, _ in self.seq_tables):
            fail(f"seq_tables={self.seq_tables!r} names a sequence not in {[n for n, _ in self.sequences]}")
        if self.query_source == "target" and not self.target_groups:
            fail('query_source="target" needs target_groups, the NS groups of the candidate item')
        if self.target_attention and not self.target_groups:
            fail("target_attention=True needs target_groups, the NS groups of the candidate item")
        encoders = self._per_sequence("seq_encoder", fail)
        for seq, kind in encoders:
            if kind not in SEQ_ENCODERS:
                fail(f"seq_encoder {kind!r} (sequence {seq!r}) must be one of {SEQ_ENCODERS}")
        for seq, n in self._per_sequence("n_queries", fail):
            if not (isinstance(n, int) and n >= 1):
                fail(f"n_queries {n!r} (sequence {seq!r}) must be an int >= 1")
        if self.arch == "unified" and self.seq_encoder not in ("longer", "transformer"):
            fail(
                f'arch="unified" takes seq_encoder "longer" (cross-attention only) or "transformer" (full '
                f"self-attention) for all sequences, got {self.seq_encoder!r}"
            )
        mixes = self.arch == "hyformer" or (self.arch == "two_stage" and self.interaction == "rankmixer")
        if mixes and self.d_model % self.n_tokens:
            fail(
                f"d_model={self.d_model} must be divisible by T = Q + M = {self.n_tokens - self.n_ns} + "
                f"{self.n_ns} = {self.n_tokens} (token mixing splits D into T parts)"
            )

    def _per_sequence(self, field: str, fail: Any) -> tuple[tuple[str, Any], ...]:
        """A field that is one value for every sequence or (sequence, value) pairs naming each sequence once."""
        value, seq_names = getattr(self, field), [n for n, _ in self.sequences]
        if not isinstance(value, tuple):
            return tuple((s, value) for s in seq_names)
        if not all(isinstance(p, tuple) and len(p) == 2 for p in value):
            fail(f"{field}={value!r} must be one value or a mapping sequence -> value")
        named = [n for n, _ in value]
        unknown, missing = [n for n in named if n not in seq_names], [n for n in seq_names if n not in named]
        if unknown or missing or len(named) != len(set(named)):
            fail(
                f"{field} must name each sequence of {seq_names} once; got {named} "
                f"(unknown {unknown}, missing {missing})"
            )
        return value

    def encoder_of(self, seq: str) -> str:
        """The §3.4.1 encoder (one of SEQ_ENCODERS) of sequence `seq`."""
        return self.seq_encoder if isinstance(self.seq_encoder, str) else dict(self.seq_encoder)[seq]

    def seq_table(self, seq: str) -> str:
        """The dedup table (uniq_<table>) that sequence `seq` indexes."""
        return dict(self.seq_tables).get(seq, seq)

    def queries_of(self, seq: str) -> int:
        """N_s, the queries of sequence `seq`."""
        return self.n_queries if isinstance(self.n_queries, int) else dict(self.n_queries)[seq]

    @property
    def seq_plan(self) -> tuple[tuple[str, int, int, str], ...]:
        """(name, max length, queries, encoder) of each sequence the layers decode. With merge_sequences one
        "merged" sequence of the summed lengths, decoded by all queries, with the first sequence's encoder."""
        plan = tuple((s, L, self.queries_of(s), self.encoder_of(s)) for s, L in self.sequences)
        if self.merge_sequences:
            return (("merged", sum(p[1] for p in plan), sum(p[2] for p in plan), plan[0][3]),)
        return plan

    @property
    def seq_width(self) -> int:
        """Ds: d_seq, or d_model when d_seq is 0."""
        return self.d_seq or self.d_model

    @property
    def query_ns_groups(self) -> tuple[str, ...]:
        """The NS groups that enter the Global Info of query generation (feature selection)."""
        if self.query_source == "target":
            return self.target_groups
        return self.query_groups or tuple(g for g, _ in self.ns_groups)

    @property
    def n_seq(self) -> int:
        """S, number of behaviour sequences."""
        return len(self.sequences)

    @property
    def n_ns(self) -> int:
        """M, number of non-sequential tokens (one per NS group)."""
        return len(self.ns_groups)

    @property
    def n_tokens(self) -> int:
        """T = Q + M tokens that reach the head (mixed by Query Boosting); M for arch="unified" (no queries); M + S
        for arch="din" (the NS tokens and one target-attention pooled token per sequence)."""
        if self.arch == "unified":
            return self.n_ns
        if self.arch == "din":
            return self.n_ns + len(self.seq_plan)
        return sum(p[2] for p in self.seq_plan) + self.n_ns

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; tuples become lists, and from_dict turns them back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HyFormerConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"HyFormerConfig: unknown fields {sorted(unknown)}")
        return cls(**{k: _freeze(v) for k, v in d.items()})

    @classmethod
    def tiny(cls, **overrides: Any) -> HyFormerConfig:
        """Small vocabularies and short sequences for CPU tests: S=3, N=1, M=5 -> T=8, D=32."""
        config = cls(
            id_spaces=(
                ("user_id", 50), ("item", 100), ("author", 30), ("query", 40), ("context", 10), ("action", 5),
            ),
            ns_groups=(
                ("user", ("user_id", "context")),
                ("query", ("query",)),
                ("item", ("item", "author")),
                ("context", ("context",)),
                ("cross", ("query", "item")),
            ),
            seq_fields=("item", "author", "action"),
            sequences=(("long", 16), ("search", 8), ("feed", 8)),
            emb_dim=8,
            d_model=32,
            n_layers=2,
            n_heads=2,
            n_queries=1,
            ffn_mult=2,
            longer_queries=4,  # < every tiny sequence length, so "longer" really shortens them
            head_hidden=(32,),
            target_groups=("item",),
        )
        return dataclasses.replace(config, **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> HyFormerConfig:
        """The shapes the paper gives (§4.1): sequences long/search/feed of 3000/50/50 events, 13 NS tokens and one
        global query per sequence -> T = 16 mixer tokens. The paper does not publish its feature list, widths or
        depth: the 13 groups follow its user / query / document / cross feature families, sequence events carry 3
        side-info types (§4.3.2), and the widths, depth and vocabularies are our guesses.

        Widths: D = 832 for the tokens, queries and mixer and Ds = 128 for the sequence side (§4.2.1: HyFormer
        "allows independent adjustment of ... sequence modeling layers and dimensions"). With them HyFormer has
        404M dense parameters (paper 418M) and LONGER + RankMixer 381M (paper 386M), and HyFormer's forward pass
        over a batch of 2048 costs 3.3 TFLOPs (`python -m hyformer.profile`; docs/architectures.md compares every
        row with the paper).

        Sequence encoders: the paper names the three options of §3.4.1 but not which one each sequence uses, nor
        L_H. §3.4.1 (ii) introduces LONGER-style encoding "for long sequences", so the long sequence uses "longer"
        with L_H = 100 (our guess; the paper says L_H << L_S) and the 50-event search and feed sequences the Full
        Transformer.
        """
        big, mid, small = 1 << 20, 1 << 16, 1 << 10
        config = cls(
            id_spaces=(
                ("user_id", big), ("user_attr", mid), ("query_id", big), ("query_term", mid), ("query_attr", small),
                ("item", big), ("author", mid), ("item_attr", mid), ("context", small), ("cross", mid),
                ("action", small),
            ),
            ns_groups=(
                ("user_profile", ("user_id", "user_attr", "user_attr")),
                ("user_stats", ("user_attr", "user_attr")),
                ("user_interest", ("author", "item_attr")),
                ("query_text", ("query_id", "query_term", "query_term")),
                ("query_intent", ("query_attr", "query_attr")),
                ("query_stats", ("query_attr",)),
                ("item_id", ("item", "author")),
                ("item_content", ("item_attr", "item_attr")),
                ("item_stats", ("item_attr", "item_attr")),
                ("context", ("context", "context")),
                ("cross_query_item", ("cross", "cross")),
                ("cross_user_item", ("cross", "cross")),
                ("cross_user_query", ("cross",)),
            ),
            seq_fields=("item", "author", "action"),
            sequences=(("long", 3000), ("search", 50), ("feed", 50)),
            emb_dim=32,
            d_model=832,  # divisible by T = 16 and by n_heads
            d_seq=128,
            n_layers=4,
            n_heads=8,
            n_queries=1,
            ffn_mult=4,
            seq_encoder=(("long", "longer"), ("search", "transformer"), ("feed", "transformer")),  # §3.4.1, see above
            longer_queries=100,
            head_hidden=(1024, 256),
            target_groups=("item_id", "item_content"),
        )
        return dataclasses.replace(config, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def head_mlp(config: HyFormerConfig) -> nn.Sequential:
    """The output MLP: flattened T*D tokens -> head_hidden widths (GELU, dropout) -> one logit."""
    widths = (config.n_tokens * config.d_model, *config.head_hidden)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.GELU(), nn.Dropout(config.dropout)]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1))


class RankingModel(nn.Module):
    """What every architecture here shares: a frozen `config`, forward(batch) -> logits (B,), the attention switch
    and config.json + model.pt checkpoints (hyformer.zoo.load_model rebuilds any architecture from one)."""

    config: HyFormerConfig

    @torch.no_grad()
    def init_output_bias(self, positive_rate: float) -> RankingModel:
        """Start the logit at the training data's log-odds: the output layer's bias = logit(positive_rate).

        A freshly built model predicts ~0.5 (loss ln 2 = 0.69 at a 10% click rate, against 0.33 for the base rate),
        and with AdamW moving each weight by about lr per step (2e-3), the bias alone would need over 1,000 steps to
        reach logit(0.1) = -2.2: the first part of an epoch would be spent learning the base rate through every
        weight. The prior initialisation of the output bias (as in RetinaNet's focal loss paper) avoids that."""
        if not 0.0 < positive_rate < 1.0:
            raise ValueError(f"positive_rate must be in (0, 1), got {positive_rate}")
        self.head[-1].bias.fill_(math.log(positive_rate / (1.0 - positive_rate)))
        return self

    @torch.no_grad()
    def init_dense(self, std: float = 0.02) -> RankingModel:
        """config.dense_init="normal": every Linear and per-token FFN weight ~ N(0, std²), their biases 0 (BERT /
        GPT-2's initialisation); embeddings, norms, positions and token-mixing weights keep theirs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, PerTokenFFN):
                for w, b in ((m.w1, m.b1), (m.w2, m.b2)):
                    nn.init.normal_(w, 0.0, std)
                    nn.init.zeros_(b)
        return self

    def set_attn_impl(self, impl: str) -> RankingModel:
        """Switch every attention between "reference" and "sdpa" in place (the weights do not change)."""
        self.config = dataclasses.replace(self.config, attn_impl=impl)
        for m in self.modules():
            if hasattr(m, "attn_impl"):  # CrossAttention and the baselines' attention modules
                m.attn_impl = impl
        return self

    def save(self, directory: str | Path) -> None:
        """Write config.json and model.pt (the state dict) into `directory`."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        torch.save(self.state_dict(), path / "model.pt")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> RankingModel:
        """Rebuild a model saved by `save` (hyformer.zoo.load_model, which picks the class from the config)."""
        from hyformer.zoo import load_model  # noqa: PLC0415 (zoo imports this module)

        model = load_model(directory, map_location)
        if not isinstance(model, cls):
            kind = f"{type(model).__name__} (arch {model.config.arch!r})"
            raise TypeError(f"{directory} holds a {kind}, not a {cls.__name__}: use hyformer.load_model")
        return model


class SequenceMemory(NamedTuple):
    """What the behaviour sequences contribute to the queries, for R requests: the Global Info's mean pools and
    every layer's K/V. Nothing in it depends on the candidate, so one request's memory serves all its candidates."""

    pooled: Tensor  # (R, S, Ds) masked mean of each sequence's tokens (Query Generation's MeanPool(Seq))
    kv: list[LayerKV]  # per layer, per sequence: K, V (R, H, L', Ds/H) and key mask (R, L')


class HyFormer(RankingModel):
    """HyFormer (Figure 1): tokenise -> generate queries -> n_layers x (Query Decoding, Query Boosting) -> MLP head.

    forward(batch) returns logits (B,); apply sigmoid for probabilities. Loss and metrics live outside the model.

    The sequence side of every layer (encoder -> K_l, V_l) never reads the queries, so forward runs it first for
    all layers (`encode_sequences`) and then the query side (`decode`); that is the same function as interleaving
    them, and it is what KV reuse needs: `score(candidates, model.encode_sequences(requests))` encodes each
    request's sequences once for its m candidates.

    arch="two_stage" (Table 1's BaseArch) uses the same parts without boosting inside the layers: the queries
    decode their own sequence at every layer, and only then meet each other and the NS tokens in n_layers
    interaction blocks (config.interaction: RankMixer, Transformer or Wukong).
    """

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        if config.arch not in ("hyformer", "two_stage"):
            raise ValueError(f"HyFormer builds arch 'hyformer' or 'two_stage', not {config.arch!r}: use build_model")
        c = self.config = config
        self.tokenizer = Tokenizer(c)
        self.query_gen = QueryGenerator(c)
        self.layers = nn.ModuleList(HyFormerLayer(c, boost=c.arch == "hyformer") for _ in range(c.n_layers))
        self.norm_out = nn.LayerNorm(c.d_model)
        self.head = head_mlp(c)
        n_blocks = c.n_layers if c.arch == "two_stage" else 0
        self.interaction = nn.ModuleList(make_interaction(c) for _ in range(n_blocks))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        ns = self.tokenizer.ns_tokens(batch)  # (B, M, D)
        memory = self.encode_sequences(batch)  # sequence side of every layer: pooled (B, S, Ds), K/V per layer
        return self.decode(ns, memory) + self.tokenizer.first_order(batch)  # (B,)

    def encode_sequences(self, batch: Mapping[str, Tensor]) -> SequenceMemory:
        """Sequence tokens -> each layer's encoder -> that layer's K/V (§3.4.1-3.4.2), for the rows of `batch`
        (only its seq_*/len_* keys are read)."""
        seqs = self.tokenizer.seq_tokens(batch)  # S x ((R, L_s, Ds), (R, L_s))
        pooled = torch.stack([masked_mean(h, mask) for h, mask in seqs], dim=1)  # (R, S, Ds)
        kv = []
        for layer in self.layers:
            seqs, kv_l = layer.encode(seqs)
            kv.append(kv_l)
        return SequenceMemory(pooled, kv)

    def decode(self, ns: Tensor, memory: SequenceMemory) -> Tensor:
        """NS tokens (B, M, D) of B = R*m candidates, request-major, + the memory of their R requests -> logits."""
        q = self.query_gen(ns, memory.pooled)  # (B, Q, D), §3.3.2
        for layer, kv in zip(self.layers, memory.kv):
            q, ns = layer(q, ns, kv)  # (B, Q, D), (B, M, D): Query Decoding, then Query Boosting
        x = torch.cat([q, ns], dim=1)  # (B, T, D)
        for block in self.interaction:  # two_stage only: feature interaction after sequence modelling
            x = block(x)  # (B, T, D)
        return self.head(self.norm_out(x).flatten(1)).squeeze(-1)  # (B,)

    def score(self, batch: Mapping[str, Tensor], memory: SequenceMemory) -> Tensor:
        """KV reuse: logits of B = R*m candidates (the ns_* keys of `batch`, request-major) given the memory of
        their R requests; equal to forward on the same rows with each request's sequences repeated m times."""
        return self.decode(self.tokenizer.ns_tokens(batch), memory) + self.tokenizer.first_order(batch)  # (B,)

"""HyFormer: a hybrid transformer for CTR prediction (arXiv 2601.12681), in one file.

Read top to bottom, classes in dependency order:

    attention            masked multi-head attention kernel: "reference" (plain softmax) or "sdpa"
    CrossAttention       queries attend to another token set (self-attention when both are the same)
    MLP                  two-layer feed-forward network
    TransformerEncoderLayer  Full Transformer sequence encoder layer, §3.4.1 (i)
    LongerEncoderLayer   LONGER-style layer: the L_H most recent events attend over all events, §3.4.1 (ii)
    SwiGLU               W_down(silu(W_gate x) * W_up x)
    SwiGLUEncoderLayer   attention-free per-event sequence encoder layer, §3.4.1 (iii)
    TokenMixer           parameter-free RankMixer / MLP-Mixer token mixing, §3.5
    PerTokenFFN          one feed-forward network per token, batched in one einsum, §3.5
    QueryBoost           Q + PerTokenFFN(TokenMixer(norm(Q))), §3.5
    Tokenizer            semantic NS tokens and per-event sequence tokens, §3.3.1
    QueryGenerator       N queries per sequence from the Global Info, §3.3.2
    QueryDecoder         one sequence's encoder layer + cross-attention of its queries, §3.4
    HyFormerLayer        Query Decoding for every sequence, then Query Boosting, §3.6-3.7
    HyFormerConfig       frozen config with tiny() and paper() presets
    HyFormer             tokenise -> generate queries -> n_layers x (decode, boost) -> MLP head -> logits

Shape notation (used in the trailing comments):
    B  batch size
    S  number of behaviour sequences
    L  length of one sequence (L_s: its maximum)
    L_H  events kept as queries by a LONGER-style encoder layer (longer_queries); L' = min(L, L_H)
    N  queries per sequence
    M  non-sequential (NS) tokens, one per semantic feature group
    T  = N*S + M tokens mixed by Query Boosting
    D  model width (d_model)
    H  attention heads
    E  embedding width (emb_dim)
    F  number of id columns (fields) of one NS group or of one sequence event

Input contract (produced by the data pipeline; extra keys are ignored):
    batch["ns_<group>"]  LongTensor (B, F_g)       ids in [0, vocab), 0 = missing
    batch["seq_<name>"]  LongTensor (B, L_s, F_e)  per-event side-info ids, most recent event first
    batch["len_<name>"]  LongTensor (B,)           number of valid events; positions >= len are padding
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_IMPLS = ("reference", "sdpa")
# Sequence encoders of §3.4.1, built by `make_seq_encoder`: (i) "transformer" (full self-attention), (ii) "longer"
# (cross-attention from the L_H most recent events to the full sequence), (iii) "swiglu" (attention-free).
SEQ_ENCODERS = ("transformer", "longer", "swiglu")


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
    """Multi-head attention of queries `x` (B, Lq, D) over keys/values projected from `kv` (B, Lk, D).

    §3.4.1-3.4.2: K_l = H_l W^K_l, V_l = H_l W^V_l are computed here from the layer's sequence states, so they are
    recomputed at every layer. Self-attention is `attn(x, x, mask)`. Rows with no valid key return exactly zero.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, attn_impl: str) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_impl = attn_impl  # flipped in place by HyFormer.set_attn_impl
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)  # no bias: an empty sequence adds exactly 0
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, kv: Tensor, key_mask: Tensor) -> Tensor:
        B, Lq, D = x.shape
        Lk, H = kv.shape[1], self.n_heads
        q = self.q_proj(x).view(B, Lq, H, D // H).transpose(1, 2)  # (B, H, Lq, D/H)
        k, v = self.kv_proj(kv).view(B, Lk, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Lk, D/H)
        out = attention(q, k, v, key_mask, self.attn_impl)  # (B, H, Lq, D/H)
        out = out.transpose(1, 2).reshape(B, Lq, D)  # (B, Lq, D)
        return self.dropout(self.out_proj(out))


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
        self.attn = CrossAttention(d_model, n_heads, dropout, attn_impl)
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
        super().__init__(c.d_model, c.n_heads, c.ffn_mult, c.dropout, c.attn_impl)
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


# ---------------------------------------------------------------------------------------------------------------------
# Tokenisation, Query Generation and Query Decoding (§3.3-3.4)
# ---------------------------------------------------------------------------------------------------------------------


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Mean of h (B, L, D) over valid positions mask (B, L); zeros where a row has none. Returns (B, D)."""
    m = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, D)


class Tokenizer(nn.Module):
    """§3.3.1 semantic tokenisation.

    One embedding table (E wide, padding_idx 0) per id space, shared by every column that uses that space (the
    candidate item and the items in the sequences use one "item" table). NS group g -> concat of its F_g field
    embeddings -> Linear -> one D-wide token. Sequence s -> per event, concat of its F_e side-info embeddings ->
    Linear -> D, plus a learned embedding of the event's position (recency rank; the paper does not say how order
    is encoded, LONGER feeds position as side information).
    """

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        c = config
        self.ns_spaces = dict(c.ns_groups)
        self.seq_fields = c.seq_fields
        self.tables = nn.ModuleDict({n: nn.Embedding(vocab, c.emb_dim, padding_idx=0) for n, vocab in c.id_spaces})
        self.ns_proj = nn.ModuleDict({g: nn.Linear(len(sp) * c.emb_dim, c.d_model) for g, sp in c.ns_groups})
        self.seq_proj = nn.ModuleDict({s: nn.Linear(len(c.seq_fields) * c.emb_dim, c.d_model) for s, _ in c.sequences})
        self.seq_pos = nn.ParameterDict({s: nn.Parameter(torch.randn(L, c.d_model) * 0.02) for s, L in c.sequences})

    def embed(self, ids: Tensor, spaces: tuple[str, ...]) -> Tensor:
        """ids (..., F) -> concatenated field embeddings (..., F*E); column j is looked up in table spaces[j]."""
        if ids.shape[-1] != len(spaces):
            raise ValueError(f"expected {len(spaces)} id columns {spaces}, got shape {tuple(ids.shape)}")
        return torch.cat([self.tables[sp](ids[..., j]) for j, sp in enumerate(spaces)], dim=-1)  # (..., F*E)

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        ns = torch.stack(
            [proj(self.embed(batch[f"ns_{g}"], self.ns_spaces[g])) for g, proj in self.ns_proj.items()], dim=1
        )  # (B, M, D)
        seqs = []
        for s, proj in self.seq_proj.items():
            ids = batch[f"seq_{s}"]  # (B, L, F_e)
            L = ids.shape[1]
            h = proj(self.embed(ids, self.seq_fields)) + self.seq_pos[s][:L]  # (B, L, D)
            mask = torch.arange(L, device=ids.device) < batch[f"len_{s}"][:, None]  # (B, L)
            seqs.append((h, mask))
        return ns, seqs


class QueryGenerator(nn.Module):
    """§3.3.2 Query Generation (first layer only; deeper layers reuse the boosted queries).

    For each sequence s: Global Info G_s = Concat(F_1, ..., F_M, MeanPool(seq_s)) in R^{(M+1)D}, and
    Q_s = [FFN_{s,1}(G_s), ..., FFN_{s,N}(G_s)] in R^{N x D}. The N*S separate FFNs run as one PerTokenFFN.
    """

    def __init__(self, n_seq: int, n_queries: int, n_ns: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.n_queries = n_queries
        self.ffn = PerTokenFFN(n_seq * n_queries, (n_ns + 1) * d_model, d_model, d_model, dropout)

    def forward(self, ns: Tensor, seqs: list[tuple[Tensor, Tensor]]) -> Tensor:
        pooled = torch.stack([masked_mean(h, mask) for h, mask in seqs], dim=1)  # (B, S, D)
        B, S, _ = pooled.shape
        g = torch.cat([ns.flatten(1).unsqueeze(1).expand(B, S, -1), pooled], dim=-1)  # (B, S, (M+1)*D)
        g = g.repeat_interleave(self.n_queries, dim=1)  # (B, S*N, (M+1)*D), sequence-major
        return self.ffn(g)  # (B, S*N, D)


def make_seq_encoder(config: HyFormerConfig, kind: str) -> nn.Module:
    """One layer of the §3.4.1 sequence encoder `kind` (one of SEQ_ENCODERS).

    Every encoder layer is forward(h (B, L, D), mask (B, L)) -> (h (B, L', D), mask (B, L')); only "longer"
    shortens the sequence (L' = min(L, L_H)).
    """
    c = config
    if kind == "transformer":
        return TransformerEncoderLayer(c.d_model, c.n_heads, c.ffn_mult, c.dropout, c.attn_impl)
    if kind == "longer":
        return LongerEncoderLayer(c)
    if kind == "swiglu":
        return SwiGLUEncoderLayer(c.d_model, c.ffn_mult, c.dropout)
    raise ValueError(f"unknown seq_encoder {kind!r}; expected one of {SEQ_ENCODERS}")


class QueryDecoder(nn.Module):
    """§3.4 Query Decoding for one sequence at one layer, with that sequence's encoder `kind` (§3.4.1).

    H_l = Enc_l(H_{l-1}), then the sequence's N queries attend over K_l, V_l (projected from H_l inside the
    cross-attention): Q~ = Q + CrossAttn(norm(Q), norm(H_l)). Padded events are masked; an empty sequence leaves
    the queries unchanged.
    """

    def __init__(self, config: HyFormerConfig, kind: str) -> None:
        super().__init__()
        c = config
        self.encoder = make_seq_encoder(c, kind)
        self.norm_q = nn.LayerNorm(c.d_model)
        self.norm_kv = nn.LayerNorm(c.d_model)
        self.cross_attn = CrossAttention(c.d_model, c.n_heads, c.dropout, c.attn_impl)

    def forward(self, q: Tensor, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, mask = self.encoder(h, mask)  # (B, L', D), (B, L')
        q = q + self.cross_attn(self.norm_q(q), self.norm_kv(h), mask)  # (B, N, D)
        return q, h, mask


class HyFormerLayer(nn.Module):
    """§3.6-3.7 one HyFormer layer: Query Decoding of each sequence with its own queries and weights, then Query
    Boosting over Concat(decoded queries of all sequences, NS tokens), split back into queries and NS tokens."""

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        self.n_queries = config.n_queries
        self.decoders = nn.ModuleList(QueryDecoder(config, config.encoder_of(s)) for s, _ in config.sequences)
        self.boost = QueryBoost(config.n_tokens, config.d_model, config.ffn_mult, config.dropout)

    def forward(
        self, q: Tensor, ns: Tensor, seqs: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        decoded, next_seqs = [], []
        for decoder, q_s, (h, mask) in zip(self.decoders, q.split(self.n_queries, dim=1), seqs):
            q_s, h, mask = decoder(q_s, h, mask)  # (B, N, D), (B, L', D), (B, L')
            decoded.append(q_s)
            next_seqs.append((h, mask))
        x = self.boost(torch.cat([*decoded, ns], dim=1))  # (B, T, D)
        n_q = q.shape[1]
        return x[:, :n_q], x[:, n_q:], next_seqs  # (B, S*N, D), (B, M, D)


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
    n_queries: int = 1  # N, queries per sequence
    ffn_mult: int = 4  # hidden width of every FFN (encoder MLP, per-token FFN) as a multiple of D
    dropout: float = 0.0  # dropout after attention, FFNs and in the head
    # §3.4.1 sequence encoder, one of SEQ_ENCODERS: one name for every sequence, or (sequence, name) pairs naming
    # every sequence (a dict also works)
    seq_encoder: str | tuple[tuple[str, str], ...] = "transformer"
    longer_queries: int = 100  # L_H, most recent events kept as queries by each "longer" encoder layer
    attn_impl: str = "reference"  # attention kernel: "reference" (plain softmax) or "sdpa" (fused)
    head_hidden: tuple[int, ...] = (256,)  # hidden widths of the output MLP on the flattened T*D tokens

    def __post_init__(self) -> None:
        for f in ("id_spaces", "ns_groups", "seq_fields", "sequences", "head_hidden", "seq_encoder"):
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
        for f in ("emb_dim", "d_model", "n_layers", "n_heads", "n_queries", "ffn_mult", "longer_queries"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                fail(f"{f}={getattr(self, f)!r} must be an int >= 1")
        if not all(isinstance(h, int) and h >= 1 for h in self.head_hidden):
            fail(f"head_hidden={self.head_hidden!r} must be ints >= 1")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout={self.dropout} must be in [0, 1)")
        if self.d_model % self.n_heads:
            fail(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_model % self.n_tokens:
            fail(
                f"d_model={self.d_model} must be divisible by T = n_queries*S + M = "
                f"{self.n_queries}*{self.n_seq} + {self.n_ns} = {self.n_tokens} (token mixing splits D into T parts)"
            )
        if self.attn_impl not in ATTN_IMPLS:
            fail(f"attn_impl={self.attn_impl!r} must be one of {ATTN_IMPLS}")
        pairs = self.seq_encoder  # one name for every sequence, or (sequence, name) pairs
        if isinstance(pairs, str):
            pairs = tuple((s, pairs) for s, _ in self.sequences)
        if not (isinstance(pairs, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in pairs)):
            fail(f"seq_encoder={self.seq_encoder!r} must be a name or a mapping sequence -> name")
        seq_names, named = [n for n, _ in self.sequences], [n for n, _ in pairs]
        unknown, missing = [n for n in named if n not in seq_names], [n for n in seq_names if n not in named]
        if unknown or missing or len(named) != len(set(named)):
            fail(
                f"seq_encoder must name each sequence of {seq_names} once; got {named} "
                f"(unknown {unknown}, missing {missing})"
            )
        for seq, kind in pairs:
            if kind not in SEQ_ENCODERS:
                fail(f"seq_encoder {kind!r} (sequence {seq!r}) must be one of {SEQ_ENCODERS}")

    def encoder_of(self, seq: str) -> str:
        """The §3.4.1 encoder (one of SEQ_ENCODERS) of sequence `seq`."""
        return self.seq_encoder if isinstance(self.seq_encoder, str) else dict(self.seq_encoder)[seq]

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
        """T = N*S + M, tokens mixed by Query Boosting."""
        return self.n_queries * self.n_seq + self.n_ns

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
        )
        return dataclasses.replace(config, **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> HyFormerConfig:
        """The shapes the paper gives (§4.1): sequences long/search/feed of 3000/50/50 events, 13 NS tokens and one
        global query per sequence -> T = 16 mixer tokens. The paper does not publish its feature list, widths or
        depth: the 13 groups follow its user / query / document / cross feature families, sequence events carry 3
        side-info types (§4.3.2), and D, depth and vocabularies are our guesses, picked so that the dense
        (non-embedding) parameters, about 458M, are near the paper's 418M.

        Sequence encoders: the paper names the three options of §3.4.1 but not which one each sequence uses, nor L_H.
        A Full Transformer over the 3000-event long sequence costs far more than the paper's 3.9 TFLOPs per
        2048-sample training step (§4.1.3, Table 1), and §3.4.1 (ii) introduces LONGER-style encoding "for long
        sequences", so the long sequence uses "longer" and the 50-event search and feed sequences the Full
        Transformer. L_H = 100 is our guess (the paper only says L_H << L_S). `python -m hyformer.profile` counts
        about 137 training TFLOPs for this preset against 1945 with the Full Transformer on every sequence; the rest
        of the gap to 3.9 is our guessed widths (the K/V projection of 3000 events at D = 768 alone is 14.5 forward).
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
            d_model=768,  # divisible by T = 16 and by n_heads
            n_layers=4,
            n_heads=8,
            n_queries=1,
            ffn_mult=4,
            seq_encoder=(("long", "longer"), ("search", "transformer"), ("feed", "transformer")),  # §3.4.1, see above
            longer_queries=100,
            head_hidden=(1024, 256),
        )
        return dataclasses.replace(config, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class HyFormer(nn.Module):
    """HyFormer (Figure 1): tokenise -> generate queries -> n_layers x (Query Decoding, Query Boosting) -> MLP head.

    forward(batch) returns logits (B,); apply sigmoid for probabilities. Loss and metrics live outside the model.
    """

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tokenizer = Tokenizer(c)
        self.query_gen = QueryGenerator(c.n_seq, c.n_queries, c.n_ns, c.d_model, c.dropout)
        self.layers = nn.ModuleList(HyFormerLayer(c) for _ in range(c.n_layers))
        self.norm_out = nn.LayerNorm(c.d_model)
        widths = (c.n_tokens * c.d_model, *c.head_hidden)
        head: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            head += [nn.Linear(d_in, d_out), nn.GELU(), nn.Dropout(c.dropout)]
        self.head = nn.Sequential(*head, nn.Linear(widths[-1], 1))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        ns, seqs = self.tokenizer(batch)  # (B, M, D), S x ((B, L_s, D), (B, L_s))
        q = self.query_gen(ns, seqs)  # (B, S*N, D)
        for layer in self.layers:
            q, ns, seqs = layer(q, ns, seqs)  # (B, S*N, D), (B, M, D)
        x = self.norm_out(torch.cat([q, ns], dim=1))  # (B, T, D)
        return self.head(x.flatten(1)).squeeze(-1)  # (B,)

    def set_attn_impl(self, impl: str) -> HyFormer:
        """Switch every attention between "reference" and "sdpa" in place (the weights do not change)."""
        self.config = dataclasses.replace(self.config, attn_impl=impl)
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.attn_impl = impl
        return self

    def save(self, directory: str | Path) -> None:
        """Write config.json and model.pt (the state dict) into `directory`."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        torch.save(self.state_dict(), path / "model.pt")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> HyFormer:
        """Rebuild a model saved by `save`."""
        path = Path(directory)
        model = cls(HyFormerConfig.from_dict(json.loads((path / "config.json").read_text())))
        model.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))
        return model

"""HyFormer's building blocks, in dependency order; hyformer/model.py assembles them as the paper's Figure 1, and
hyformer/baselines.py builds the paper's baselines from the same parts.

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
    Tokenizer            semantic NS tokens and per-event sequence tokens, §3.3.1; merge_sequences (Table 2)
    make_seq_encoder     one layer of the §3.4.1 encoder a sequence uses
    head_mlp             the output MLP every architecture shares

Shape notation as in hyformer/model.py's docstring (B, S, L, L_H, N, Q, M, T, D, Ds, H, R, E, F).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyformer.config import ATTN_IMPLS, SEQ_ENCODERS, HyFormerConfig

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
# Tokenisation (§3.3.1) and the output head
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
    0.723 ± 0.017 to 0.7625 on both seeds (issue #15). Rows a warm start adds to a grown table get the same
    initialisation.
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
        schema = c.schema
        self.ns_spaces = dict(schema.ns_groups)
        self.seq_fields = {s: schema.fields_of(s) for s in schema.sequences}
        self.seq_tables = {s: schema.seq_table(s) for s in schema.sequences}
        self.merge = c.merge_sequences
        self.hide = c.hide_sequences
        self.id_dropout = c.id_dropout
        # merge_sequences orders events by age: the "dt" side-info id (log2-minute age bucket) when events carry it
        self.age_field = {s: f.index("dt") if "dt" in f else None for s, f in self.seq_fields.items()}
        self.by_age = self.merge and all(j is not None for j in self.age_field.values())  # every sequence has dt
        self.tables = nn.ModuleDict(
            {n: nn.Embedding(vocab, c.emb_dim, padding_idx=0) for n, vocab in schema.id_spaces.items()}
        )
        for table in self.tables.values():
            init_embedding(table.weight)
        self.n_dense = {g: schema.n_dense(g) for g in self.ns_spaces}
        self.bags = {g: schema.bags.get(g, ()) for g in self.ns_spaces}
        width = {g: (len(sp) + len(self.bags[g])) * c.emb_dim + self.n_dense[g] for g, sp in self.ns_spaces.items()}
        self.ns_proj = nn.ModuleDict({g: nn.Linear(width[g], c.d_model) for g in self.ns_spaces})
        self.seq_proj = nn.ModuleDict(
            {s: nn.Linear(len(self.seq_fields[s]) * c.emb_dim, c.seq_width) for s in schema.sequences}
        )
        self.seq_pos = nn.ParameterDict(
            {s: nn.Parameter(torch.randn(L, c.seq_width) * 0.02) for s, L in schema.sequences.items()}
        )
        # id_bias: the first-order ("wide") term, one learned scalar per id of every NS column, zero at the start
        spaces = sorted({sp for cols in schema.ns_groups.values() for sp in cols})
        vocab = schema.id_spaces
        self.id_bias = (
            nn.ModuleDict({sp: nn.Embedding(vocab[sp], 1, padding_idx=0) for sp in spaces}) if c.id_bias else None
        )
        for table in (self.id_bias or {}).values():
            nn.init.zeros_(table.weight)

    def embed(self, ids: Tensor, spaces: tuple[str, ...]) -> Tensor:
        """ids (..., F) -> concatenated field embeddings (..., F*E); column j is looked up in table spaces[j]."""
        if ids.shape[-1] != len(spaces):
            raise ValueError(f"expected {len(spaces)} id columns {spaces}, got shape {tuple(ids.shape)}")
        if not spaces:  # a group of float features only
            return ids.new_zeros((*ids.shape[:-1], 0), dtype=torch.get_default_dtype())
        return torch.cat([self.tables[sp](ids[..., j]) for j, sp in enumerate(spaces)], dim=-1)  # (..., F*E)

    def first_order(self, batch: Mapping[str, Tensor]) -> Tensor | float:
        """The id_bias term of each row: sum of the learned scalars of its NS ids, (B,); 0.0 without id_bias.

        Wide & Deep's wide part / an FM's first-order term: an id's own click propensity reaches the logit directly,
        learned as fast as a counting rate, while the deep part learns how features interact."""
        if self.id_bias is None:
            return 0.0
        terms = [
            self.id_bias[sp](batch[f"ns_{g}"][:, j]).squeeze(-1)  # (B,)
            for g, spaces in self.ns_spaces.items()
            for j, sp in enumerate(spaces)
        ]
        return torch.stack(terms, dim=-1).sum(dim=-1)  # (B,)

    def ns_tokens(self, batch: Mapping[str, Tensor]) -> Tensor:
        """One D-wide token per NS group: Linear(its id embeddings ++ its id lists' mean embeddings ++ its float
        features), (B, M, D)."""
        tokens = []
        for g, proj in self.ns_proj.items():
            x = self.embed(self.drop_ids(batch[f"ns_{g}"]), self.ns_spaces[g])  # (B, F_g*E)
            if self.bags[g]:
                x = torch.cat([x, self.pool_bags(batch[f"bag_{g}"], self.bags[g])], dim=-1)  # (B, F_g*E + K*E)
            if self.n_dense[g]:
                x = torch.cat([x, batch[f"dense_{g}"].to(x.dtype)], dim=-1)  # (B, F_g*E + n_g)
            tokens.append(proj(x))
        return torch.stack(tokens, dim=1)  # (B, M, D)

    def pool_bags(self, ids: Tensor, spaces: tuple[str, ...]) -> Tensor:
        """ids (B, K, L) of K id lists, 0 = padding -> each list's mean embedding, concatenated: (B, K*E)."""
        pooled = []
        for k, sp in enumerate(spaces):
            e = self.tables[sp](ids[:, k])  # (B, L, E); the padding row is zero
            n = (ids[:, k] > 0).sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
            pooled.append(e.sum(dim=1) / n)  # (B, E)
        return torch.cat(pooled, dim=-1)  # (B, K*E)

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
                    unique_emb[table] = self.embed(batch[f"uniq_{table}"], self.seq_fields[s])  # (U, F*E)
                # (U, Ds) projected, then gathered: (B, L, Ds). F.embedding, not indexing: the same gather, but its
                # backward (a segment sum into the U rows) is ~5x faster on CPU than indexing's index_put
                h = F.embedding(batch[f"inv_{s}"], proj(unique_emb[table]))
            else:
                h = proj(self.embed(batch[f"seq_{s}"], self.seq_fields[s]))  # (B, L, Ds)
            L = h.shape[1]
            h = h + self.seq_pos[s][:L]  # (B, L, Ds)
            mask = torch.arange(L, device=h.device) < batch[f"len_{s}"][:, None]  # (B, L)
            if self.hide:  # the no-sequence ablation: every event is padding
                mask = torch.zeros_like(mask)
            seqs.append((h, mask))
            if self.by_age:
                j = self.age_field[s]
                ids = (
                    batch[f"uniq_{self.seq_tables[s]}"][:, j][batch[f"inv_{s}"]]
                    if f"inv_{s}" in batch
                    else batch[f"seq_{s}"][..., j]
                )
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


def head_mlp(config: HyFormerConfig) -> nn.Sequential:
    """The output MLP: flattened T*D tokens -> head_hidden widths (GELU, dropout) -> one logit."""
    widths = (config.n_tokens * config.d_model, *config.head_hidden)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.GELU(), nn.Dropout(config.dropout)]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1))

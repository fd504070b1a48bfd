"""The paper's baselines (Table 1) and a DIN reference row, on HyFormer's tokenizer and building blocks.

    TokenTransformer, WukongLayer   the Transformer and Wukong feature-interaction blocks of Table 1 (RankMixer's
                                    block is layers.QueryBoost); make_interaction picks one
    TwoStage         BaseArch: LONGER or Full Transformer sequence modelling, then RankMixer / Transformer / Wukong
                     interaction (HyFormer's own parts without boosting inside the layers)
    MixedAttention, UnifiedBlock, Unified   MTGR / OneTrans (§4.1.2, UniArch): one token stream, unified blocks
    TargetAttention, DIN            the classic target-attention baseline a ranking engineer expects next to
                                    HyFormer (not in the paper's tables)

Build any of them by name with hyformer.zoo. Shape notation as in hyformer/model.py (B, S, M, L, D, Ds, H, T).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyformer.config import INTERACTIONS, HyFormerConfig
from hyformer.layers import (
    MLP,
    CrossAttention,
    PerTokenFFN,
    QueryBoost,
    Tokenizer,
    attention,
    head_mlp,
    merge_sequences,
)
from hyformer.model import HyFormer, RankingModel

# ---------------------------------------------------------------------------------------------------------------------
# Two-stage: sequence modelling, then feature interaction (Table 1's BaseArch)
# ---------------------------------------------------------------------------------------------------------------------


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


class TwoStage(HyFormer):
    """Table 1's BaseArch on HyFormer's parts: every sequence's queries decode their own sequence at every layer
    with no Query Boosting inside the layers, so the queries of different sequences and the NS tokens do not meet
    until the n_layers interaction blocks after the last layer (config.interaction: RankMixer, Transformer or
    Wukong). KV reuse works as in HyFormer (encode_sequences / score)."""

    arch = "two_stage"
    query_boosting = False

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__(config)
        self.interaction = nn.ModuleList(make_interaction(config) for _ in range(config.n_layers))

    def interact(self, x: Tensor) -> Tensor:
        for block in self.interaction:
            x = block(x)  # (B, T, D)
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Unified blocks (MTGR / OneTrans) and DIN
# ---------------------------------------------------------------------------------------------------------------------


class MixedAttention(nn.Module):
    """Attention over [NS tokens x (B, M, D); sequence tokens h (B, L, Ds)] at the sequence width Ds, with
    OneTrans-style mixed parameters: NS tokens and sequence tokens have their own Q/K/V/output projections, so the
    L sequence tokens are projected at Ds (like HyFormer's sequence side), not at D.

    The NS tokens are always queries; with seq_queries the sequence tokens are queries too (full self-attention
    over all M + L tokens). Padded sequence tokens are masked as keys.
    """

    def __init__(self, config: HyFormerConfig, seq_queries: bool) -> None:
        super().__init__()
        c = config
        D, Ds = c.d_model, c.seq_width
        self.n_heads = c.n_heads
        self.attn_impl = c.attn_impl  # flipped in place by set_attn_impl
        self.ns_q, self.ns_kv, self.ns_out = nn.Linear(D, Ds), nn.Linear(D, 2 * Ds), nn.Linear(Ds, D, bias=False)
        self.seq_kv = nn.Linear(Ds, 2 * Ds)
        self.seq_q = nn.Linear(Ds, Ds) if seq_queries else None
        self.seq_out = nn.Linear(Ds, Ds, bias=False) if seq_queries else None
        self.dropout = nn.Dropout(c.dropout)

    def heads(self, t: Tensor) -> Tensor:
        B, L, W = t.shape
        return t.view(B, L, self.n_heads, W // self.n_heads).transpose(1, 2)  # (B, H, L, W/H)

    def forward(self, x: Tensor, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        B, M, _ = x.shape
        k_x, v_x = self.ns_kv(x).chunk(2, dim=-1)  # 2 x (B, M, Ds)
        k_h, v_h = self.seq_kv(h).chunk(2, dim=-1)  # 2 x (B, L, Ds)
        k = self.heads(torch.cat([k_x, k_h], dim=1))  # (B, H, M + L, Ds/H)
        v = self.heads(torch.cat([v_x, v_h], dim=1))  # (B, H, M + L, Ds/H)
        key_mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, M), mask], dim=1)  # (B, M + L)
        q = self.ns_q(x) if self.seq_q is None else torch.cat([self.ns_q(x), self.seq_q(h)], dim=1)  # (B, Lq, Ds)
        out = attention(self.heads(q), k, v, key_mask, self.attn_impl)  # (B, H, Lq, Ds/H)
        out = out.transpose(1, 2).flatten(2)  # (B, Lq, Ds)
        dx = self.dropout(self.ns_out(out[:, :M]))  # (B, M, D)
        dh = None if self.seq_out is None else self.dropout(self.seq_out(out[:, M:]))  # (B, L, Ds)
        return dx, dh


class UnifiedBlock(nn.Module):
    """One MTGR/OneTrans-style block over the NS tokens x (B, M, D) and the merged sequence h (B, L, Ds).

    As the paper describes the authors' implementation (§4.1.2, §4.2.1), the NS tokens are the queries and NS
    tokens and sequence tokens together are the keys:

    - full=False ("w/ LONGER"): only cross-attention from the NS tokens to [NS; sequence], no attention inside
      the sequence; the sequence tokens pass through unchanged (their K/V are still projected per layer);
    - full=True ("w/ Full Transformer"): full self-attention over [NS; sequence], every token updated.

    Pre-norm attention (MixedAttention), then OneTrans's mixed parameterisation of the FFN: one FFN per NS token
    (PerTokenFFN, as in RankMixer and Query Boosting) and one shared FFN for the sequence tokens. OneTrans's pyramid
    (dropping old sequence tokens in deeper layers) is not modelled: the paper's comparison is about where
    attention goes.
    """

    def __init__(self, config: HyFormerConfig, full: bool, last: bool) -> None:
        super().__init__()
        c = config
        D, Ds = c.d_model, c.seq_width
        self.norm_x, self.norm_h = nn.LayerNorm(D), nn.LayerNorm(Ds)
        self.attn = MixedAttention(c, seq_queries=full and not last)  # last: sequence outputs unused
        self.norm2_x = nn.LayerNorm(D)
        self.ns_ffn = PerTokenFFN(c.n_ns, D, c.ffn_mult * D, D, c.dropout)
        # the last block's sequence tokens are not read again: no FFN for them
        self.seq_ffn = MLP(Ds, c.ffn_mult * Ds, c.dropout) if full and not last else None
        self.norm2_h = nn.LayerNorm(Ds) if self.seq_ffn is not None else None

    def forward(self, x: Tensor, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        dx, dh = self.attn(self.norm_x(x), self.norm_h(h), mask)  # (B, M, D), (B, L, Ds) or None
        x = x + dx  # (B, M, D)
        x = x + self.ns_ffn(self.norm2_x(x))  # (B, M, D)
        if dh is not None:
            h = h + dh  # (B, L, Ds)
        if self.seq_ffn is not None:
            h = h + self.seq_ffn(self.norm2_h(h))  # (B, L, Ds)
        return x, h


class Unified(RankingModel):
    """MTGR/OneTrans (Table 1, UniArch): every sequence merged into one token stream (width Ds, valid events
    first), n_layers UnifiedBlocks over [NS tokens; sequence], head on the M NS tokens.

    seq_encoder "longer" = the paper's "w/ LONGER" (cross-attention only), "transformer" = "w/ Full Transformer".
    The NS tokens are the queries: "the number of query tokens ... as the number of all the non-sequence tokens"
    (§2), so there are no generated queries and no Query Generation parameters.
    """

    arch = "unified"

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__(config)
        c = config
        self.tokenizer = Tokenizer(c)
        full = c.seq_encoder == "transformer"
        self.blocks = nn.ModuleList(UnifiedBlock(c, full, last=i == c.n_layers - 1) for i in range(c.n_layers))
        self.norm_out = nn.LayerNorm(c.d_model)
        self.head = head_mlp(c)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        x = self.tokenizer.ns_tokens(batch)  # (B, M, D)
        seqs = self.tokenizer.seq_tokens(batch)  # S x ((B, L_s, Ds), (B, L_s)), or one if merge_sequences
        h, mask = seqs[0] if len(seqs) == 1 else merge_sequences(seqs)  # (B, L, Ds), (B, L)
        for block in self.blocks:
            x, h = block(x, h, mask)  # (B, M, D), (B, L, Ds)
        return self.head(self.norm_out(x).flatten(1)).squeeze(-1) + self.tokenizer.first_order(batch)  # (B,)


class TargetAttention(nn.Module):
    """DIN's activation unit and weighted sum pooling for one sequence: the candidate q (B, Ds) scores each event
    k_j (B, L, Ds) with a_s([q, k_j, q - k_j, q * k_j]) -> one scalar w_j, and the sequence becomes
    W_o sum_j w_j k_j (B, D). Padded events get w_j = 0 exactly and, as in the paper, the weights are not
    softmax-normalised, so an empty sequence gives exactly zero (W_o has no bias)."""

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        c = config
        Ds = c.seq_width
        self.fc = nn.Linear(4 * Ds, c.ffn_mult * Ds)
        self.score = nn.Linear(c.ffn_mult * Ds, 1)
        self.out_proj = nn.Linear(Ds, c.d_model, bias=False)  # no bias: an empty sequence stays exactly zero
        self.dropout = nn.Dropout(c.dropout)

    def weights(self, q: Tensor, h: Tensor, mask: Tensor) -> Tensor:
        """q (B, Ds), h (B, L, Ds), mask (B, L) -> w (B, L): the unit's output, 0 at padded events."""
        q = q.unsqueeze(1).expand_as(h)  # (B, L, Ds)
        a = torch.cat([q, h, q - h, q * h], dim=-1)  # (B, L, 4Ds)
        w = self.score(F.gelu(self.fc(a))).squeeze(-1)  # (B, L)
        return w.masked_fill(~mask, 0.0)  # (B, L)

    def forward(self, q: Tensor, h: Tensor, mask: Tensor) -> Tensor:
        w = self.weights(q, h, mask)  # (B, L)
        pooled = (w.unsqueeze(-1) * h).sum(dim=1)  # (B, Ds): sum pooling, no normalisation
        return self.dropout(self.out_proj(pooled))  # (B, D)


class DIN(RankingModel):
    """DIN-style target attention (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction",
    KDD 2018), one pooled interest token per sequence, on HyFormer's tokenizer and head:

        x = Tokenizer NS tokens                                               (B, M, D)
        q = W_t mean_{g in target_groups} x_g                                 (B, Ds)  the candidate item
        w_sj = a_s([q, k_sj, q - k_sj, q * k_sj]) for valid events, 0 for padding
        p_s = W_o,s sum_j w_sj k_sj                                           (B, D)   one token per sequence s
        logits = head(flatten(LayerNorm([x_1 .. x_M, p_1 .. p_S])))           (B,)     T = M + S tokens

    k_sj are the Tokenizer's sequence tokens (side-info embeddings projected to Ds, plus the position embedding);
    they are keys and values. a_s is each sequence's own activation unit (TargetAttention): Linear(4Ds ->
    ffn_mult*Ds), GELU (the paper uses PReLU/Dice), Linear(-> 1), no output activation. As in the paper the
    weights are not softmax-normalised (sum pooling keeps the intensity of the user's interest), so an empty
    sequence pools to exactly zero. As in DIN, the NS tokens and pooled interests are concatenated and fed to an
    MLP (the head every architecture here shares); events never attend to each other, nor sequences to NS tokens.
    With merge_sequences the Tokenizer returns one merged sequence and S = 1.
    """

    arch = "din"

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__(config)
        c = config
        if not c.schema.target_groups:
            raise ValueError(
                "DIN needs target_groups (the schema's NS groups of the candidate item, the query of its target "
                "attention); got target_groups=()"
            )
        self.tokenizer = Tokenizer(c)
        groups = list(c.schema.ns_groups)
        self.register_buffer(
            "target_index", torch.tensor([groups.index(g) for g in c.schema.target_groups]), persistent=False
        )
        self.target_proj = nn.Linear(c.d_model, c.seq_width)
        self.units = nn.ModuleList(TargetAttention(c) for _ in c.seq_plan)
        self.norm_out = nn.LayerNorm(c.d_model)
        self.head = head_mlp(c)

    def target(self, x: Tensor) -> Tensor:
        """NS tokens x (B, M, D) -> the query q (B, Ds): the candidate's target_groups tokens, averaged, projected."""
        return self.target_proj(x[:, self.target_index].mean(dim=1))  # (B, Ds)

    def interests(self, x: Tensor, seqs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """NS tokens x (B, M, D) and the S sequences' (h (B, L_s, Ds), mask (B, L_s)) -> pooled tokens (B, S, D)."""
        q = self.target(x)  # (B, Ds)
        return torch.stack([unit(q, h, mask) for unit, (h, mask) in zip(self.units, seqs)], dim=1)  # (B, S, D)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        x = self.tokenizer.ns_tokens(batch)  # (B, M, D)
        seqs = self.tokenizer.seq_tokens(batch)  # S x ((B, L_s, Ds), (B, L_s)), or one if merge_sequences
        tokens = torch.cat([x, self.interests(x, seqs)], dim=1)  # (B, M + S, D)
        return self.head(self.norm_out(tokens).flatten(1)).squeeze(-1) + self.tokenizer.first_order(batch)  # (B,)

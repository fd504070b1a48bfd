"""Unified-block baselines of Table 1 (MTGR / OneTrans, §4.1.2), on HyFormer's tokenizer and building blocks.

The two-stage baselines (LONGER or Full Transformer, then RankMixer, Transformer or Wukong) are HyFormer's own parts
without boosting inside the layers: `HyFormerConfig(arch="two_stage", interaction=...)` in hyformer/model.py.

Shape notation as in hyformer/model.py (B, M, L, D, Ds, H).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from hyformer.model import (
    MLP, HyFormerConfig, PerTokenFFN, RankingModel, Tokenizer, attention, head_mlp, merge_sequences,
)


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

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        if config.arch != "unified":
            raise ValueError(f"Unified builds arch 'unified', not {config.arch!r}: use build_model")
        c = self.config = config
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
        return self.head(self.norm_out(x).flatten(1)).squeeze(-1)  # (B,)

"""HyFormer: a hybrid transformer for CTR prediction (arXiv 2601.12681), read top to bottom like the paper's Figure 1.

    QueryGenerator   N_s queries per sequence from the (selected, optionally compressed) Global Info, §3.3.2
    QueryDecoder     one sequence's encoder layer (-> that layer's K/V) + cross-attention of its queries, §3.4
    HyFormerLayer    Query Decoding for every sequence, then Query Boosting, §3.6-3.7
    RankingModel     what every architecture shares: config, logits out, output-bias and dense initialisation,
                     attention switch, save (hyformer.zoo.load_model loads)
    SequenceMemory   what the sequences contribute: pooled summaries + every layer's K/V (candidate-free)
    HyFormer         tokenise -> encode sequences (layer-wise K/V) -> generate queries
                     -> n_layers x (decode, boost) -> MLP head -> logits

The config is hyformer/config.py (InputSchema: what the batches hold; HyFormerConfig: the architecture), the
building blocks (attention, encoders, token mixing, Tokenizer, head) are hyformer/layers.py, and the paper's
baselines, built from the same parts, are hyformer/baselines.py.

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
                                                   config.schema.seq_table(name) (sequences may share)
  Only the U unique rows are embedded and projected; the (B, L_s, Ds) tokens are then gathered on the device, and
  autograd's backward of that gather sums each position's gradient into its unique row.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hyformer.config import HyFormerConfig
from hyformer.layers import (
    CrossAttention,
    PerTokenFFN,
    QueryBoost,
    Tokenizer,
    head_mlp,
    make_seq_encoder,
    masked_mean,
)


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
        groups = list(c.schema.ns_groups)
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
        groups = list(config.schema.ns_groups)
        target = [groups.index(g) for g in config.schema.target_groups] if config.target_attention else []
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
                decoder.cross_attn.attend(decoder.norm_q(t), k, v, mask)
                for decoder, (k, v, mask) in zip(self.decoders, kv)
            )  # (B, G_t, D)
            ns = ns.index_add(1, self.target, delta.to(ns.dtype))  # (B, M, D)
        if self.boost is None:
            return q, ns
        x = self.boost(torch.cat([q, ns], dim=1))  # (B, T, D)
        return x[:, : q.shape[1]], x[:, q.shape[1] :]  # (B, Q, D), (B, M, D)


class RankingModel(nn.Module):
    """What every architecture here shares: a frozen `config`, forward(batch) -> logits (B,), the attention switch
    and config.json + model.pt checkpoints (hyformer.zoo.load_model rebuilds any architecture from one)."""

    arch: str  # the config.arch a subclass builds (hyformer.zoo.build_model picks the class by it)

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        if config.arch != self.arch:
            raise ValueError(
                f"{type(self).__name__} builds arch {self.arch!r}, not {config.arch!r}: use hyformer.zoo.build_model"
            )
        self.config = config

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

    TwoStage (Table 1's BaseArch, hyformer/baselines.py) is this class without boosting inside the layers and with
    an interaction stack after them.
    """

    arch = "hyformer"
    query_boosting = True  # Query Boosting inside every layer (TwoStage, hyformer/baselines.py: False)

    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__(config)
        c = config
        self.tokenizer = Tokenizer(c)
        self.query_gen = QueryGenerator(c)
        self.layers = nn.ModuleList(HyFormerLayer(c, boost=self.query_boosting) for _ in range(c.n_layers))
        self.norm_out = nn.LayerNorm(c.d_model)
        self.head = head_mlp(c)

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
        x = self.interact(torch.cat([q, ns], dim=1))  # (B, T, D)
        return self.head(self.norm_out(x).flatten(1)).squeeze(-1)  # (B,)

    def interact(self, x: Tensor) -> Tensor:
        """Feature interaction after the last layer: none in HyFormer (Query Boosting did it inside every layer);
        TwoStage's RankMixer / Transformer / Wukong stack."""
        return x  # (B, T, D)

    def score(self, batch: Mapping[str, Tensor], memory: SequenceMemory) -> Tensor:
        """KV reuse: logits of B = R*m candidates (the ns_* keys of `batch`, request-major) given the memory of
        their R requests; equal to forward on the same rows with each request's sequences repeated m times."""
        return self.decode(self.tokenizer.ns_tokens(batch), memory) + self.tokenizer.first_order(batch)  # (B,)

"""Every architecture of hyformer.zoo (the paper's Tables 1 and 2) on tiny(): shapes, masks, gradients, checkpoints,
attention kernels, seeded golden values; then the parts the baselines and ablations are made of (query options,
merged sequences, two-stage information flow, unified blocks, DIN's target attention, Wukong, the sequence width) and
KV reuse."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from hyformer import ARCHITECTURES, HyFormer, HyFormerConfig, build_model, load_model
from hyformer.baselines import DIN, TwoStage, Unified, WukongLayer
from hyformer.layers import merge_sequences
from hyformer.model import QueryGenerator
from hyformer.testing import make_batch
from hyformer.zoo import architecture

CFG = HyFormerConfig.tiny()
NAMES = list(ARCHITECTURES)


def arch_cfg(name: str, **overrides) -> HyFormerConfig:
    return ARCHITECTURES[name].config(CFG).replace(**overrides)


def build(config: HyFormerConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config).eval()


def mixed_lens(config: HyFormerConfig, n: int) -> dict[str, list[int]]:
    """Rows with 0, 1, L and L/2 events (repeating), per sequence."""
    return {s: ([0, 1, L, L // 2] * n)[:n] for s, L in config.schema.sequences.items()}


def loss_grads(model, batch) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    F.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------------------------
# Every architecture
# ---------------------------------------------------------------------------------------------------------------------


def test_the_zoo_has_every_row_of_tables_1_and_2() -> None:
    assert sum(a.table == "1" for a in ARCHITECTURES.values()) == 9  # 6 BaseArch + 2 UniArch + HyFormer
    assert sum(a.table == "2" for a in ARCHITECTURES.values()) == 4  # + HyFormer and BaseArch rows of Table 1
    assert all(a.paper for a in ARCHITECTURES.values() if a.table)
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        architecture("nope")


@pytest.mark.parametrize("name", NAMES)
def test_shapes_finite_and_every_parameter_gets_a_gradient(name: str) -> None:
    """No unused parameters (DDP needs none), finite logits for empty, short and full sequences."""
    config = arch_cfg(name)
    model = build(config).train()
    batch = make_batch(config, 8, lens=mixed_lens(config, 8))
    logits, grads = loss_grads(model, batch)
    assert logits.shape == (8,) and torch.isfinite(logits).all()
    for n, _p in model.named_parameters():
        assert n in grads and torch.isfinite(grads[n]).all(), f"{name}: {n} has no finite gradient"
        if config.hide_sequences:  # the no-sequence ablation: the sequence side gets zero gradients (DDP accepts them)
            if n.startswith(("tokenizer.seq_proj", "tokenizer.seq_pos")):
                assert grads[n].abs().sum() == 0, f"{name}: {n} learns from sequences it should not see"
            if not n.startswith(("head", "query_gen", "tokenizer.ns_proj")):
                continue
        assert grads[n].abs().sum() > 0, f"{name}: {n} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_padding_is_masked_and_rows_are_independent(name: str) -> None:
    config = arch_cfg(name)
    model = build(config)
    batch = make_batch(config, 4, lens=mixed_lens(config, 4))
    noisy = dict(batch)
    for s, L in config.schema.sequences.items():  # junk ids at padded positions
        pad = torch.arange(L)[None, :] >= batch[f"len_{s}"][:, None]  # (B, L)
        noisy[f"seq_{s}"] = torch.where(pad[..., None], torch.full_like(batch[f"seq_{s}"], 3), batch[f"seq_{s}"])
    torch.testing.assert_close(model(noisy), model(batch), rtol=0, atol=1e-5)
    changed = dict(batch, seq_long=batch["seq_long"].clone())
    changed["seq_long"][2, 0] = torch.tensor([7, 8, 2])  # the most recent event of row 2 (which has L events)
    before, after = model(batch), model(changed)
    if config.hide_sequences:
        torch.testing.assert_close(before, after, rtol=0, atol=0)  # the no-sequence ablation sees no event at all
        return
    assert (before[2] - after[2]).abs() > 1e-6, "the long sequence must reach the logit"
    torch.testing.assert_close(before[[0, 1, 3]], after[[0, 1, 3]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_rebuilds_the_architecture(name: str, tmp_path) -> None:
    model = build(arch_cfg(name))
    model.save(tmp_path)
    loaded = load_model(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    batch = make_batch(model.config, 5)
    torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["mixed", "empty", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_reference_and_sdpa_agree_on_outputs_and_gradients(name: str, case: str) -> None:
    config = arch_cfg(name, attn_impl="reference")
    ref = build(config).train()
    fast = copy.deepcopy(ref).set_attn_impl("sdpa")
    assert fast.config.attn_impl == "sdpa"
    lens = {
        "mixed": mixed_lens(config, 6),
        "empty": {s: 0 for s in config.schema.sequences},
        "full": dict(config.schema.sequences),
    }[case]
    batch = make_batch(config, 6, lens=lens)
    out_ref, g_ref = loss_grads(ref, batch)
    out_fast, g_fast = loss_grads(fast, batch)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    assert g_fast.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_stays_close_to_float32(name: str) -> None:
    """The mixed-precision path (bf16 autocast, as on GPU) runs on CPU too and stays near the fp32 logits."""
    config = arch_cfg(name, attn_impl="sdpa")
    model = build(config)
    batch = make_batch(config, 6, lens=mixed_lens(config, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), model(batch), rtol=0, atol=0.1)


# Seeded golden values (tiny(), seed 0, rows with 0, 1, L and L/2 events): update only for an intended change of an
# architecture's function or initialisation (print them with the loop in this test's docstring).
# "hyformer" and "hyformer-swiglu-seqs" equal test_model's GOLDEN for "transformer" and "swiglu" (tiny's default
# encoder is the Full Transformer); LONGER rows equal their Full Transformer rows on the rows with 0 and 1 events.
GOLDEN = {
    "hyformer": [0.07834665, -0.03747410, -0.08146751, -0.08827488],
    "longer-rankmixer": [0.02661934, 0.20382062, 0.15419412, 0.16792627],
    "longer-transformer": [-0.42382619, -0.22373801, -0.27246815, -0.26785874],
    "longer-wukong": [-0.09982768, -0.04362996, -0.08643471, -0.08675659],
    "transformer-rankmixer": [0.02661934, 0.20382062, 0.15512545, 0.16714919],
    "transformer-transformer": [-0.42382619, -0.22373801, -0.27513537, -0.26788053],
    "transformer-wukong": [-0.09982768, -0.04362996, -0.07833113, -0.08715922],
    "mtgr-longer": [0.13777408, -0.04764715, -0.09856263, -0.09799237],
    "mtgr-transformer": [-0.09622388, -0.02291532, -0.00772689, -0.05092750],
    "hyformer-no-seq-pool": [0.00691073, -0.04341565, -0.05737338, -0.05843739],
    "hyformer-target-query": [0.01208758, -0.04526284, -0.03810281, -0.01538300],
    "basearch-global-tokens": [0.16663063, -0.04531132, -0.02433914, -0.00038514],
    "hyformer-merge-seq": [0.03248627, 0.05086706, 0.06807937, 0.05245314],
    "hyformer-no-seq": [0.07834665, 0.08293055, 0.07178573, 0.05947261],
    "hyformer-transformer-seqs": [0.07834665, -0.03747410, -0.08146751, -0.08827488],
    "hyformer-swiglu-seqs": [-0.02294914, 0.03848676, 0.04958330, 0.04513856],
    "din": [0.02769054, 0.14800447, 0.15835582, 0.14997220],
    "hyformer-pool-all": [0.05988395, -0.23568761, -0.23734495, -0.22811633],
    "hyformer-full-kv": [0.07834665, -0.03747410, -0.08146751, -0.08827488],
    "hyformer-target-attn": [0.07834665, -0.03619776, -0.09020961, -0.07926740],
}


@pytest.mark.parametrize("name", NAMES)
def test_golden_logits(name: str) -> None:
    """To print them: for n in NAMES: c = arch_cfg(n); print(n, build(c)(make_batch(c, 4, lens=mixed_lens(c, 4))))"""
    config = arch_cfg(name)
    logits = build(config, seed=0)(make_batch(config, 4, lens=mixed_lens(config, 4), seed=0))
    torch.testing.assert_close(logits, torch.tensor(GOLDEN[name]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Query generation options (§3.3.2, Table 2)
# ---------------------------------------------------------------------------------------------------------------------


def queries(config: HyFormerConfig, batch: dict[str, Tensor], seed: int = 0) -> Tensor:
    """The first layer's queries (B, Q, D) of a seeded model."""
    model = build(config, seed)
    memory = model.encode_sequences(batch)
    return model.query_gen(model.tokenizer.ns_tokens(batch), memory.pooled)


def with_new_ids(batch: dict[str, Tensor], key: str) -> dict[str, Tensor]:
    return dict(batch, **{key: torch.where(batch[key] > 0, 1 + (batch[key] % 3), 2)})


@pytest.mark.parametrize(
    "source, changes, moves_queries",
    [
        ("global", "ns_user", True),
        ("global", "seq_feed", True),
        ("ns", "ns_user", True),
        ("ns", "seq_feed", False),  # no sequence pooling
        ("target", "ns_user", False),
        ("target", "seq_feed", False),
        ("target", "ns_item", True),  # candidate only
    ],
)
def test_query_sources_read_exactly_their_inputs(source: str, changes: str, moves_queries: bool) -> None:
    config = dataclasses.replace(CFG, query_source=source)
    batch = make_batch(config, 4, lens={s: L for s, L in config.schema.sequences.items()})
    moved = (queries(config, batch) - queries(config, with_new_ids(batch, changes))).abs().amax()
    assert (moved > 1e-6) == moves_queries, (source, changes, float(moved))


@pytest.mark.parametrize("pool_all", [False, True])
def test_pool_all_lets_each_sequences_queries_see_every_sequence(pool_all: bool) -> None:
    """query_pool_all: the long sequence's first queries depend on the search events (only through the pools)."""
    config = dataclasses.replace(CFG, query_pool_all=pool_all)
    batch = make_batch(config, 4, lens={"search": 8})
    moved = with_new_ids(batch, "seq_search")
    q, q_moved = queries(config, batch), queries(config, moved)
    long_queries = slice(0, config.queries_of("long"))
    assert torch.equal(q[:, long_queries], q_moved[:, long_queries]) != pool_all
    assert not torch.equal(q[:, config.queries_of("long") :], q_moved[:, config.queries_of("long") :])


def test_full_kv_lets_longer_queries_decode_events_older_than_l_h() -> None:
    """A LONGER layer keeps the L_H most recent states; with longer_full_kv the first layer's queries decode those
    followed by the older input events (keys: all L of them), later layers the L_H states; KV reuse still holds."""
    config = dataclasses.replace(CFG, seq_encoder="longer", longer_full_kv=True)  # L_H = 4 < 16 events
    batch = make_batch(config, 4, lens={"long": 16})
    for full_kv in (False, True):
        model = build(dataclasses.replace(config, longer_full_kv=full_kv))
        memory = model.encode_sequences(batch)
        k_first, _, mask_first = memory.kv[0][0]  # layer 0, long sequence
        k_second, _, _ = memory.kv[1][0]
        assert k_first.shape[2] == (16 if full_kv else 4) and k_second.shape[2] == 4
        assert mask_first.sum(dim=1).tolist() == ([16] * 4 if full_kv else [4] * 4)
        torch.testing.assert_close(model.score(batch, memory), model(batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["hyformer", "two_stage"])
def test_target_attention_lets_the_candidate_decode_every_sequence(arch: str) -> None:
    """target_attention adds no parameters: the candidate's tokens are one more query of each decoder, so with every
    sequence empty the model equals the plain one, with events it differs, and KV reuse still holds."""
    plain_cfg = dataclasses.replace(CFG, arch=arch, query_source="target")  # queries see the candidate, not the pools
    config = dataclasses.replace(plain_cfg, target_attention=True)
    model, plain = build(config), build(plain_cfg)
    assert [p.shape for p in model.parameters()] == [p.shape for p in plain.parameters()]
    empty = make_batch(config, 4, lens={s: 0 for s in config.schema.sequences})
    torch.testing.assert_close(model(empty), plain(empty), rtol=0, atol=0)
    full = make_batch(config, 4, lens={s: L for s, L in config.schema.sequences.items()})
    assert (model(full) - plain(full)).abs().amax() > 1e-4
    torch.testing.assert_close(model.score(full, model.encode_sequences(full)), model(full), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="target_attention=True needs target_groups"):
        CFG.replace(target_attention=True, target_groups=())


@pytest.mark.parametrize("name", ["hyformer", "longer-rankmixer", "mtgr-longer", "din"])
def test_id_bias_adds_each_ids_own_scalar_to_the_logit(name: str) -> None:
    """id_bias: the first-order term starts at exactly zero and adds, per row, the scalars of its NS ids."""
    config = arch_cfg(name, id_bias=True)
    model = build(config)
    batch = make_batch(config, 6)
    plain = build(arch_cfg(name))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".id_bias." not in k})
    torch.testing.assert_close(model(batch), plain(batch), rtol=0, atol=0)  # zero at the start
    item = int(batch["ns_item"][0, 0])
    with torch.no_grad():
        model.tokenizer.id_bias["item"].weight[item] = 0.5
    has_item = (batch["ns_item"][:, 0] == item) | (batch["ns_cross"][:, 1] == item)  # the item space is in both groups
    shift = model(batch) - plain(batch)
    expected = 0.5 * ((batch["ns_item"][:, 0] == item).float() + (batch["ns_cross"][:, 1] == item).float())
    torch.testing.assert_close(shift, expected, rtol=0, atol=1e-6)
    assert has_item[0]
    if hasattr(model, "score"):  # KV reuse keeps the term
        torch.testing.assert_close(model.score(batch, model.encode_sequences(batch)), model(batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["hyformer", "din"])
def test_id_dropout_blanks_ns_ids_in_training_only(name: str) -> None:
    """id_dropout: eval scores are those of the same weights without it; in training, each NS id is replaced by
    the missing id 0 with probability p, exactly as if the batch had carried 0 there."""
    config = arch_cfg(name, id_dropout=0.5)
    model, plain = build(config), build(arch_cfg(name))
    plain.load_state_dict(model.state_dict())
    batch = make_batch(config, 64)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(batch), plain(batch), rtol=0, atol=0)
    ns = {k: v for k, v in batch.items() if k.startswith("ns_")}
    kept = model.tokenizer.train().drop_ids(ns["ns_item"])
    assert model.tokenizer.eval().drop_ids(ns["ns_item"]) is ns["ns_item"]
    dropped = (kept == 0) & (ns["ns_item"] != 0)
    assert ((kept == ns["ns_item"]) | dropped).all() and 0.3 < dropped.float().mean() < 0.7
    model.train()
    torch.manual_seed(7)
    out = model(batch)
    torch.manual_seed(7)  # the same draws, applied by hand to the batch of the plain model
    blanked = dict(batch, **{f"ns_{g}": model.tokenizer.drop_ids(ns[f"ns_{g}"]) for g in config.schema.ns_groups})
    model.eval()
    torch.testing.assert_close(out, plain(blanked), rtol=0, atol=1e-6)
    assert (out - model(batch)).abs().amax() > 1e-4


@pytest.mark.parametrize("name", ["hyformer", "longer-rankmixer", "mtgr-longer", "din"])
def test_dense_init_normal_draws_every_linear_from_n_0_002(name: str) -> None:
    """dense_init="normal": build_model draws every Linear / per-token FFN weight from N(0, 0.02²), biases 0; the
    embedding tables keep their own init; "default" leaves PyTorch's (uniform, nonzero biases)."""
    from hyformer.layers import PerTokenFFN

    model = build_model(arch_cfg(name, dense_init="normal"))
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights += [w for m in model.modules() if isinstance(m, PerTokenFFN) for w in (m.w1, m.w2)]
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert weights and all(float(b.abs().max()) == 0.0 for b in biases)
    flat = torch.cat([w.detach().flatten() for w in weights])
    assert abs(float(flat.std()) - 0.02) < 0.002 and abs(float(flat.mean())) < 0.002
    emb = torch.cat([t.weight.detach()[1:].flatten() for t in model.tokenizer.tables.values()])
    assert abs(float(emb.std()) - 0.02) < 0.002  # the embedding init (0.02 too, drawn by init_embedding)
    default = build_model(arch_cfg(name))
    assert any(
        float(m.bias.abs().max()) > 0
        for m in default.modules()
        if isinstance(m, torch.nn.Linear) and m.bias is not None
    )
    assert model(make_batch(model.config, 4)).shape == (4,)
    with pytest.raises(ValueError, match="dense_init"):
        arch_cfg(name, dense_init="xavier")


def test_feature_selection_and_compression() -> None:
    config = dataclasses.replace(CFG, query_groups=("query", "item"))
    batch = make_batch(config, 4)
    torch.testing.assert_close(queries(config, batch), queries(config, with_new_ids(batch, "ns_user")))
    assert (queries(config, batch) - queries(config, with_new_ids(batch, "ns_query"))).abs().amax() > 1e-6
    D, Ds, Q = CFG.d_model, CFG.seq_width, CFG.n_tokens - CFG.n_ns
    d_info = 2 * D + Ds  # two selected NS tokens + the sequence pool
    sizes = {
        c: sum(p.numel() for p in QueryGenerator(dataclasses.replace(config, query_compress=c)).parameters())
        for c in (0, 8)
    }
    ffn = lambda d_in: Q * (d_in * D + D + D * D + D)  # noqa: E731 (PerTokenFFN d_in -> D -> D per query)
    assert sizes == {0: ffn(d_info), 8: d_info * 8 + 8 + ffn(8)}


def test_queries_per_sequence_are_allocated_by_name() -> None:
    config = dataclasses.replace(CFG, n_queries={"long": 3, "search": 1, "feed": 1}, d_model=40)  # T = 5 + 5
    assert config.n_tokens == 10 and [p[2] for p in config.seq_plan] == [3, 1, 1]
    model = build(config)
    batch = make_batch(config, 4, lens={s: L for s, L in config.schema.sequences.items()})
    q = model.query_gen(model.tokenizer.ns_tokens(batch), model.encode_sequences(batch).pooled)
    assert q.shape == (4, 5, 40)
    assert model.layers[0].n_queries == [3, 1, 1] and model(batch).shape == (4,)
    # the long sequence's 3 queries share its Global Info but have their own FFNs
    assert (q[:, 0] - q[:, 1]).abs().amax() > 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Merged sequences, two-stage information flow, unified blocks, Wukong, sequence width
# ---------------------------------------------------------------------------------------------------------------------


def test_merge_sequences_orders_events_by_age_then_recency_rank() -> None:
    h1 = torch.tensor([[[1.0], [2.0], [0.0]]])  # (1, 3, 1): 2 valid events
    h2 = torch.tensor([[[3.0], [0.0]]])  # 1 valid event
    m1, m2 = torch.tensor([[True, True, False]]), torch.tensor([[True, False]])
    # without ages: interleaved by recency rank (each sequence's most recent first), ties in sequence order
    h, mask = merge_sequences([(h1, m1), (h2, m2)])
    assert h.squeeze(-1).tolist() == [[1.0, 3.0, 2.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True, False, False]]
    # with age buckets (smaller = more recent): the merged stream is most recent first across sequences
    h, mask = merge_sequences([(h1, m1), (h2, m2)], [torch.tensor([[5, 1, 0]]), torch.tensor([[3, 0]])])
    assert h.squeeze(-1).tolist() == [[2.0, 3.0, 1.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True, False, False]]


def test_merged_sequence_puts_the_most_recent_events_of_any_sequence_first() -> None:
    """With the "dt" side info (age bucket), the merged stream starts with the youngest events whatever sequence
    holds them, so LONGER's L_H recent-event queries are not all long-sequence events."""
    config = arch_cfg(
        "hyformer-merge-seq",
        seq_fields=("item", "author", "action", "dt"),
        id_spaces={**CFG.schema.id_spaces, "dt": 24},
    )
    model = build(config)
    batch = make_batch(config, 3, lens={"long": 16, "search": 3, "feed": 2})
    age = {"long": 20, "search": 1, "feed": 5}  # search youngest, then feed, long oldest
    for s in config.schema.sequences:
        batch[f"seq_{s}"][..., 3] = torch.where(batch[f"seq_{s}"][..., 0] > 0, age[s], 0)
    ((merged, mask),) = model.tokenizer.seq_tokens(batch)
    model.tokenizer.merge = False
    apart = dict(zip([s for s in config.schema.sequences], model.tokenizer.seq_tokens(batch)))
    expected = torch.cat([apart["search"][0][:, :3], apart["feed"][0][:, :2], apart["long"][0][:, :16]], dim=1)
    torch.testing.assert_close(merged[:, :21], expected, rtol=0, atol=0)
    assert mask[:, :21].all() and not mask[:, 21:].any()


def test_merged_model_decodes_one_sequence_with_all_queries() -> None:
    config = arch_cfg("hyformer-merge-seq")
    assert config.seq_plan == (("merged", 32, 3, "transformer"),) and config.n_tokens == CFG.n_tokens
    model = build(config)
    assert len(model.layers[0].decoders) == 1 and len(build(CFG).layers[0].decoders) == 3


def first_layer_queries_of_long(model: HyFormer, batch: dict[str, Tensor]) -> Tensor:
    """Queries of the long sequence after every layer but before any interaction block: (B, N, D)."""
    ns = model.tokenizer.ns_tokens(batch)
    memory = model.encode_sequences(batch)
    q = model.query_gen(ns, memory.pooled)
    for layer, kv in zip(model.layers, memory.kv):
        q, ns = layer(q, ns, kv)
    return q[:, : model.config.queries_of("long")]


@pytest.mark.parametrize("arch, isolated", [("longer-rankmixer", True), ("hyformer-target-query", False)])
def test_two_stage_keeps_each_sequence_apart_until_the_interaction(arch: str, isolated: bool) -> None:
    """The paper's point (§4.2.1): in BaseArch a sequence's queries never see the other sequences or the NS tokens
    before the interaction stage; in HyFormer, Query Boosting mixes them in every layer (same target-only query)."""
    config = arch_cfg(arch)
    model = build(config)
    batch = make_batch(config, 4, lens={s: L for s, L in config.schema.sequences.items()})
    changed = with_new_ids(batch, "seq_feed")
    moved = (first_layer_queries_of_long(model, batch) - first_layer_queries_of_long(model, changed)).abs().amax()
    assert (moved < 1e-6) == isolated
    assert (model(batch) - model(changed)).abs().amax() > 1e-6  # the feed sequence still reaches the logit


@pytest.mark.parametrize("encoder, updates_sequence", [("longer", False), ("transformer", True)])
def test_unified_blocks_cross_attend_or_self_attend(encoder: str, updates_sequence: bool) -> None:
    config = arch_cfg(f"mtgr-{encoder}")
    model = build(config)
    assert isinstance(model, Unified) and config.n_tokens == CFG.n_ns
    batch = make_batch(config, 3, lens={s: L for s, L in config.schema.sequences.items()})
    x = model.tokenizer.ns_tokens(batch)
    h, mask = merge_sequences(model.tokenizer.seq_tokens(batch))
    _, h1 = model.blocks[0](x, h, mask)
    assert (not torch.equal(h1, h)) == updates_sequence  # "w/ LONGER": no attention inside the sequence
    _, h1_other_ns = model.blocks[0](x + 1.0, h, mask)
    assert (not torch.allclose(h1, h1_other_ns)) == updates_sequence  # sequence tokens attend to NS tokens


def din_parts(model: DIN, batch: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
    """DIN's pooled interest tokens (B, S, D) and each sequence's attention weights [(B, L_s)]."""
    x = model.tokenizer.ns_tokens(batch)
    seqs = model.tokenizer.seq_tokens(batch)
    weights = [unit.weights(model.target(x), h, mask) for unit, (h, mask) in zip(model.units, seqs)]
    return model.interests(x, seqs), weights


@pytest.mark.parametrize("merge", [False, True])
def test_din_has_one_pooled_token_per_sequence(merge: bool) -> None:
    config = arch_cfg("din", merge_sequences=merge)
    model = build(config)
    assert isinstance(model, DIN) and config.n_tokens == CFG.n_ns + (1 if merge else 3)
    assert len(model.units) == len(config.seq_plan) and model.head[0].in_features == config.n_tokens * CFG.d_model
    batch = make_batch(config, 6, lens=mixed_lens(config, 6))
    logits = model(batch)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    pooled, weights = din_parts(model, batch)
    assert pooled.shape == (6, len(config.seq_plan), CFG.d_model)
    for w, (_, mask) in zip(weights, model.tokenizer.seq_tokens(batch)):
        assert w.shape == mask.shape and (w[~mask] == 0).all()  # padded events: weight exactly 0


def test_din_empty_sequence_pools_to_exactly_zero_whatever_its_padding_holds() -> None:
    config = arch_cfg("din")
    model = build(config)
    batch = make_batch(config, 4, lens={"long": [0, 1, 16, 8], "search": 0, "feed": [8, 0, 3, 8]})
    junk = dict(batch, seq_search=torch.randint(1, 5, batch["seq_search"].shape))  # events behind len_search = 0
    pooled, _ = din_parts(model, batch)
    assert (pooled[:, 1] == 0).all() and (pooled[0, 0] == 0).all() and (pooled[1, 2] == 0).all()
    assert (pooled[2:, 0].abs().amax(dim=-1) > 0).all()  # non-empty sequences do contribute
    torch.testing.assert_close(model(junk), model(batch), rtol=0, atol=0)


def test_din_attention_weights_follow_the_candidate() -> None:
    """The candidate's NS tokens (target_groups) are the query: another candidate item on the same sequences moves
    the weights and the pooled tokens; other NS groups do not reach them (they only meet them in the head)."""
    config = arch_cfg("din")
    model = build(config)
    batch = make_batch(config, 4, lens={s: L for s, L in config.schema.sequences.items()})
    pooled, weights = din_parts(model, batch)
    swapped = dict(batch, ns_item=batch["ns_item"].roll(1, dims=0))  # each row scores another row's candidate
    pooled_sw, weights_sw = din_parts(model, swapped)
    for w, w_sw in zip(weights, weights_sw):
        assert ((w - w_sw).abs().amax(dim=1) > 1e-6).all()
    assert ((pooled - pooled_sw).abs().amax(dim=(1, 2)) > 1e-6).all()
    other_user, _ = din_parts(model, with_new_ids(batch, "ns_user"))
    torch.testing.assert_close(other_user, pooled, rtol=0, atol=0)
    assert (model(batch) - model(with_new_ids(batch, "ns_user"))).abs().amax() > 1e-6  # the head still reads it


def test_din_needs_the_candidates_groups() -> None:
    with pytest.raises(ValueError, match=r"DIN needs target_groups.*got target_groups=\(\)"):
        build_model(arch_cfg("din", target_groups=()))


def test_wukong_factorization_machine_matches_the_explicit_dot_product_matrix() -> None:
    torch.manual_seed(0)
    layer = WukongLayer(n_tokens=6, d_model=8, ffn_mult=2, dropout=0.0)
    x = torch.randn(2, 6, 8)
    explicit = (x @ x.transpose(1, 2)) @ layer.y  # (B, T, T) @ (T, k)
    fm = layer.fm_mlp(layer.fm_norm(explicit.flatten(1))).view(2, layer.n_fm, 8)
    lc = torch.einsum("ot,btd->bod", layer.lcb.weight, x)
    torch.testing.assert_close(layer(x), layer.norm(x + torch.cat([fm, lc], dim=1)))


def test_sequence_width_is_independent_of_the_model_width() -> None:
    narrow = dataclasses.replace(CFG, d_seq=16)
    model = build(narrow)
    assert model.tokenizer.seq_proj["long"].out_features == 16
    assert model.layers[0].decoders[0].encoder.attn.q_proj.in_features == 16
    assert model.layers[0].decoders[0].cross_attn.q_proj.in_features == CFG.d_model
    batch = make_batch(narrow, 4)
    assert model(batch).shape == (4,)
    # d_seq = d_model builds the same model as the default (0 = d_model), parameter for parameter
    same, default = build(dataclasses.replace(CFG, d_seq=CFG.d_model)), build(CFG)
    torch.testing.assert_close(same(batch), default(batch), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# KV reuse across candidates
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("name", ["hyformer", "longer-rankmixer", "hyformer-merge-seq", "hyformer-target-query"])
def test_kv_reuse_scores_equal_per_candidate_scoring(name: str, impl: str) -> None:
    """R = 3 requests x m = 5 candidates: encoding each request's sequences once gives the logits of scoring every
    candidate with its own copy of the sequences."""
    config = arch_cfg(name, attn_impl=impl, seq_encoder={"long": "longer", "search": "transformer", "feed": "swiglu"})
    model = build(config)
    R, m = 3, 5
    requests = make_batch(config, R, lens={s: [0, 1, L] for s, L in config.schema.sequences.items()}, seed=1)
    candidates = make_batch(config, R * m, seed=2)  # its ns_* keys: one candidate per row, request-major
    repeated = {k: v.repeat_interleave(m, dim=0) for k, v in requests.items() if k.startswith(("seq_", "len_"))}
    per_candidate = model({**candidates, **repeated})
    reused = model.score(candidates, model.encode_sequences(requests))
    torch.testing.assert_close(reused, per_candidate, rtol=1e-5, atol=1e-5)
    assert (per_candidate[:m] - per_candidate[m : 2 * m]).abs().amax() > 1e-6  # requests differ


# ---------------------------------------------------------------------------------------------------------------------
# Config errors for the new fields
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(arch="dlrm"), "arch='dlrm' must be one of"),
        (dict(arch="two_stage", interaction="dcn"), "interaction='dcn'"),
        (dict(query_source="all"), "query_source='all'"),
        (dict(query_source="target", target_groups=()), "needs target_groups"),
        (dict(query_groups=("user", "nope")), "query_groups"),
        (dict(target_groups=("item", "item")), "target_groups"),
        (dict(n_queries={"long": 2}), r"n_queries must name each sequence .* missing \['search', 'feed'\]"),
        (dict(n_queries={"long": 0, "search": 1, "feed": 1}), "n_queries 0"),
        (dict(n_queries={"long": 2, "search": 1, "feed": 1}), "divisible by T"),  # T = 4 + 5 = 9
        (dict(d_seq=15), "seq_width=15 must be divisible by n_heads"),
        (dict(query_compress=-1), "query_compress"),
        (dict(arch="unified", seq_encoder="swiglu"), 'arch="unified" takes seq_encoder'),
    ],
)
def test_invalid_architecture_configs_raise(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CFG.replace(**overrides)


def test_models_refuse_the_wrong_arch() -> None:
    with pytest.raises(
        ValueError, match="HyFormer builds arch 'hyformer', not 'unified': use hyformer.zoo.build_model"
    ):
        HyFormer(arch_cfg("mtgr-longer"))
    for cls in (TwoStage, Unified, DIN):
        with pytest.raises(ValueError, match=f"{cls.__name__} builds arch .* use hyformer.zoo.build_model"):
            cls(CFG)


# ---------------------------------------------------------------------------------------------------------------------
# Deduplicated ID tables (§3.8.1): unique rows looked up on the device, then gathered
# ---------------------------------------------------------------------------------------------------------------------


def dedup(batch: dict[str, Tensor], config: HyFormerConfig, tables: dict[str, str]) -> dict[str, Tensor]:
    """seq_<s> -> uniq_<table> (row 0 = padding) + inv_<s>, by hand: the contract the data pipeline produces."""
    out = {k: v for k, v in batch.items() if not k.startswith("seq_")}
    for table in set(tables.values()):
        members = [s for s in config.schema.sequences if tables[s] == table]
        events = torch.cat([batch[f"seq_{s}"].flatten(0, 1) for s in members])  # (sum B*L, F)
        uniq, inv = torch.unique(torch.cat([torch.zeros_like(events[:1]), events]), dim=0, return_inverse=True)
        assert (uniq[0] == 0).all()  # the all-zero padding event sorts first
        out[f"uniq_{table}"], start = uniq, 1
        for s in members:
            n = batch[f"seq_{s}"].shape[0] * batch[f"seq_{s}"].shape[1]
            out[f"inv_{s}"] = inv[start : start + n].view(batch[f"seq_{s}"].shape[:2])
            start += n
    return out


@pytest.mark.parametrize("name", ["hyformer", "mtgr-transformer", "hyformer-merge-seq", "din"])
def test_dedup_tables_give_the_values_and_gradients_of_the_full_sequences(name: str) -> None:
    tables = {"long": "search", "search": "search", "feed": "feed"}
    config = arch_cfg(name, seq_tables=tables)
    model = build(config).train()
    batch = make_batch(config, 6, lens=mixed_lens(config, 6))
    batch["seq_search"][:, :3] = batch["seq_long"][:, :3]  # shared events across sequences, deduplicated once
    packed = dedup(batch, config, tables)
    assert len(packed["uniq_search"]) < 6 * (16 + 8)  # fewer rows than the positions they fill
    out_full, g_full = loss_grads(model, batch)
    out_dedup, g_dedup = loss_grads(model, packed)
    torch.testing.assert_close(out_dedup, out_full, rtol=0, atol=1e-6)
    assert g_dedup.keys() == g_full.keys()
    for n in g_full:  # embedding rows and projections: the same gradients, summed per unique row first
        torch.testing.assert_close(g_dedup[n], g_full[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "name, cls", [("hyformer", HyFormer), ("longer-wukong", TwoStage), ("mtgr-longer", Unified), ("din", DIN)]
)
def test_load_model_rebuilds_the_class_of_the_saved_architecture(tmp_path, name: str, cls: type) -> None:
    build(arch_cfg(name)).save(tmp_path)
    assert type(load_model(tmp_path)) is cls

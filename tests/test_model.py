"""Model tests on HyFormerConfig.tiny(), CPU: shapes and masks, gradients, reference-vs-sdpa equivalence, seeded
golden values, config round trips, each for every §3.4.1 sequence encoder. GPU-only cases are skipped without CUDA;
the torch.compile smoke test runs only with HYFORMER_SLOW=1."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import pytest
import torch
from torch import Tensor

from hyformer import HyFormer, HyFormerConfig, load_model
from hyformer.layers import (
    CrossAttention,
    LongerEncoderLayer,
    PerTokenFFN,
    SwiGLUEncoderLayer,
    TokenMixer,
    TransformerEncoderLayer,
    attention,
)
from hyformer.model import QueryDecoder
from hyformer.testing import make_batch

CFG = HyFormerConfig.tiny()
MAX_LEN = dict(CFG.schema.sequences)
IMPLS = ("reference", "sdpa")
# §3.4.1 encoder settings: one name for every sequence, or one per sequence ("mixed").
MIXED = {"long": "longer", "search": "transformer", "feed": "swiglu"}
ENCODERS = {"transformer": "transformer", "longer": "longer", "swiglu": "swiglu", "mixed": MIXED}


def enc_cfg(encoder: str, **overrides) -> HyFormerConfig:
    """tiny() with the named ENCODERS setting (tiny's L_H = 4 is below every sequence length)."""
    return dataclasses.replace(CFG, seq_encoder=ENCODERS[encoder], **overrides)


def build(config: HyFormerConfig = CFG, seed: int = 0) -> HyFormer:
    torch.manual_seed(seed)
    return HyFormer(config).eval()


def lens_for(case: str, config: HyFormerConfig = CFG, batch_size: int = 6) -> dict[str, list[int]] | None:
    """Named length patterns: every row empty / one event / full, or a per-row mix of all three plus random."""
    if case == "random":
        return None
    out = {}
    for s, L in config.schema.sequences.items():
        if case == "empty":
            out[s] = [0] * batch_size
        elif case == "one":
            out[s] = [1] * batch_size
        elif case == "full":
            out[s] = [L] * batch_size
        elif case == "mixed":
            out[s] = ([0, 1, L, L // 2, 0, L] * batch_size)[:batch_size]
    return out


LEN_CASES = ("random", "empty", "one", "full", "mixed")


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_empty_keys_give_exact_zeros_and_finite_grads(impl: str) -> None:
    q = torch.randn(3, 2, 4, 8, requires_grad=True)  # (B, H, Lq, D/H)
    k = torch.randn(3, 2, 5, 8, requires_grad=True)
    v = torch.randn(3, 2, 5, 8, requires_grad=True)
    key_mask = torch.tensor([[False] * 5, [True, True, False, False, False], [True] * 5])
    out = attention(q, k, v, key_mask, impl)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1:].abs().sum() > 0
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(k.grad[1, :, 2:], torch.zeros_like(k.grad[1, :, 2:]))  # padded keys get no gradient


def test_attention_impls_agree() -> None:
    torch.manual_seed(0)
    key_mask = torch.rand(4, 7) > 0.4
    key_mask[0] = False
    key_mask[1] = True
    results = []
    for impl in IMPLS:
        torch.manual_seed(1)
        q, k, v = (
            torch.randn(4, 2, 3, 8, requires_grad=True),
            *(torch.randn(4, 2, 7, 8, requires_grad=True) for _ in range(2)),
        )
        out = attention(q, k, v, key_mask, impl)
        (out * torch.randn_like(out)).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_attention_reference_matches_explicit_formula() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    key_mask = torch.tensor([[True, False, True]])
    w = torch.softmax((q[0, 0] @ k[0, 0, [0, 2]].T) / 2.0, dim=-1)  # only the valid keys, scale 1/sqrt(4)
    torch.testing.assert_close(attention(q, k, v, key_mask, "reference")[0, 0], w @ v[0, 0, [0, 2]])


def test_token_mixer_hand_example_and_involution() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]
    x = torch.tensor([[a, b]])  # (B=1, T=2, D=4): subspaces of width 2
    mixed = TokenMixer()(x)
    assert mixed.tolist() == [[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0]]]
    y = torch.randn(3, 8, 32)
    assert torch.equal(TokenMixer()(TokenMixer()(y)), y)


def test_per_token_ffn_matches_one_linear_stack_per_token() -> None:
    torch.manual_seed(0)
    ffn = PerTokenFFN(n_tokens=3, d_in=5, hidden=7, d_out=4, dropout=0.0)
    x = torch.randn(2, 3, 5)
    out = ffn(x)
    assert out.shape == (2, 3, 4)
    for t in range(3):
        expected = torch.nn.functional.gelu(x[:, t] @ ffn.w1[t] + ffn.b1[t]) @ ffn.w2[t] + ffn.b2[t]
        torch.testing.assert_close(out[:, t], expected)


@pytest.mark.parametrize("kind", ["transformer", "longer", "swiglu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequence_leaves_queries_unchanged(impl: str, kind: str) -> None:
    torch.manual_seed(0)
    decoder = QueryDecoder(dataclasses.replace(CFG, attn_impl=impl), kind)
    q, h = torch.randn(2, 1, CFG.d_model), torch.randn(2, 5, CFG.d_model)
    out, h_out, mask_out = decoder(q, h, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(out, q)
    assert torch.isfinite(h_out).all() and not mask_out.any()


def layer_input(L: int, lens: list[int], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random sequence states (B, L, D) and the mask of rows with `lens` valid events (padding last)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(len(lens), L, CFG.d_model, generator=g)
    return h, torch.arange(L)[None, :] < torch.tensor(lens)[:, None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_recent", [1, 3, 8, 12])
def test_longer_layer_is_the_transformer_layer_at_the_recent_positions(impl: str, n_recent: int) -> None:
    """LONGER's L_H queries see every valid event, so with equal weights its output is the Full Transformer
    layer's output at positions < L_H; L_H >= L gives the full layer, and the mask is cut to the same positions."""
    config = dataclasses.replace(CFG, attn_impl=impl, longer_queries=n_recent)
    longer = LongerEncoderLayer(config)
    full = TransformerEncoderLayer(CFG.d_model, CFG.n_heads, CFG.ffn_mult, CFG.dropout, impl)
    full.load_state_dict(longer.state_dict())
    h, mask = layer_input(8, [0, 1, 3, 8])
    out, out_mask = longer(h, mask)
    ref, _ = full(h, mask)
    short = min(8, n_recent)  # L'
    assert out.shape == (4, short, CFG.d_model) and out_mask.shape == (4, short)
    assert torch.equal(out_mask, mask[:, :short])
    torch.testing.assert_close(out, ref[:, :short], rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()


def test_longer_layer_reads_old_events_but_keeps_only_recent_ones() -> None:
    torch.manual_seed(0)
    longer = LongerEncoderLayer(CFG)  # L_H = 4
    h, mask = layer_input(8, [8, 8])
    changed = h.clone()
    changed[0, 6] = torch.randn(CFG.d_model)  # an old event of row 0: a key/value only
    out, changed_out = longer(h, mask)[0], longer(changed, mask)[0]
    assert out.shape == (2, 4, CFG.d_model)
    assert ((out[0] - changed_out[0]).abs().sum(-1) > 1e-4).all()  # every recent state of row 0 attends to it
    torch.testing.assert_close(out[1], changed_out[1], rtol=0, atol=1e-6)


def test_longer_layer_attention_cost_is_linear_in_sequence_length() -> None:
    """O(L_H * L) for "longer" vs O(L^2) for the Full Transformer: second differences of the FLOPs in L."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(layer: torch.nn.Module, L: int) -> int:
        h, mask = layer_input(L, [L])
        with FlopCounterMode(display=False) as counter:
            layer(h, mask)
        return counter.get_total_flops()

    longer = LongerEncoderLayer(CFG)
    full = TransformerEncoderLayer(CFG.d_model, CFG.n_heads, CFG.ffn_mult, CFG.dropout, "reference")
    for layer, quadratic in ((longer, False), (full, True)):
        f = [flops(layer, L) for L in (16, 32, 48)]
        assert (f[2] - 2 * f[1] + f[0] > 0) == quadratic


def test_swiglu_layer_matches_its_formula_and_transforms_each_event_alone() -> None:
    torch.manual_seed(0)
    layer = SwiGLUEncoderLayer(CFG.d_model, CFG.ffn_mult, 0.0)
    h, mask = layer_input(5, [0, 2, 5])
    out, out_mask = layer(h, mask)
    x = layer.norm(h)
    expected = h + layer.ffn.down(torch.nn.functional.silu(layer.ffn.gate(x)) * layer.ffn.up(x))
    torch.testing.assert_close(out, expected)
    assert torch.equal(out_mask, mask)
    changed = h.clone()
    changed[1, 3] = torch.randn(CFG.d_model)  # a padded event: only its own state changes
    diff = (layer(changed, mask)[0] - out).abs().sum(-1)  # (B, L)
    assert diff[1, 3] > 1e-3
    diff[1, 3] = 0.0
    assert diff.max() < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Whole model: shapes and masks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LEN_CASES)
def test_logits_shape_and_finite_grads(impl: str, case: str, encoder: str) -> None:
    model = build(enc_cfg(encoder, attn_impl=impl)).train()
    batch = make_batch(CFG, 6, lens=lens_for(case))
    logits = model(batch)
    assert logits.shape == (6,)
    assert torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_padding_ids_do_not_change_output(impl: str, encoder: str) -> None:
    model = build(enc_cfg(encoder, attn_impl=impl))
    batch = make_batch(CFG, 6, lens=lens_for("mixed"))
    noisy = dict(batch)
    g = torch.Generator().manual_seed(1)
    for s, L in CFG.schema.sequences.items():
        pad = torch.arange(L)[None, :] >= batch[f"len_{s}"][:, None]  # (B, L)
        junk = torch.randint(1, 5, batch[f"seq_{s}"].shape, generator=g)  # ids valid in every tiny table
        noisy[f"seq_{s}"] = torch.where(pad[..., None], junk, batch[f"seq_{s}"])
        assert not torch.equal(noisy[f"seq_{s}"], batch[f"seq_{s}"])
    torch.testing.assert_close(model(noisy), model(batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("seq", [s for s in CFG.schema.sequences])
def test_valid_events_change_only_their_row(seq: str, encoder: str) -> None:
    model = build(enc_cfg(encoder))
    batch = make_batch(CFG, 4, lens={s: 3 for s in CFG.schema.sequences})
    changed = dict(batch)
    changed[f"seq_{seq}"] = batch[f"seq_{seq}"].clone()
    changed[f"seq_{seq}"][0, 2] = torch.tensor([7, 8, 2])  # last valid event of row 0
    before, after = model(batch), model(changed)
    assert (before[0] - after[0]).abs() > 1e-6
    torch.testing.assert_close(before[1:], after[1:], rtol=0, atol=1e-6)


def test_ns_features_matter_and_extra_keys_are_ignored() -> None:
    model = build()
    batch = make_batch(CFG, 4)
    changed = dict(batch, ns_query=(batch["ns_query"] + 1) % dict(CFG.schema.id_spaces)["query"], extra=torch.ones(3))
    assert (model(batch) - model(changed)).abs().min() > 1e-6
    no_label = {k: v for k, v in batch.items() if k != "label"}
    torch.testing.assert_close(model(no_label), model(batch), rtol=0, atol=0)


def test_several_queries_per_sequence() -> None:
    config = CFG.tiny(
        ns_groups=dict(list(CFG.schema.ns_groups.items())[:2]), n_queries=2, target_groups=()
    )  # T = 2*3 + 2 = 8
    model = build(config)
    for case in LEN_CASES:
        logits = model(make_batch(config, 5, lens=lens_for(case, config, 5)))
        assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_wrong_number_of_id_columns_is_a_clear_error() -> None:
    batch = make_batch(CFG, 2)
    batch["ns_item"] = batch["ns_item"][:, :1]
    with pytest.raises(ValueError, match="id columns"):
        build()(batch)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_parameter_gets_a_gradient(encoder: str) -> None:
    """No unused parameters (DDP needs none): every encoder layer's output is decoded in its own layer."""
    model = build(enc_cfg(encoder)).train()
    batch = make_batch(CFG, 8, lens=lens_for("mixed", batch_size=8))
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    for name, table in model.tokenizer.tables.items():
        assert torch.equal(table.weight.grad[0], torch.zeros_like(table.weight.grad[0])), f"padding row of {name}"


def test_longer_with_every_position_a_query_is_the_full_transformer() -> None:
    """L_H >= every L_s: the "longer" model is the "transformer" model (same parameters, same function)."""
    full = build(enc_cfg("transformer"))
    longer = build(enc_cfg("longer", longer_queries=max(MAX_LEN.values())))
    longer.load_state_dict(full.state_dict())
    batch = make_batch(CFG, 6, lens=lens_for("mixed"))
    torch.testing.assert_close(longer(batch), full(batch), rtol=0, atol=1e-6)
    short = build(enc_cfg("longer"))  # L_H = 4: the sequences are cut, a different function
    short.load_state_dict(full.state_dict())
    assert (short(batch) - full(batch)).abs().max() > 1e-4


def test_model_can_overfit_a_small_batch() -> None:
    model = build().train()
    batch = make_batch(CFG, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Reference vs fast path
# ---------------------------------------------------------------------------------------------------------------------


def forward_backward(model: HyFormer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad()
    logits = model(batch)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("case", LEN_CASES)
def test_reference_and_sdpa_agree_on_outputs_and_gradients(case: str, encoder: str) -> None:
    ref = build(enc_cfg(encoder)).train()  # dropout is 0 in tiny(); train mode checks nothing depends on eval
    fast = copy.deepcopy(ref).set_attn_impl("sdpa")
    assert fast.config.attn_impl == "sdpa" and ref.config.attn_impl == "reference"
    assert all(m.attn_impl == "sdpa" for m in fast.modules() if isinstance(m, CrossAttention))
    batch = make_batch(CFG, 6, lens=lens_for(case))
    out_ref, grads_ref = forward_backward(ref, batch)
    out_fast, grads_fast = forward_backward(fast, batch)
    torch.testing.assert_close(out_fast, out_ref)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("encoder", ["transformer", "mixed"])
@pytest.mark.parametrize("case", LEN_CASES)
def test_reference_and_sdpa_agree_on_gpu(case: str, encoder: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = build(enc_cfg(encoder)).cuda().train()
    fast = copy.deepcopy(ref).set_attn_impl("sdpa")
    batch = {k: v.cuda() for k, v in make_batch(CFG, 6, lens=lens_for(case)).items()}
    out_ref, grads_ref = forward_backward(ref, batch)
    out_fast, grads_fast = forward_backward(fast, batch)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(fast(batch)).all()


SLOW = pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="slow (~1 min on CPU); set HYFORMER_SLOW=1")


@pytest.mark.parametrize(
    "impl, encoder",
    # torch.compile is opt-in (training does not compile): every combination runs with HYFORMER_SLOW=1 (~40 s each)
    [
        pytest.param("sdpa", "mixed", marks=SLOW),
        pytest.param("sdpa", "transformer", marks=SLOW),
        pytest.param("reference", "mixed", marks=SLOW),
        pytest.param("reference", "transformer", marks=SLOW),
    ],
)
def test_torch_compile_matches_eager(impl: str, encoder: str) -> None:
    model = build(enc_cfg(encoder, attn_impl=impl))
    batch = make_batch(CFG, 6, lens=lens_for("mixed"))
    torch.testing.assert_close(torch.compile(model)(batch), model(batch), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Seeded golden values: update only for an intended change of the model's function or initialisation.
# ---------------------------------------------------------------------------------------------------------------------

# Rows have 0, 1, L and L/2 events; "longer" (L_H = 4) equals "transformer" on the first two rows, as it should.
GOLDEN = {
    "transformer": [0.07834665, -0.0374741, -0.08146751, -0.08827488],
    "longer": [0.07834665, -0.0374741, -0.07857808, -0.08770965],
    "swiglu": [-0.02294914, 0.03848676, 0.0495833, 0.04513856],
    "mixed": [0.15380237, -0.00450914, -0.02874381, -0.03066806],
}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_golden_logits(impl: str, encoder: str) -> None:
    model = build(enc_cfg(encoder, attn_impl=impl), seed=0)
    logits = model(make_batch(CFG, 4, lens=lens_for("mixed", batch_size=4), seed=0))
    torch.testing.assert_close(logits, torch.tensor(GOLDEN[encoder]), rtol=0, atol=1e-5)


def test_output_bias_starts_at_the_positive_rates_log_odds() -> None:
    """init_output_bias(p): every architecture's output bias becomes logit(p), which shifts every logit alike."""
    from hyformer.zoo import ARCHITECTURES, build_model

    for name in ("hyformer", "mtgr-longer", "din"):
        torch.manual_seed(0)
        model = build_model(ARCHITECTURES[name].config(CFG)).eval()
        batch = make_batch(CFG, 64, seed=1)
        before, old_bias = model(batch), model.head[-1].bias.item()
        after = model.init_output_bias(0.1)(batch)
        torch.testing.assert_close(model.head[-1].bias, torch.tensor([math.log(0.1 / 0.9)]))
        torch.testing.assert_close(
            after - before, torch.full_like(before, math.log(0.1 / 0.9) - old_bias), rtol=0, atol=1e-5
        )
    with pytest.raises(ValueError, match="positive_rate"):
        build_model(CFG).init_output_bias(0.0)


def test_embedding_tables_start_small_with_a_zero_padding_row() -> None:
    """Every table of every architecture: N(0, 0.02²) rows (not torch's N(0, 1)) and an exactly zero padding row."""
    from hyformer.layers import EMB_INIT_STD
    from hyformer.zoo import ARCHITECTURES, build_model

    big = CFG.replace(id_spaces={n: 4000 for n in CFG.schema.id_spaces})  # enough rows for a std
    for name, arch in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = build_model(arch.config(big))
        tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        assert tables, name
        for t in tables:
            assert torch.count_nonzero(t.weight[0]) == 0, name
            assert abs(t.weight[1:].std().item() - EMB_INIT_STD) < 0.1 * EMB_INIT_STD, name


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_dict_form() -> None:
    d = json.loads(json.dumps(CFG.to_dict()))
    assert HyFormerConfig.from_dict(d) == CFG
    as_pairs = CFG.replace(  # lists of pairs (the JSON of configs saved before the schema was split out)
        id_spaces=list(CFG.schema.id_spaces.items()),
        ns_groups=[[g, list(c)] for g, c in CFG.schema.ns_groups.items()],
        sequences=list(CFG.schema.sequences.items()),
        head_hidden=[32],
    )
    assert as_pairs == CFG and hash(as_pairs) == hash(CFG)
    flat = {k: v for k, v in d.items() if k != "schema"} | d["schema"]  # the pre-split checkpoint layout
    assert HyFormerConfig.from_dict(flat) == CFG
    assert isinstance(CFG.schema.sequences, dict) and list(CFG.schema.sequences) == ["long", "search", "feed"]
    assert (CFG.n_seq, CFG.n_ns, CFG.n_tokens) == (3, 5, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.d_model = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown fields"):
        HyFormerConfig.from_dict({**d, "bogus": 1})


def test_per_sequence_encoders_round_trip_through_dict_json_and_checkpoint(tmp_path) -> None:
    config = enc_cfg("mixed")
    assert config.seq_encoder == MIXED  # stored as a dict, like the schema's mapping fields
    assert config == CFG.replace(seq_encoder=list(MIXED.items())) and hash(config)
    assert [config.encoder_of(s) for s in config.schema.sequences] == ["longer", "transformer", "swiglu"]
    d = json.loads(json.dumps(config.to_dict()))
    assert HyFormerConfig.from_dict(d) == config
    assert HyFormerConfig.from_dict({**d, "seq_encoder": MIXED}) == config  # a JSON object works too
    model = build(config)
    encoders = [type(dec.encoder) for dec in model.layers[0].decoders]
    assert encoders == [LongerEncoderLayer, TransformerEncoderLayer, SwiGLUEncoderLayer]
    model.save(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == config
    batch = make_batch(CFG, 5)
    torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)


def test_config_saved_before_per_sequence_encoders_still_loads() -> None:
    """A config.json written before `longer_queries` existed, with seq_encoder "transformer", builds the same model."""
    old = CFG.to_dict()
    del old["longer_queries"]
    assert old["seq_encoder"] == "transformer"
    config = HyFormerConfig.from_dict(json.loads(json.dumps(old)))
    assert config.longer_queries == 100 and config.encoder_of("long") == "transformer"
    model = build(config)
    model.load_state_dict(build(CFG).state_dict())  # same parameter names and shapes
    batch = make_batch(CFG, 4, lens=lens_for("mixed", batch_size=4), seed=0)
    torch.testing.assert_close(model(batch), torch.tensor(GOLDEN["transformer"]), rtol=0, atol=1e-5)


def test_save_and_load_model_give_identical_outputs(tmp_path) -> None:
    model = build()
    model.save(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.pt"}
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    batch = make_batch(CFG, 5)
    torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(n_heads=3), "n_heads"),
        (dict(d_model=36, n_heads=2), "divisible by T"),
        (dict(n_queries=2), "divisible by T"),  # T = 11
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(seq_encoder="lstm"), "seq_encoder 'lstm'"),
        (dict(seq_encoder={**MIXED, "feed": "lstm"}), r"seq_encoder 'lstm' \(sequence 'feed'\)"),
        (dict(seq_encoder={"long": "longer"}), r"missing \['search', 'feed'\]"),
        (dict(seq_encoder={**MIXED, "clicks": "longer"}), r"unknown \['clicks'\]"),
        (dict(seq_encoder=(("long", "longer"), ("long", "swiglu"), ("search", "swiglu"), ("feed", "swiglu"))), "once"),
        (dict(seq_encoder=3), "seq_encoder 3"),
        (dict(longer_queries=0), "longer_queries"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_layers=0), "n_layers"),
        (dict(head_hidden=(0,)), "head_hidden"),
        (dict(ns_groups=(("user", ("nope",)),)), "unknown id space"),
        (dict(seq_fields=("item", "nope")), "unknown id space"),
        (dict(id_spaces=(("item", 1),)), "vocab"),
        (dict(sequences=(("long", 0),)), "max length"),
        (dict(sequences=(("long", 4), ("long", 4))), "duplicate"),
        (dict(sequences=()), "at least one"),
        (dict(ns_groups=(("a.b", ("item",)),)), "identifier"),
    ],
)
def test_invalid_config_raises(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CFG.replace(**overrides)


def test_paper_preset_shapes() -> None:
    config = HyFormerConfig.paper()
    assert dict(config.schema.sequences) == {"long": 3000, "search": 50, "feed": 50}
    assert (config.n_ns, config.n_seq, config.n_queries, config.n_tokens) == (13, 3, 1, 16)
    assert [config.encoder_of(s) for s in config.schema.sequences] == ["longer", "transformer", "transformer"]
    assert config.longer_queries == 100
    assert config.d_model % config.n_tokens == 0
    with torch.device("meta"):  # no memory: shapes only
        model = HyFormer(config)
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tokenizer.tables."))
    assert 300e6 < dense < 600e6  # paper: 418M dense parameters

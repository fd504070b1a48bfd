"""Params / FLOPs profiler (hyformer.profile): counts that follow from the shapes."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from hyformer import ARCHITECTURES, HyFormer, HyFormerConfig
from hyformer.profile import count_params, main, profile


def test_dense_plus_sparse_is_every_parameter_and_sparse_is_the_embedding_tables():
    cfg = HyFormerConfig.tiny()
    model = HyFormer(cfg)
    dense, sparse = count_params(model)
    assert dense + sparse == sum(p.numel() for p in model.parameters())
    assert sparse == sum(vocab * cfg.emb_dim for vocab in cfg.schema.id_spaces.values())
    p = profile(cfg, batch=8)
    assert (p.dense_params, p.sparse_params) == (dense, sparse)


def test_flops_are_linear_in_batch_and_backward_costs_about_twice_forward():
    cfg = HyFormerConfig.tiny()
    a, b = profile(cfg, batch=8), profile(cfg, batch=16)
    assert b.forward_flops == 2 * a.forward_flops and b.train_flops == 2 * a.train_flops
    assert 2.5 * a.forward_flops < a.train_flops <= 3 * a.forward_flops


def test_flops_of_a_single_linear_layer_match_the_formula():
    """The counter's convention, pinned: 2 * B * d_in * d_out per forward of a linear layer."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        lin, x = nn.Linear(32, 16), torch.empty(8, 32)
    with FlopCounterMode(display=False) as c:
        lin(x)
    assert c.get_total_flops() == 2 * 8 * 32 * 16


def test_longer_sequences_cost_more_flops():
    short = profile(HyFormerConfig.tiny(), batch=4)
    long = profile(HyFormerConfig.tiny(sequences=(("long", 64), ("search", 8), ("feed", 8))), batch=4)
    assert long.forward_flops > short.forward_flops and long.dense_params > short.dense_params  # + position table


@pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="~45 s (every architecture); set HYFORMER_SLOW=1")
def test_cli_prints_a_row_per_architecture(capsys):
    main(["--preset", "tiny", "--batch", "4"])
    out = capsys.readouterr().out
    assert "train TFLOPs" in out
    for name, arch in ARCHITECTURES.items():
        assert f"| {arch.label} (`{name}`) |" in out


def test_paper_preset_lands_near_the_papers_parameter_counts():
    """paper(): dense parameters within 10% of Table 1 for HyFormer (418M) and LONGER + RankMixer (386M)."""
    for name in ("hyformer", "longer-rankmixer"):
        prof = profile(ARCHITECTURES[name].config(HyFormerConfig.paper()), batch=2)
        assert abs(prof.dense_params / 1e6 - ARCHITECTURES[name].paper[0]) < 0.1 * ARCHITECTURES[name].paper[0], name

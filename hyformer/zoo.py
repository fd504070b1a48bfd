"""Every architecture of the paper's Tables 1 and 2 by name, and one way to build or load any of them.

    from hyformer.zoo import ARCHITECTURES, build_model, load_model
    config = ARCHITECTURES["longer-rankmixer"].config(HyFormerConfig.tiny())
    model = build_model(config)

`jobs/train.py --arch NAME` (and the daily workflow's `--arch`) trains any row on the same data and training code;
`python -m hyformer.profile` prints the rows' parameters and FLOPs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyformer.baselines import DIN, TwoStage, Unified
from hyformer.config import HyFormerConfig
from hyformer.model import HyFormer, RankingModel

MODELS: dict[str, type[RankingModel]] = {cls.arch: cls for cls in (HyFormer, TwoStage, Unified, DIN)}  # config.arch


@dataclass(frozen=True)
class Architecture:
    label: str  # the row's name in the paper
    table: str  # where the paper reports it: "1", "2" or "" (ours)
    overrides: dict[str, Any] = field(default_factory=dict)  # HyFormerConfig fields that turn the preset into it
    paper: tuple[float, float] | None = None  # (dense params x10^6, training FLOPs x10^12 at batch 2048) reported

    def config(self, base: HyFormerConfig | dict[str, Any], overrides: dict[str, Any] | None = None) -> HyFormerConfig:
        """`base` (a preset or a config matched to a feature set, or its to_dict() form, which need not be valid on
        its own) turned into this architecture, then `overrides` (which win over the architecture's own settings).
        Validated once, on the final values."""
        base = base.to_dict() if isinstance(base, HyFormerConfig) else dict(base)
        return HyFormerConfig.from_dict(base | self.overrides | (overrides or {}))


def _two_stage(seq: str, interaction: str) -> dict[str, Any]:
    # BaseArch: sequence modelling with target-item queries ("w/o Global Tokens", Table 2), then interaction
    return {"arch": "two_stage", "seq_encoder": seq, "interaction": interaction, "query_source": "target"}


A = Architecture
# paper=(dense params x10^6, training TFLOPs) as Tables 1 and 2 report them
ARCHITECTURES: dict[str, Architecture] = {
    # Table 1: HyFormer; BaseArch = {LONGER, Full Transformer} x {RankMixer, Transformer, Wukong}; UniArch (unified
    # models merge all sequences into one token stream)
    "hyformer": A("HyFormer", "1", {}, (418, 3.9)),  # the preset's encoders (paper(): LONGER-style on the long one)
    "longer-rankmixer": A("LONGER + RankMixer", "1", _two_stage("longer", "rankmixer"), (386, 3.5)),
    "longer-transformer": A("LONGER + Full Transformer", "1", _two_stage("longer", "transformer"), (416, 6.2)),
    "longer-wukong": A("LONGER + Wukong", "1", _two_stage("longer", "wukong"), (385, 5.2)),
    "transformer-rankmixer": A("Full Transformer + RankMixer", "1", _two_stage("transformer", "rankmixer"), (388, 6.6)),
    "transformer-transformer": A(
        "Full Transformer + Full Transformer", "1", _two_stage("transformer", "transformer"), (418, 9.3)
    ),
    "transformer-wukong": A("Full Transformer + Wukong", "1", _two_stage("transformer", "wukong"), (387, 8.3)),
    "mtgr-longer": A("MTGR/OneTrans (w/ LONGER)", "1", {"arch": "unified", "seq_encoder": "longer"}, (406, 6.6)),
    "mtgr-transformer": A(
        "MTGR/OneTrans (w/ Full Transformer)", "1", {"arch": "unified", "seq_encoder": "transformer"}, (450, 21.9)
    ),
    # Table 2 (its "BaseArch w/o Global Tokens" row is longer-rankmixer)
    "hyformer-no-seq-pool": A("Query w/o Seq Pooling Tokens", "2", {"query_source": "ns"}, (415, 3.9)),
    "hyformer-target-query": A(
        "Query w/o Nonseq and Seq Pooling Tokens (= HyFormer w/o Global Tokens)",
        "2",
        {"query_source": "target"},
        (414, 3.8),
    ),
    "basearch-global-tokens": A(
        "BaseArch w/ Global Tokens", "2", _two_stage("longer", "rankmixer") | {"query_source": "global"}, (505, 3.6)
    ),
    "hyformer-merge-seq": A("HyFormer + Merge Seq", "2", {"merge_sequences": True}, (397, 3.9)),
    # reference rows (ours): the same HyFormer blind to its sequences (what the non-sequential features alone give)
    "hyformer-no-seq": A("HyFormer without sequences (every event masked)", "", {"hide_sequences": True}),
    # beyond the paper (issue #15): the candidate meets every history in query generation
    "hyformer-pool-all": A(
        "HyFormer, every sequence's pooling token in every query's Global Info", "", {"query_pool_all": True}
    ),
    "hyformer-full-kv": A(
        "HyFormer, LONGER layers' queries decode the full-length sequence", "", {"longer_full_kv": True}
    ),
    "hyformer-target-attn": A(
        "HyFormer, the candidate's tokens also decode every sequence (target attention)", "", {"target_attention": True}
    ),
    # §3.4.1 sequence-encoder options of HyFormer itself
    "hyformer-transformer-seqs": A("HyFormer, Full Transformer on every sequence", "", {"seq_encoder": "transformer"}),
    "hyformer-swiglu-seqs": A("HyFormer, SwiGLU on every sequence", "", {"seq_encoder": "swiglu"}),
    # a reference row, not in the paper's tables: the classic target-attention baseline (hyformer/baselines.py)
    "din": A("DIN (target attention over each sequence)", "", {"arch": "din"}),
}
del A


def architecture(name: str) -> Architecture:
    """The named architecture, or a clear error listing the names."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_model(config: HyFormerConfig) -> RankingModel:
    """The model of `config.arch` (MODELS: HyFormer, TwoStage, Unified or DIN), dense_init applied."""
    model = MODELS[config.arch](config)
    return model.init_dense() if config.dense_init == "normal" else model


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> RankingModel:
    """Rebuild any architecture saved by `model.save(directory)` (config.json + model.pt)."""
    path = Path(directory)
    model = build_model(HyFormerConfig.from_dict(json.loads((path / "config.json").read_text())))
    model.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))
    return model

"""Parameters and training FLOPs of a model configuration (the "Params" and "FLOPs" columns of the paper's Table 1).

    python -m hyformer.profile                       # every architecture of hyformer.zoo at paper(), batch 2048
    python -m hyformer.profile --preset tiny --batch 256
    python -m hyformer.profile --set '{"n_layers": 2}' --only hyformer longer-rankmixer

Method:

- **Params**: *sparse* = the embedding tables (``nn.Embedding``), *dense* = every other parameter. The paper's
  Params column counts dense parameters (embedding tables of billion-scale ids would dwarf it); we print both.
- **FLOPs**: one training step (forward + backward) on ``batch`` samples with every sequence at its full length,
  counted by ``torch.utils.flop_counter.FlopCounterMode`` on the *meta* device (shapes only: no memory, no compute).
  It counts matrix products (2 FLOPs per multiply-add: linear layers, attention scores and values); element-wise ops,
  softmax, norms and embedding lookups are not counted, the usual convention for model FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hyformer.config import HyFormerConfig
from hyformer.testing import make_batch
from hyformer.training import split_parameters
from hyformer.zoo import ARCHITECTURES, build_model


@dataclass(frozen=True)
class Profile:
    dense_params: int
    sparse_params: int
    forward_flops: int  # one forward pass over the batch
    train_flops: int  # forward + backward
    batch: int

    def row(self, name: str, paper: tuple[float, float] | None = None) -> str:
        paper_params, paper_flops = (f"{v:g}" for v in paper) if paper else ("-", "-")
        return (
            f"| {name} | {self.dense_params / 1e6:.4g} | {paper_params} | {self.sparse_params / 1e6:.4g} | "
            f"{self.forward_flops / 1e12:.4g} | {self.train_flops / 1e12:.4g} | {paper_flops} |"
        )


HEADER = (
    "| architecture | dense params (M) | paper (M) | sparse params (M) | forward TFLOPs | train TFLOPs (fwd+bwd) "
    "| paper TFLOPs |\n|---|---:|---:|---:|---:|---:|---:|"
)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(dense, sparse) parameter counts: sparse = the embedding tables (hyformer.training.split_parameters)."""
    dense, sparse = split_parameters(model)
    return sum(p.numel() for p in dense), sum(p.numel() for p in sparse)


def profile(config: HyFormerConfig, batch: int = 2048) -> Profile:
    """Params and FLOPs of ``config`` (see module doc); builds the model on the meta device."""
    # FlopCounterMode has no formula for some fused attention kernels (it counts 0 for torch's CPU flash kernel):
    # count the "reference" kernel, the same function written as plain matrix products
    config = dataclasses.replace(config, attn_impl="reference")
    with torch.device("meta"):
        model = build_model(config)
    full = dict(config.schema.sequences)
    inputs = {k: v.to("meta") for k, v in make_batch(config, batch, lens=full).items()}
    dense, sparse = count_params(model)
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs)
    fwd = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs).sum().backward()
    return Profile(dense, sparse, fwd, counter.get_total_flops(), batch)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print dense/sparse parameters and training FLOPs per architecture.")
    p.add_argument("--preset", default="paper", choices=("paper", "tiny"))
    p.add_argument("--batch", type=int, default=2048, help="samples per training step (paper: 2048)")
    p.add_argument("--set", default="{}", help="HyFormerConfig overrides for every row, as JSON")
    p.add_argument("--only", nargs="*", choices=sorted(ARCHITECTURES), help="these architectures (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    a = p.parse_args(argv)
    base = getattr(HyFormerConfig, a.preset)(**json.loads(a.set))
    rows = {name: profile(ARCHITECTURES[name].config(base), a.batch) for name in (a.only or ARCHITECTURES)}
    if a.json:
        print(json.dumps({k: vars(v) for k, v in rows.items()}, indent=1))
        return
    print(f"preset {a.preset}, batch {a.batch}, every sequence at full length; paper = Tables 1-2 of the paper\n")
    print(HEADER)
    for name, prof in rows.items():
        arch = ARCHITECTURES[name]
        print(prof.row(f"{arch.label} (`{name}`)", arch.paper if a.preset == "paper" else None))


if __name__ == "__main__":
    main()

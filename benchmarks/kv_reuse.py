"""KV reuse across candidates (serving): encode a request's behaviour sequences once, then score its M candidates.

    python -m benchmarks.kv_reuse                            # default: paper() widths, L_long = 1000, M = 1/10/50/200
                                                             # (~1.5 min on 2 CPU cores)
    python -m benchmarks.kv_reuse --preset tiny --ms 1,10    # a quick run (seconds)
    python -m benchmarks.kv_reuse --preset paper --device cuda --name kv_reuse_paper_cuda   # L_long = 3000, on a GPU

A ranking request scores M candidates for one user. The sequence side of HyFormer (every layer's sequence encoder and
K/V, and the mean pools of the Global Info) does not depend on the candidate, so it can be computed once per request.
For each M, in eval mode under ``torch.inference_mode``, with the "sdpa" attention kernel and every sequence at its
full length, two paths compute the same M logits:

- **baseline**: ``model(batch)`` on M rows, each carrying its own copy of the request's sequences (the copies are made
  before timing, as a feature pipeline would hand them over);
- **KV reuse**: ``model.encode_sequences(request)`` on the 1-row request, then ``model.score(candidates, memory)`` on
  the M candidate rows (only their ``ns_*`` keys are read).

Reported per M: median wall ms over ``--repeats`` timed runs after ``--warmup`` untimed ones (the two paths alternate
in every run), the speedup (baseline / KV reuse), the encode and score parts of KV reuse, the FLOPs of each path, and
the max abs difference between the two paths' logits. ``flops_speedup_limit`` is the FLOP ratio as M grows without
bound: per-candidate baseline FLOPs over per-candidate score FLOPs (the encode is amortised away).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the *meta* device (shapes only, no compute) with
the "reference" attention kernel, the same function as "sdpa" with every attention matmul visible: on CPU, torch's
fused ``scaled_dot_product_attention`` kernel has no FLOP formula, so counting under "sdpa" would miss the attention.
Matrix products only (2 FLOPs per multiply-add), as in ``hyformer.profile``.

Presets: "serving" (default) is ``HyFormerConfig.paper()`` with the long sequence cut to 1000 events (search and feed
stay at 50), "paper" is ``HyFormerConfig.paper()`` (3000/50/50), "tiny" is ``HyFormerConfig.tiny()``; ``--set``
applies further config overrides as JSON. The exact config is written into the JSON.

Writes ``benchmarks/results/<name>.json`` (every number) and ``<name>.md`` (a table), ``--name`` defaulting to
``kv_reuse``. Numbers are for the machine it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import write_results
from hyformer.config import HyFormerConfig
from hyformer.model import HyFormer
from hyformer.profile import count_params
from hyformer.testing import make_batch
from hyformer.zoo import build_model

Batch = dict[str, Tensor]

# preset -> (HyFormerConfig constructor, overrides); every preset runs with attn_impl="sdpa"
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "serving": ("paper", {"sequences": {"long": 1000, "search": 50, "feed": 50}}),
    "paper": ("paper", {}),
    "tiny": ("tiny", {}),
}
DEFAULT_MS = (1, 10, 50, 200)


def preset_config(preset: str, overrides: dict[str, Any] | None = None) -> HyFormerConfig:
    """The preset's config with `overrides` (HyFormerConfig fields) on top, attention kernel "sdpa"."""
    base, preset_overrides = PRESETS[preset]
    return getattr(HyFormerConfig, base)(**(preset_overrides | (overrides or {}) | {"attn_impl": "sdpa"}))


def make_inputs(config: HyFormerConfig, m: int, seed: int = 0) -> tuple[Batch, Batch, Batch]:
    """(request, candidates, baseline) for one request with m candidates, every sequence at its full length.

    request: 1 row (its seq_*/len_* keys are read); candidates: m rows of ns_* keys; baseline: the m candidate rows,
    each with its own (materialised) copy of the request's sequences.
    """
    full = dict(config.schema.sequences)
    request = {k: v for k, v in make_batch(config, 1, lens=full, seed=seed).items() if k.startswith(("seq_", "len_"))}
    candidates = {
        k: v for k, v in make_batch(config, m, seed=seed + 1).items() if k.startswith(("ns_", "bag_", "dense_"))
    }
    baseline = candidates | {k: v.repeat_interleave(m, dim=0) for k, v in request.items()}  # (m, ...) copies
    return request, candidates, baseline


def count_flops(config: HyFormerConfig, m: int) -> dict[str, int]:
    """FLOPs of the baseline, the encode and the score of KV reuse for one request with m candidates (module doc:
    meta device, "reference" kernel)."""
    config = dataclasses.replace(config, attn_impl="reference")
    with torch.device("meta"):
        model = build_model(config)
    request, candidates, baseline = ({k: v.to("meta") for k, v in b.items()} for b in make_inputs(config, m))

    def flops(fn: Callable[[], Any]) -> int:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            fn()
        return counter.get_total_flops()

    memory = model.encode_sequences(request)
    return {
        "baseline": flops(lambda: model(baseline)),
        "encode": flops(lambda: model.encode_sequences(request)),
        "score": flops(lambda: model.score(candidates, memory)),
    }


def measure(
    model: HyFormer, config: HyFormerConfig, m: int, device: torch.device, warmup: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """One row: both paths for one request with m candidates, timed alternately; see the module doc."""
    request, candidates, baseline = ({k: v.to(device) for k, v in b.items()} for b in make_inputs(config, m, seed))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_baseline() -> tuple[Tensor, float]:
        sync()
        t0 = time.perf_counter()
        logits = model(baseline)
        sync()
        return logits, 1000 * (time.perf_counter() - t0)

    def run_reuse() -> tuple[Tensor, float, float]:
        sync()
        t0 = time.perf_counter()
        memory = model.encode_sequences(request)
        sync()
        t1 = time.perf_counter()
        logits = model.score(candidates, memory)
        sync()
        t2 = time.perf_counter()
        return logits, 1000 * (t1 - t0), 1000 * (t2 - t1)

    times: dict[str, list[float]] = {"baseline": [], "encode": [], "score": []}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            base_logits, base_ms = run_baseline()
            reuse_logits, enc_ms, score_ms = run_reuse()
            if i >= warmup:
                times["baseline"].append(base_ms)
                times["encode"].append(enc_ms)
                times["score"].append(score_ms)
    reuse = [e + s for e, s in zip(times["encode"], times["score"])]
    flops = count_flops(config, m)
    row = {
        "m": m,
        "baseline_ms": statistics.median(times["baseline"]),
        "reuse_ms": statistics.median(reuse),
        "encode_ms": statistics.median(times["encode"]),
        "score_ms": statistics.median(times["score"]),
        "baseline_gflops": flops["baseline"] / 1e9,
        "reuse_gflops": (flops["encode"] + flops["score"]) / 1e9,
        "encode_gflops": flops["encode"] / 1e9,
        "score_gflops": flops["score"] / 1e9,
        "max_abs_diff": (base_logits - reuse_logits).abs().max().item(),
        "max_abs_logit": base_logits.abs().max().item(),
        "times_ms": times | {"reuse": reuse},
    }
    row["speedup"] = row["baseline_ms"] / row["reuse_ms"]
    row["flops_ratio"] = row["baseline_gflops"] / row["reuse_gflops"]
    return row


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "node": platform.node(),
        "cpu_count": os.cpu_count(),
        "arch": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "loadavg_1min": os.getloadavg()[0],  # other processes on the machine disturb the timings
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(
    preset: str = "serving",
    ms: Sequence[int] = DEFAULT_MS,
    device: str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the preset's model (eval mode, "sdpa"), measure every M in `ms` and return the JSON-ready results."""
    dev = torch.device(device)
    machine = machine_info(dev)
    config = preset_config(preset, overrides)
    base, preset_overrides = PRESETS[preset]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = build_model(config).to(dev).eval()
    model.set_attn_impl("sdpa")
    dense, sparse = count_params(model)
    print(f"kv_reuse: built {preset} ({dense / 1e6:.0f}M dense params) in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for m in ms:
        t0 = time.perf_counter()
        row = measure(model, config, m, dev, warmup, repeats, seed)
        rows.append(row)
        print(
            f"kv_reuse: M={m}: baseline {row['baseline_ms']:.1f} ms, KV reuse {row['reuse_ms']:.1f} ms "
            f"-> {row['speedup']:.2f}x (FLOPs {row['flops_ratio']:.2f}x), max |diff| {row['max_abs_diff']:.1e} "
            f"[{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    last = rows[-1]
    machine["loadavg_1min_end"] = os.getloadavg()[0]
    return {
        "machine": machine,
        "preset": preset,
        "config_from": {"preset": base, "overrides": preset_overrides | (overrides or {}) | {"attn_impl": "sdpa"}},
        "config": config.to_dict(),
        "dense_params": dense,
        "sparse_params": sparse,
        "warmup": warmup,
        "repeats": repeats,
        "seed": seed,
        "rows": rows,
        # per-candidate FLOPs of the baseline over those of score: the FLOP ratio as M grows without bound
        "flops_speedup_limit": last["baseline_gflops"] / last["score_gflops"],
    }


def table(res: dict[str, Any]) -> str:
    mach, cfg = res["machine"], res["config"]
    where = mach.get("gpu", f"{mach['cpu_count']} CPU cores, {mach['torch_threads']} torch threads")
    seqs = ", ".join(f"{s} {L}" for s, L in dict(cfg.get("schema", cfg)["sequences"]).items())
    lines = [
        f"KV reuse across candidates, preset `{res['preset']}` (sequences {seqs}; D={cfg['d_model']}, "
        f"Ds={cfg['d_seq'] or cfg['d_model']}, {cfg['n_layers']} layers, {res['dense_params'] / 1e6:.0f}M dense "
        f"params), one request, full-length sequences, fp32, sdpa, on {mach['device']} ({where}, torch "
        f"{mach['torch']}; 1-min load average {mach['loadavg_1min']:.1f} at start, "
        f"{mach['loadavg_1min_end']:.1f} at end). Median of {res['repeats']} runs after {res['warmup']} warm-up.",
        "",
        "| M candidates | baseline ms | KV reuse ms | (encode + score ms) | speedup | baseline GFLOPs "
        "| KV reuse GFLOPs | FLOP ratio | max abs logit diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['m']} | {r['baseline_ms']:.1f} | {r['reuse_ms']:.1f} | {r['encode_ms']:.1f} + {r['score_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['baseline_gflops']:.2f} | {r['reuse_gflops']:.2f} | {r['flops_ratio']:.2f}x | "
            f"{r['max_abs_diff']:.1e} |"
        )
    lines += ["", f"FLOP ratio as M grows without bound (encode amortised): {res['flops_speedup_limit']:.2f}x.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="serving", choices=sorted(PRESETS), help="model config (see module doc)")
    p.add_argument("--set", default="{}", help="further HyFormerConfig overrides, as JSON")
    p.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)), help="candidates per request to sweep")
    p.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of both paths per M")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of both paths per M (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder for the results")
    p.add_argument("--name", default="kv_reuse", help="file stem: <out>/<name>.json and .md")
    a = p.parse_args(argv)
    res = run_benchmark(
        a.preset, [int(x) for x in a.ms.split(",")], a.device, a.warmup, a.repeats, json.loads(a.set), a.seed
    )
    write_results(a.out, a.name, res, table(res))


if __name__ == "__main__":
    main()

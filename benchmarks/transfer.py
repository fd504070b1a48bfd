"""Host-to-device transfer per training batch, naive arrays vs deduplicated ID tables (paper §3.8.1).

    python -m benchmarks.transfer                          # default: --scale 1 (1.4M impressions, 2.9M search
                                                           # events over 70 days), L_long = 100/1000/3000, batch 256;
                                                           # ~2.5 min on 2 idle CPU cores, data preparation included
    python -m benchmarks.transfer --scale 0.05 --lengths 100,1000 --batches 2     # a quick run (~1 min)
    python -m benchmarks.transfer --device cuda --scale 5 --name transfer_cuda    # with the H2D copy, on a GPU

Data (under ``--work``, ~45 s at ``--scale 1`` on 2 cores, not timed): the synthetic logs and ingest of
``benchmarks.features.synth_and_ingest`` (``--scale`` multiplies its per-day traffic), then the 70-day feature window
built by ``jobs.build_features``. Ray is shut down before anything is timed.

Batches are drawn as ``jobs.train`` draws them: from the training days (every day of the window but the last, held
out), ``--batch-size`` samples taken at random from ``--shuffle-buffer`` x batch-size consecutive stored samples
(Ray Data's local shuffle buffer, 4 x batch in ``jobs.train``); ``--shuffle-buffer 1`` takes consecutive stored
samples (the order evaluation reads, where a request's candidates sit together and share their sequences). The same
batches are used for every L_long.

For every L_long and batch (``--warmup`` untimed batches, then ``--batches`` timed ones; medians reported), the two
formats of ``features.materialize.Materializer`` are measured on the same samples, alternating:

- **naive**: ``seq_<s>`` (B, L_s, F) ids of every event; the model embeds and projects every event;
- **dedup**: ``uniq_<stream>`` (U, F) + ``inv_<s>`` (B, L_s); the model embeds and projects the U unique rows, then
  gathers the (B, L_s, Ds) tokens on the device.

Per format: bytes per batch (nbytes of every tensor the batch carries to the device: NS ids, lengths, labels,
request ids, p_click and the sequence tensors; the sequence tensors alone are reported too), host collate ms
(``Materializer`` + ``torch.from_numpy``, what ``jobs.train.MaterializeCollate`` runs), and the model's forward +
backward ms on the device (BCE loss, ``zero_grad`` before; no optimizer step, which is the same for both formats).
With ``--device cuda`` also: pin ms (``pin_memory`` of every tensor, host side) and H2D ms
(``tensor.to(device, non_blocking=True)`` of every pinned tensor, then ``torch.cuda.synchronize``). On the CPU
there is no copy: pin and H2D are reported as null ("n/a"), not as zero.

Checks on the first timed batch: the max abs difference between the two formats' logits (eval mode) and between
their parameter gradients (train mode, the same RNG state for both passes).

Model: ``jobs.train.model_config`` for the window at each L_long with ``DEFAULT_MODEL`` overrides (D = 64, 2 layers,
the paper's LONGER-style encoder on the long sequence: full self-attention over 256 x 3000 events does not fit a CPU
run), then ``--model`` JSON overrides on top. fp32, "sdpa" attention, ``torch.manual_seed(--seed)`` before each
build, so every L_long starts from the same initialisation.

Writes ``benchmarks/results/<name>.json`` (every number, per-batch times, machine and torch info) and ``<name>.md``
(a table), ``--name`` defaulting to ``transfer``. Numbers are for the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import ray
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import write_results
from benchmarks.features import END, synth_and_ingest
from benchmarks.kv_reuse import machine_info
from features.build import FeatureConfig
from features.materialize import Timelines, unique_ratio
from hyformer import build_model
from hyformer.model import RankingModel
from hyformer.profile import count_params
from jobs.build_features import FeatureSet, build_features
from jobs.common import init_ray, setup_logging
from jobs.train import MaterializeCollate, model_config

Batch = dict[str, Tensor]
FORMATS = ("naive", "dedup")
WINDOW_DAYS = 70
SEQ_PREFIXES = ("seq_", "uniq_", "inv_")
DEFAULT_MODEL: dict[str, Any] = {
    "d_model": 64,
    "n_layers": 2,
    "seq_encoder": {"long": "longer", "search": "transformer", "feed": "transformer"},
}


def build_window(work: str, scale: float) -> tuple[FeatureSet, dict[str, Any]]:
    """Synthetic logs, ingest and the 70-day feature window (module doc: Data); Ray is shut down afterwards."""
    init_ray()
    data = synth_and_ingest(work, scale)
    t0 = time.perf_counter()
    fs = build_features(data["data"], END, WINDOW_DAYS, FeatureConfig(n_shards=4))
    data["build_seconds"] = time.perf_counter() - t0
    ray.shutdown()  # its idle workers would compete with the timed code for the cores
    return fs, data


def draw_batches(
    fs: FeatureSet, n: int, batch_size: int, shuffle_buffer: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """`n` batches of stored samples from the training days (module doc: local shuffle buffer emulation)."""
    samples = pl.read_parquet(fs.sample_files(fs.days[:-1])).drop("day")
    span = batch_size * shuffle_buffer
    if samples.height < span:
        raise ValueError(f"{samples.height} training samples, fewer than one shuffle buffer ({span}): raise --scale")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        window = samples.slice(int(rng.integers(0, samples.height - span + 1)), span)
        part = window[rng.choice(span, batch_size, replace=False)] if shuffle_buffer > 1 else window
        batches.append({c: part[c].to_numpy() for c in part.columns})
    return batches


def timed(sync: Callable[[], None], fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(fn(*args), wall ms), with the device synchronised before and after."""
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, 1000 * (time.perf_counter() - t0)


def pin(batch: Batch) -> Batch:
    return {k: v.pin_memory() for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fwd_bwd(model: RankingModel, batch: Batch) -> Tensor:
    """One training step's forward and backward (no optimizer step); returns the logits."""
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    F.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    return logits


def agreement(model: RankingModel, batches: dict[str, Batch]) -> dict[str, float]:
    """Max abs differences between the formats: logits in eval mode, parameter gradients in train mode (both passes
    from the same RNG state, so dropout, if any, draws the same masks)."""
    model.eval()
    with torch.no_grad():
        naive, dedup = (model(batches[f]) for f in FORMATS)
    model.train()
    grads = {}
    for f in FORMATS:
        with torch.random.fork_rng(devices=[naive.device] if naive.device.type == "cuda" else []):
            torch.manual_seed(0)
            fwd_bwd(model, batches[f])
        grads[f] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    pairs = zip(grads["naive"], grads["dedup"], strict=True)
    return {
        "max_abs_logit_diff": (naive - dedup).abs().max().item(),
        "max_abs_logit": naive.abs().max().item(),
        "max_abs_grad_diff": max((a - b).abs().max().item() for a, b in pairs),
        "max_abs_grad": max(a.abs().max().item() for a in grads["naive"]),
    }


def measure_length(
    fs: FeatureSet,
    timelines: Timelines,
    long_len: int,
    batches: list[dict[str, np.ndarray]],
    warmup: int,
    overrides: dict[str, Any],
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """One row of the table: both formats on every batch at this L_long (module doc)."""
    f = fs.with_read_side(long_len=long_len)
    config = model_config(f, overrides)
    torch.manual_seed(seed)
    model = build_model(config).to(device).train()
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    collate = {fmt: MaterializeCollate(timelines, f.cfg, dedup=fmt == "dedup") for fmt in FORMATS}  # as jobs.train
    keys = ("bytes", "seq_bytes", "collate_ms", "pin_ms", "h2d_ms", "fwd_bwd_ms")
    per: dict[str, dict[str, list[float]]] = {fmt: {k: [] for k in keys} for fmt in FORMATS}
    fills, ratios, check = [], [], {}
    for i, samples in enumerate(batches):
        on_device: dict[str, Batch] = {}
        for fmt in FORMATS:
            host, collate_ms = timed(sync, collate[fmt], samples)
            if cuda:
                pinned, pin_ms = timed(sync, pin, host)
                on_device[fmt], h2d_ms = timed(sync, to_device, pinned, device)
            else:
                on_device[fmt], pin_ms, h2d_ms = host, None, None
            _, fwd_bwd_ms = timed(sync, fwd_bwd, model, on_device[fmt])
            if i >= warmup:
                row = per[fmt]
                row["bytes"].append(sum(v.nbytes for v in host.values()))
                row["seq_bytes"].append(sum(v.nbytes for k, v in host.items() if k.startswith(SEQ_PREFIXES)))
                times = {"collate_ms": collate_ms, "pin_ms": pin_ms, "h2d_ms": h2d_ms, "fwd_bwd_ms": fwd_bwd_ms}
                for k, v in times.items():
                    row[k].append(v)
                if fmt == "dedup":
                    ratios.append(unique_ratio({k: v.numpy() for k, v in host.items()}))
                    fills.append(host["len_long"].double().mean().item() / long_len)
        if i == warmup:
            check = agreement(model, on_device)
    out: dict[str, Any] = {
        "long_len": long_len,
        "fill_long": statistics.mean(fills),
        "unique_ratio": statistics.mean(ratios),
    }
    for fmt in FORMATS:
        med = {k: (statistics.median(v) if v[0] is not None else None) for k, v in per[fmt].items()}
        out[fmt] = med | {"per_batch": per[fmt]}
    out["reduction"] = out["naive"]["bytes"] / out["dedup"]["bytes"]
    out["seq_reduction"] = out["naive"]["seq_bytes"] / out["dedup"]["seq_bytes"]
    out |= check
    out["config"] = config.to_dict()
    out["dense_params"], out["sparse_params"] = count_params(model)
    return out


def run_benchmark(
    work: str,
    scale: float,
    lengths: list[int],
    batch_size: int,
    batches: int,
    warmup: int,
    shuffle_buffer: int,
    model: dict[str, Any],
    device: str,
    seed: int,
) -> dict[str, Any]:
    """Build the data, then measure every L_long; returns the JSON-ready results."""
    if batches < 1:
        raise ValueError("--batches must be at least 1")
    dev = torch.device(device)
    fs, data = build_window(work, scale)
    t0 = time.perf_counter()
    timelines = fs.timelines()
    data["timelines_load_s"], data["timelines_mb"] = time.perf_counter() - t0, timelines.nbytes() / 1e6
    samples = draw_batches(fs, warmup + batches, batch_size, shuffle_buffer, seed)
    machine = machine_info(dev)
    overrides = DEFAULT_MODEL | model
    rows = []
    for L in lengths:
        t0 = time.perf_counter()
        r = measure_length(fs, timelines, L, samples, warmup, overrides, dev, seed)
        rows.append(r)
        n, d = r["naive"], r["dedup"]
        print(
            f"transfer: L_long={L}: {n['bytes'] / 1e6:.2f} -> {d['bytes'] / 1e6:.2f} MB/batch ({r['reduction']:.2f}x, "
            f"unique ratio {r['unique_ratio']:.3f}), fwd+bwd {n['fwd_bwd_ms']:.0f} / {d['fwd_bwd_ms']:.0f} ms, "
            f"max |logit diff| {r['max_abs_logit_diff']:.1e} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    machine["loadavg_1min_end"] = os.getloadavg()[0]
    return {
        "machine": machine,
        "h2d": "measured" if dev.type == "cuda" else "not applicable: device cpu (no copy, pin_ms and h2d_ms are null)",
        "scale": scale,
        "data": data,
        "window": {"days": len(fs.days), "first": fs.days[0], "last": fs.days[-1], "samples": fs.samples},
        "batch_size": batch_size,
        "shuffle_buffer": shuffle_buffer,
        "warmup": warmup,
        "batches": batches,
        "seed": seed,
        "model_overrides": overrides,
        "rows": rows,
    }


def table(res: dict[str, Any]) -> str:
    mach, cfg = res["machine"], res["rows"][0]["config"]
    where = mach.get("gpu", f"{mach['cpu_count']} CPU cores, {mach['torch_threads']} torch threads")
    k = res["shuffle_buffer"]
    order = "consecutive stored samples" if k == 1 else f"random from {k} x batch consecutive samples"

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    schema = cfg.get("schema", cfg)  # results written before the model config nested its input schema: flat
    seqs = dict(schema["sequences"])
    header = (
        f"Host-to-device bytes and time per training batch, naive (B, L, F) arrays vs dedup ID tables (§3.8.1), on "
        f"{mach['device']} ({where}, torch {mach['torch']}; 1-min load average {mach['loadavg_1min']:.1f} at start, "
        f"{mach['loadavg_1min_end']:.1f} at end). Synthetic data `--scale {res['scale']}`, "
        f"{res['window']['days']}-day window ({res['window']['samples']:,} samples); batch {res['batch_size']} "
        f"({order}) from the training days; F = {len(schema['seq_fields'])} ids per event, search/feed L = "
        f"{seqs['search']}/{seqs['feed']}. Model D = {cfg['d_model']}, {cfg['n_layers']} layers, fp32, sdpa. Median "
        f"of {res['batches']} batches after {res['warmup']} warm-up. H2D: {res['h2d']}."
    )
    columns = (
        "| L_long | long fill | unique ratio | MB/batch naive | MB/batch dedup | reduction | collate ms naive / dedup "
        "| H2D ms naive / dedup | fwd+bwd ms naive / dedup | max abs logit diff |"
    )
    lines = [header, "", columns, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        n, d = r["naive"], r["dedup"]
        lines.append(
            f"| {r['long_len']} | {r['fill_long']:.2f} | {r['unique_ratio']:.3f} | {n['bytes'] / 1e6:.2f} | "
            f"{d['bytes'] / 1e6:.2f} | {r['reduction']:.2f}x | {ms(n['collate_ms'])} / {ms(d['collate_ms'])} | "
            f"{ms(n['h2d_ms'])} / {ms(d['h2d_ms'])} | {ms(n['fwd_bwd_ms'])} / {ms(d['fwd_bwd_ms'])} | "
            f"{r['max_abs_logit_diff']:.1e} |"
        )
    notes = (
        "long fill: mean len_long / L_long; unique ratio: dedup table rows / non-padding events (paper: ~25%). "
        "MB/batch counts every tensor the batch carries (sequence tensors alone: `seq_bytes` in the JSON)."
    )
    lines += ["", notes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiplies benchmarks.features' per-day traffic")
    p.add_argument("--work", default="/tmp/hyformer-bench-transfer", help="scratch folder: logs, feature store")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder for the results")
    p.add_argument("--name", default="transfer", help="file stem: <out>/<name>.json and .md")
    p.add_argument("--lengths", default="100,1000,3000", help="L_long values to sweep")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=4, help="timed batches per L_long (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per L_long before them")
    p.add_argument(
        "--shuffle-buffer", type=int, default=4, help="draw a batch from this many x batch-size samples; 1: stored"
    )
    p.add_argument("--model", default="{}", help="HyFormerConfig overrides as JSON, on top of DEFAULT_MODEL")
    p.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    setup_logging()
    res = run_benchmark(
        a.work,
        a.scale,
        [int(x) for x in a.lengths.split(",")],
        a.batch_size,
        a.batches,
        a.warmup,
        a.shuffle_buffer,
        json.loads(a.model),
        a.device,
        a.seed,
    )
    write_results(a.out, a.name, res, table(res))


if __name__ == "__main__":
    main()

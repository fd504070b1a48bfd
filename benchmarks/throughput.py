"""Training throughput (paper §3.8): one process's step time per model size, and the Ray Train job end to end.

    python -m benchmarks.throughput --scale 0.5 --days 21 --epochs 1 --steps 5   # small: ~3 min on 2 CPU cores
    python -m benchmarks.throughput          # full size: 70 days, 84k samples, 2 epochs; ~10-15 min on 2 CPU cores
    python -m benchmarks.throughput --device cuda --parts step --name throughput_cuda   # GPU: + the paper() preset

Two parts, chosen with ``--parts step,workers``:

**step**: the training step of ``hyformer.training.Learner`` (the class every Ray Train worker runs: forward, BCE
loss, backward, clipping, AdamW on the dense parameters and row-wise Adagrad on the embedding tables) in one process
(``grad_sync="ddp"`` without a process group: no communication), on random batches of ``hyformer.testing.make_batch``
with every sequence at its full length (4 distinct batches, made and moved to the device before timing, used in
turn). ``--warmup`` untimed steps, then ``--steps`` timed ones (``torch.cuda.synchronize`` around each step on CUDA);
reported: the median step ms, samples/s = batch / median step, the training FLOPs of one step (forward + backward,
matrix products, from ``hyformer.profile.profile``: meta device, "reference" attention kernel), the achieved TFLOP/s,
and on CUDA the MFU = achieved FLOP/s / ``--peak-tflops`` (default 989: H100 SXM dense bf16, no sparsity) and the peak
memory. Timing runs the "sdpa" attention kernel (as ``jobs.train`` does); fp32 on CPU, bf16 autocast on CUDA (weights,
gradients and optimiser state fp32). Every preset runs as HyFormer and as ``--archs``' other rows (default: LONGER +
RankMixer, the paper's main baseline), built by ``hyformer.zoo.architecture(name).config(preset)``.

Presets (``--presets``; default tiny,small and, with ``--device cuda``, paper):

- ``tiny``: ``HyFormerConfig.tiny()`` (D = 32, sequences 16/8/8), batch ``--batch-size``;
- ``small``: tiny's vocabularies and NS groups with D = 128, Ds = 32, 2 layers, 4 heads, E = 16, sequences long /
  search / feed of 512 / 50 / 50 events, LONGER-style long-sequence encoder with L_H = 100 (the paper's choice at
  its scale) and Full Transformers on search and feed; 23 GFLOPs per training step at batch 256, ~0.7 s on 2 CPU cores;
- ``paper``: ``HyFormerConfig.paper()`` (D = 832, Ds = 128, 4 layers, 3000 / 50 / 50 events, 404M dense parameters),
  batch ``--paper-batch-size`` (default 512: ~23 GB of saved activations at most, by a meta-device estimate).

**workers**: the real job end to end on a local Ray cluster (``jobs.common.init_ray(num_cpus=4)``): synthetic logs of
``--days`` days (``features.synth.generate``; the daily workflow's demo sizes with the per-day traffic multiplied by
``--scale``; cached in ``--work``), ``jobs.ingest.ingest`` and ``jobs.build_features.build_features`` (L_long = 128,
search / feed 50, as the daily workflow), then ``jobs.train.train`` with 2 CPU workers of 1 CPU each (gloo),
``--epochs`` epochs, ``--batch-size`` per worker and the daily workflow's demo model (D = 32, 2 layers), once with
``grad_sync="ddp"`` and once with ``"async"`` (same data, same seed), for each of ``--seeds`` seeds (0, 1, ...).
Reported per mode: training samples/s (all epochs' training samples over their summed training-loop seconds, as
``jobs.train`` reports them per epoch: they include each epoch's wait for its first batch while Ray Data starts the
pipeline, and every later wait on prefetching, but not the evaluation), mean step ms (training seconds / steps per
worker, ``ceil(samples / workers / batch)`` per epoch), the last epoch's held-out AUC, query-level AUC and logloss,
and the oracle's query AUC (``p_click`` on the same rows); mean ± sample std over the seeds when there are several.
The workers run on the CPU whatever ``--device`` says.

Writes ``benchmarks/results/<name>.json`` (every number, per-step times, machine, torch and Ray versions) and
``<name>.md`` (two tables), ``--name`` defaulting to ``throughput``. Numbers are for the machine it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
import torch

from benchmarks.common import synthesize_cached, write_results
from benchmarks.features import END
from benchmarks.kv_reuse import machine_info
from features.build import FeatureConfig
from features.synth import SynthConfig
from hyformer.config import HyFormerConfig
from hyformer.profile import profile
from hyformer.testing import make_batch
from hyformer.training import Learner, OptimConfig
from hyformer.zoo import ARCHITECTURES, architecture, build_model
from jobs.build_features import FeatureSet, build_features
from jobs.common import init_ray, log, setup_logging
from jobs.ingest import ingest
from jobs.train import train
from jobs.train_config import TrainConfig

PARTS = ("step", "workers")
MODES = ("ddp", "async")
N_BATCHES = 4  # distinct random batches per step row, used in turn


def small_config() -> HyFormerConfig:
    """The "small" preset (module doc): ~0.7 s per training step at batch 256 on 2 CPU cores."""
    return HyFormerConfig.tiny(
        d_model=128,
        d_seq=32,
        n_heads=4,
        emb_dim=16,
        ffn_mult=4,
        head_hidden=(256,),
        sequences={"long": 512, "search": 50, "feed": 50},
        seq_encoder={"long": "longer", "search": "transformer", "feed": "transformer"},
        longer_queries=100,
    )


PRESETS: dict[str, Callable[[], HyFormerConfig]] = {
    "tiny": HyFormerConfig.tiny,
    "small": small_config,
    "paper": HyFormerConfig.paper,
}
# workers part: the daily workflow's demo data (SynthConfig.demo, per-day counts x --scale) and model
WORKERS_MODEL: dict[str, Any] = dict(d_model=32, n_heads=2, n_layers=2, ffn_mult=2, head_hidden=(64,))
WORKERS_FEATURES = FeatureConfig(long_len=128, search_len=50, feed_len=50)
WORKERS = 2
EVAL_KEYS = ("eval_auc", "eval_query_auc", "eval_logloss", "eval_oracle_auc", "eval_oracle_query_auc")
SUMMARY_KEYS = ("samples_per_s", "step_ms", *EVAL_KEYS)


# --- step: one process -------------------------------------------------------------------------------------------


def step_row(
    preset: str,
    arch: str,
    batch_size: int,
    device: torch.device,
    steps: int,
    warmup: int,
    peak_tflops: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Time `steps` Learner steps of the preset as architecture `arch` (module doc) and count their FLOPs."""
    config = architecture(arch).config(PRESETS[preset](), {"attn_impl": "sdpa"})
    prof = profile(config, batch_size)  # meta device, "reference" kernel: FLOPs of one forward + backward
    torch.manual_seed(seed)
    model = build_model(config).to(device).train()
    learner = Learner(model, OptimConfig(precision="bf16" if device.type == "cuda" else "fp32"), device)
    full = dict(config.schema.sequences)
    batches = [
        {k: v.to(device) for k, v in make_batch(config, batch_size, lens=full, seed=seed + i).items()}
        for i in range(N_BATCHES)
    ]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stats = learner.step(batches[i % N_BATCHES])
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
            losses.append(stats["loss"])
    step_ms = statistics.median(times)
    tflops = prof.train_flops / (step_ms / 1000) / 1e12
    row = {
        "preset": preset,
        "arch": arch,
        "batch_size": batch_size,
        "precision": "bf16" if learner.bf16 else "fp32",
        "config": config.to_dict(),
        "dense_params": prof.dense_params,
        "sparse_params": prof.sparse_params,
        "train_gflops_per_step": prof.train_flops / 1e9,
        "step_ms": step_ms,
        "samples_per_s": batch_size / (step_ms / 1000),
        "achieved_tflops": tflops,
        "mfu": tflops / peak_tflops if cuda else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
        "times_ms": times,
        "losses": losses,
    }
    del learner, model, batches
    if cuda:
        gc.collect()  # the optimisers and their LR schedule reference each other
        torch.cuda.empty_cache()
    return row


def run_steps(
    presets: list[str],
    archs: list[str],
    device: torch.device,
    batch_size: int,
    paper_batch_size: int,
    steps: int,
    warmup: int,
    peak_tflops: float,
) -> list[dict[str, Any]]:
    """One step_row per preset and architecture (the paper preset at paper_batch_size)."""
    rows = []
    for preset in presets:
        bs = paper_batch_size if preset == "paper" else batch_size
        for arch in archs:
            t0 = time.perf_counter()
            row = step_row(preset, arch, bs, device, steps, warmup, peak_tflops)
            rows.append(row)
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
            log.info(
                "throughput: %s %s batch %d: %.1f ms/step, %.0f samples/s, %.3g TFLOP/s%s [%.0f s]",
                preset,
                arch,
                bs,
                row["step_ms"],
                row["samples_per_s"],
                row["achieved_tflops"],
                mfu,
                time.perf_counter() - t0,
            )
    return rows


# --- workers: the Ray job end to end -----------------------------------------------------------------------------


def build_window(work: str, scale: float, days: int) -> tuple[FeatureSet, dict[str, Any]]:
    """Synthetic logs (cached in `work`), ingest and the feature window of `days` days ending at END (incremental)."""
    cfg = SynthConfig.demo(days, scale)
    data = f"{work}/data"
    synthesize_cached(cfg, data, END)
    t0 = time.perf_counter()
    ingest(data, END, days)
    fs = build_features(data, END, days, WORKERS_FEATURES)
    info = {
        "synth": dataclasses.asdict(cfg),
        "days": days,
        "samples": fs.samples,
        "ingest_and_build_seconds": time.perf_counter() - t0,
    }
    return fs, info


def train_run(fs: FeatureSet, mode: str, seed: int, epochs: int, batch_size: int, storage: str) -> dict[str, Any]:
    """One jobs.train.train run with `WORKERS` CPU workers; its throughput and last-epoch metrics."""
    tc = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        workers=WORKERS,
        cpus_per_worker=1,
        optim=OptimConfig(grad_sync=mode),
        seed=seed,
        model=WORKERS_MODEL,
    )
    name = f"throughput-{mode}-seed{seed}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    res = train(fs, tc, storage, name)
    wall = time.perf_counter() - t0
    shutil.rmtree(f"{storage}/{name}", ignore_errors=True)  # checkpoints are not needed
    # per epoch: each worker trains train_samples / WORKERS samples in batches of batch_size (the last one partial)
    steps = [math.ceil(h["train_samples"] / WORKERS / batch_size) for h in res.history]
    samples, seconds = sum(h["train_samples"] for h in res.history), sum(h["train_seconds"] for h in res.history)
    last = res.metrics
    run = {
        "grad_sync": mode,
        "seed": seed,
        "steps": sum(steps),
        "train_samples": samples,
        "train_seconds": seconds,
        "samples_per_s": samples / seconds,
        "step_ms": 1000 * seconds / sum(steps),
        "wall_s": wall,  # the whole train() call: Ray Train start-up, every epoch and its evaluation
        "epochs": [
            {"steps": n} | {k: h[k] for k in ("samples_per_s", "train_seconds", "train_loss")}
            for n, h in zip(steps, res.history)
        ],
    }
    run |= {k: last[k] for k in (*EVAL_KEYS, "eval_rows")}
    log.info(
        "throughput: %s seed %d: %.0f samples/s, %.1f ms/step, AUC %.4f, query AUC %.4f (oracle %.4f) [%.0f s]",
        mode,
        seed,
        run["samples_per_s"],
        run["step_ms"],
        run["eval_auc"],
        run["eval_query_auc"],
        run["eval_oracle_query_auc"],
        wall,
    )
    return run


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per mode and SUMMARY_KEYS: mean and sample std over the seeds (std None for one seed)."""
    out = {}
    for mode in MODES:
        rows = [r for r in runs if r["grad_sync"] == mode]
        out[mode] = {
            k: {
                "mean": statistics.fmean(r[k] for r in rows),
                "std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else None,
            }
            for k in SUMMARY_KEYS
        }
    return out


def run_workers(work: str, scale: float, days: int, epochs: int, batch_size: int, seeds: int) -> dict[str, Any]:
    """The workers part (module doc) on a local Ray cluster: the window, then both modes for every seed."""
    init_ray(num_cpus=4)
    fs, info = build_window(work, scale, days)
    runs = [train_run(fs, mode, seed, epochs, batch_size, f"{work}/train") for seed in range(seeds) for mode in MODES]
    ray.shutdown()
    return {
        "window": info | {"features": fs.cfg.to_dict()},
        "workers": WORKERS,
        "cpus_per_worker": 1,
        "ray_num_cpus": 4,
        "batch_size_per_worker": batch_size,
        "epochs": epochs,
        "seeds": seeds,
        "model_overrides": WORKERS_MODEL,
        "runs": runs,
        "summary": summarize(runs),
    }


# --- output ------------------------------------------------------------------------------------------------------


def fmt(stat: dict[str, float | None], spec: str) -> str:
    """ "mean" or "mean ± std" of a summarize() entry."""
    return f"{stat['mean']:{spec}}" + ("" if stat["std"] is None else f" ± {stat['std']:{spec}}")


def table(res: dict[str, Any]) -> str:
    """The Markdown of the results: one table per part."""
    m = res["machine"]
    where = m.get("gpu", f"{m['cpu_count']} CPU cores, {m['torch_threads']} torch threads")
    lines = [
        f"Training throughput on {m['node']} ({where}; torch {m['torch']}, Ray {m['ray']}; 1-min load average "
        f"{m['loadavg_1min']:.1f} at start, {m['loadavg_1min_end']:.1f} at end).",
        "",
    ]
    if "step" in res:
        s = res["step"]
        cuda = s["device"].startswith("cuda")
        unit, scale = ("TFLOP", 1.0) if cuda else ("GFLOP", 1e3)  # achieved FLOP/s
        lines += [
            f"One process, `hyformer.training.Learner` steps on {s['device']}, "
            "random batches with full-length sequences: "
            f"median of {s['steps']} steps after {s['warmup']} warm-up. GFLOPs = forward + backward matrix products "
            f"(`hyformer.profile`)" + (f"; MFU against {s['peak_tflops']:g} TFLOP/s." if cuda else "."),
            "",
            "| preset | architecture | batch | precision | dense params (M) | GFLOPs/step | step ms | samples/s "
            f"| {unit}/s | MFU |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in s["rows"]:
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(
                f"| {r['preset']} | {r['arch']} | {r['batch_size']} | {r['precision']} | "
                f"{r['dense_params'] / 1e6:.2f} | "
                f"{r['train_gflops_per_step']:.3g} | {r['step_ms']:.1f} | {r['samples_per_s']:,.0f} | "
                f"{r['achieved_tflops'] * scale:.1f} | {mfu} |"
            )
        lines.append("")
    if "workers" in res:
        w = res["workers"]
        win = w["window"]
        lines += [
            f"`jobs.train` end to end: {w['workers']} CPU workers x {w['cpus_per_worker']} CPU (local Ray, "
            f"{w['ray_num_cpus']} logical CPUs), batch {w['batch_size_per_worker']} per worker, "
            f"{w['epochs']} epoch(s), "
            f"{win['days']}-day window ({win['samples']:,} samples, last day held out), "
            f"model {json.dumps(w['model_overrides'])}; "
            f"{w['seeds']} seed(s){', mean ± std' if w['seeds'] > 1 else ''}.",
            "",
            "| grad sync | samples/s | step ms | eval AUC | query AUC | logloss | oracle query AUC |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for mode, st in w["summary"].items():
            lines.append(
                f"| {mode} | {fmt(st['samples_per_s'], ',.0f')} | {fmt(st['step_ms'], '.1f')} | "
                f"{fmt(st['eval_auc'], '.4f')} | {fmt(st['eval_query_auc'], '.4f')} | "
                f"{fmt(st['eval_logloss'], '.4f')} | "
                f"{fmt(st['eval_oracle_query_auc'], '.4f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of step,workers")
    p.add_argument("--device", default="cpu", help='step part: "cpu" or "cuda" (the workers part runs on the CPU)')
    p.add_argument("--presets", default=None, help="step part: presets (default tiny,small; + paper on cuda)")
    p.add_argument(
        "--archs", default="hyformer,longer-rankmixer", help="step part: hyformer.zoo architectures per preset"
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="tiny/small step batch, and the workers' batch per worker"
    )
    p.add_argument("--paper-batch-size", type=int, default=512, help="step batch of the paper preset")
    p.add_argument("--steps", type=int, default=20, help="timed steps per step row (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per step row")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak FLOP/s for MFU (default: H100 SXM dense bf16)"
    )
    p.add_argument("--scale", type=float, default=1.0, help="workers part: multiplies the synthetic per-day traffic")
    p.add_argument("--days", type=int, default=70, help="workers part: window length in days (the last is held out)")
    p.add_argument("--epochs", type=int, default=2, help="workers part: training epochs per run")
    p.add_argument("--seeds", type=int, default=1, help="workers part: runs per mode (seeds 0..n-1)")
    p.add_argument("--work", default="/tmp/hyformer-bench-throughput", help="scratch folder (synthetic data is cached)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder for the results")
    p.add_argument("--name", default="throughput", help="file stem: <out>/<name>.json and .md")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"--parts: choose from {PARTS}, got {a.parts!r}")
    if a.presets and set(a.presets.split(",")) - set(PRESETS):
        p.error(f"--presets: choose from {sorted(PRESETS)}, got {a.presets!r}")
    if set(a.archs.split(",")) - set(ARCHITECTURES):
        p.error(f"--archs: choose from {sorted(ARCHITECTURES)}, got {a.archs!r}")
    setup_logging()
    device = torch.device(a.device)
    res: dict[str, Any] = {"machine": machine_info(device) | {"ray": ray.__version__}, "parts": parts}
    if "step" in parts:
        presets = (
            a.presets.split(",") if a.presets else ["tiny", "small"] + (["paper"] if device.type == "cuda" else [])
        )
        archs = a.archs.split(",")
        res["step"] = {
            "device": str(device),
            "steps": a.steps,
            "warmup": a.warmup,
            "peak_tflops": a.peak_tflops,
            "rows": run_steps(
                presets, archs, device, a.batch_size, a.paper_batch_size, a.steps, a.warmup, a.peak_tflops
            ),
        }
    if "workers" in parts:
        res["workers"] = run_workers(a.work, a.scale, a.days, a.epochs, a.batch_size, a.seeds)
    res["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    write_results(a.out, a.name, res, table(res))


if __name__ == "__main__":
    main()

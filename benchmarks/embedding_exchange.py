"""Embedding gradient exchange between data-parallel workers (issue #17): the whole table all-reduced (dense) vs only
the rows a step touched (``hyformer.training.RowExchange``), at 10^5 / 10^6 / 10^7 rows.

    python -m benchmarks.embedding_exchange                       # 2 gloo workers on this machine
    python -m benchmarks.embedding_exchange --rows 100000 --steps 3   # a quick run

Two processes (torch.distributed, gloo, 127.0.0.1) each hold one embedding table of ``rows`` x ``dim`` (fp32) and, per
step, look up a batch of ``batch`` samples x ``ids`` ids drawn from a Zipf-like distribution (popular ids repeat, as
in logs), so the gradient touches a few thousand rows. Per table size: bytes each worker sends per step (ring
all-reduce of the table vs ring all-gather of ids + touched rows, from the tensor sizes) and the measured wall ms of
each exchange (median of ``steps``); the two results are checked equal.
Writes ``benchmarks/results/embedding_exchange.json`` and ``.md``. Numbers are for the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.common import write_results
from hyformer.training import RowExchange


def touched_ids(rows: int, batch: int, ids: int, seed: int) -> torch.Tensor:
    """A batch's ids: Zipf-like over the table (id k drawn with weight 1/(k+1)), shuffled per table size."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch * ids, generator=g)
    k = torch.exp(u * torch.log(torch.tensor(float(rows)))).long().clamp(max=rows) - 1  # P(k) ~ 1/(k+1)
    return (k * 2_654_435_761) % rows  # spread the popular ids over the table


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = []
    for rows in args.rows:
        table = nn.Embedding(rows, args.dim)
        dense_ms, sparse_ms, sent, dense_bytes, touched = [], [], [], [], []
        for step in range(args.steps):
            ids = touched_ids(rows, args.batch, args.ids, seed=1000 * step + rank)
            table.weight.grad = None
            table(ids).square().mean().backward()
            grad = table.weight.grad.clone()
            touched.append(int((grad != 0).any(dim=1).sum()))
            dist.barrier()
            t = time.perf_counter()
            whole = grad.clone()
            dist.all_reduce(whole)
            whole /= world
            dense_ms.append((time.perf_counter() - t) * 1e3)
            exchange = RowExchange([table.weight])
            dist.barrier()
            t = time.perf_counter()
            exchange.exchange()
            sparse_ms.append((time.perf_counter() - t) * 1e3)
            if not torch.allclose(table.weight.grad, whole, atol=1e-7):
                raise AssertionError(f"rows={rows}: the row exchange differs from the all-reduce")
            sent.append(exchange.bytes_per_step)
            dense_bytes.append(exchange.dense_bytes_per_step)
        results.append(
            {
                "rows": rows,
                "dim": args.dim,
                "touched_rows_per_worker": statistics.median(touched),
                "dense_bytes_per_step": statistics.median(dense_bytes),
                "row_sparse_bytes_per_step": statistics.median(sent),
                "dense_ms": round(statistics.median(dense_ms), 2),
                "row_sparse_ms": round(statistics.median(sparse_ms), 2),
            }
        )
        del table
    if rank == 0:
        out["results"] = results
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    lines = [
        "| table rows | touched rows / worker / step | dense all-reduce MB / step | row-sparse MB / step | ratio | "
        "dense ms | row-sparse ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, s = r["dense_bytes_per_step"] / 1e6, r["row_sparse_bytes_per_step"] / 1e6
        lines.append(
            f"| {r['rows']:,} | {r['touched_rows_per_worker']:,.0f} | {d:.2f} | {s:.3f} | {d / max(s, 1e-12):.0f}x | "
            f"{r['dense_ms']:.1f} | {r['row_sparse_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from jobs.common import free_port

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="100000,1000000,10000000", help="table sizes (comma-separated)")
    p.add_argument("--dim", type=int, default=16, help="embedding width")
    p.add_argument("--batch", type=int, default=256, help="samples per worker and step")
    p.add_argument("--ids", type=int, default=64, help="ids of the table per sample (its sequence + features)")
    p.add_argument("--steps", type=int, default=5, help="steps per size (median reported)")
    p.add_argument("--world", type=int, default=2, help="worker processes")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    a.rows = [int(r) for r in a.rows.split(",")]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(a.world, free_port(), a, out), nprocs=a.world, join=True)
        results = list(out["results"])
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "date": dt.date.today().isoformat(),
        "world": a.world,
        "batch": a.batch,
        "ids_per_sample": a.ids,
    }
    md = (
        f"# Embedding gradient exchange: dense all-reduce vs row-sparse ({a.world} gloo workers, fp32, dim {a.dim})\n\n"
        f"{meta['machine']}, {meta['cpus']} CPUs, {meta['date']}; batch {a.batch} x {a.ids} Zipf-like ids per worker "
        "and step; bytes each worker sends per step (ring algorithms); `python -m benchmarks.embedding_exchange`.\n\n"
        + table(results)
    )
    write_results(a.out, "embedding_exchange", {"meta": meta, "results": results}, md)


if __name__ == "__main__":
    main()

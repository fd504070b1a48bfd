"""Online serving under load: the Ray Serve application (jobs/serve.py) on 127.0.0.1, p50/p99 latency and requests/s.

    python -m benchmarks.serving                       # ~3 min on 2 CPU cores: demo model, 10 and 200 candidates,
                                                       # KV reuse on and off, 200 requests each (or 60 s)
    python -m benchmarks.serving --requests 50 --candidates 10      # a quick run
    python -m benchmarks.serving --gpu --name serving_cuda          # one GPU per replica (a machine with one)

Setup (cached between runs): small synthetic logs (features.synth), ingested and built into features on local Ray,
a model of the ``--preset`` (the README's demo model by default) registered in an MLflow store inside the data folder
with alias ``champion``, and its online feature source published (jobs.online). The weights are the initial ones:
latency does not depend on what the model learned. Then for each KV-reuse setting the application is deployed
(``serve.run``, HTTP on 127.0.0.1), and for each candidate count a fixed set of requests (real users of the last day,
their histories in the source, ``m`` random items each) is sent by ``--concurrency`` client threads after
``--warmup`` untimed ones, stopping at ``--requests`` or ``--max-seconds``. Reported per case: p50 / p99 / mean
latency (ms, client side, HTTP included), requests/s and candidates/s over the timed part, the deployment's batch
settings, and, in this process without HTTP, the median ms of one request's featurisation and of its featurisation +
forward (one torch thread): where the time goes. The clients, Serve's HTTP proxy and the replica share the machine's
cores: on 2 cores concurrent requests reach the replica one after another, batches stay small, and the numbers are a
lower bound on what a server with cores of its own does.

Writes ``benchmarks/results/<name>.json`` (every number and the setup) and ``<name>.md`` (a table), ``--name``
defaulting to ``serving``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.common import synthesize_cached, write_results
from features.build import FeatureConfig
from features.synth import SynthConfig
from hyformer import build_model
from jobs.build_features import FeatureSet
from jobs.experiment import MODEL_PRESETS
from jobs.ingest import clean_files
from jobs.online import publish_source
from jobs.register import log_training_run
from jobs.train import model_config

END = dt.date(2026, 11, 22)
SYNTH = dict(days=14, users=1000, items=3000, queries=400, requests_per_day=200)
FEATURES = FeatureConfig(long_len=256, search_len=50, feed_len=50, n_shards=2)


def register_initial(
    data_dir: str, fs: FeatureSet, overrides: dict, seed: int, source: str, name: str = "hyformer"
) -> str:
    """Register a model of ``overrides`` for ``fs`` with its initial weights (``seed``) and ``source`` as its online
    feature source, in ``data_dir``'s MLflow store; returns the version."""
    torch.manual_seed(seed)
    model = build_model(model_config(fs, overrides)).eval()
    ckpt = Path(data_dir) / "checkpoints" / f"{name}-seed{seed}"
    model.save(ckpt)
    configs = {"model": model.config.to_dict(), "features": fs.cfg.to_dict()}
    tags = {"date": fs.days[-1], "window_days": str(len(fs.days))}
    _, version = log_training_run(
        data_dir, f"serving-{name}-{seed}", str(ckpt), [], configs, tags=tags, register_as=name, online_source=source
    )
    return str(version)


def requests_of(data_dir: str, fs: FeatureSet, m: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` JSON requests of the last day's users (search and feed, as logged) with ``m`` random items each."""
    imps = pl.read_parquet(clean_files(data_dir, "impressions", fs.days[-1]))
    reqs = imps.group_by("request_id").agg(pl.all().first()).sort("request_id")
    items = pl.read_parquet(clean_files(data_dir, "items"))["item_id"].to_numpy()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = reqs.row(i % reqs.height, named=True)
        body = {k: r[k] for k in ("user_id", "ts", "device_type", "network_type") if r[k] is not None}
        if r["query_id"] is not None:
            body["query_id"] = r["query_id"]
        body["candidates"] = rng.choice(items, m, replace=False).tolist()
        out.append(body)
    return out


def setup(data: str, preset: str) -> tuple[FeatureSet, str]:
    """Logs and features (cached), a registered champion of ``preset`` and its online source in ``data``; the
    version."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    from jobs.build_features import build_features  # noqa: PLC0415 - Ray Data
    from jobs.ingest import ingest  # noqa: PLC0415

    cfg = dataclasses.replace(SynthConfig(), **SYNTH)
    synthesize_cached(cfg, data, END)
    ingest(data, END, cfg.days)
    fs = build_features(data, END, cfg.days, FEATURES)
    source = publish_source(data, fs)["root"]
    # a new version each run: a registered model carries its code (jobs/pyfunc.py, features/, hyformer/)
    version = register_initial(data, fs, MODEL_PRESETS[preset], seed=0, source=source)
    MlflowClient().set_registered_model_alias("hyformer", "champion", version)
    return fs, version


def load(url: str, bodies: list[dict], concurrency: int, warmup: int, max_seconds: float) -> dict[str, float]:
    """POST ``bodies`` (the first ``warmup`` untimed) with ``concurrency`` threads; latency percentiles and rates."""
    import requests  # noqa: PLC0415 - the HTTP client

    local = threading.local()

    def post(body: dict) -> float:
        if not hasattr(local, "session"):  # one keep-alive connection per client thread
            local.session = requests.Session()
        t0 = time.perf_counter()
        r = local.session.post(url, json=body, timeout=60)
        r.raise_for_status()
        return time.perf_counter() - t0

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, bodies[:warmup]))
        deadline = time.perf_counter() + max_seconds
        t0 = time.perf_counter()
        futures = []
        for b in bodies[warmup:]:
            if time.perf_counter() > deadline:
                break
            futures.append(pool.submit(post, b))
            while sum(not f.done() for f in futures) >= 2 * concurrency:  # bounded queue: stop on time
                time.sleep(0.0005)
        lat = np.array([f.result() for f in futures]) * 1000
        wall = time.perf_counter() - t0
    m = len(bodies[0]["candidates"])
    return {
        "requests": len(lat),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
        "requests_per_s": len(lat) / wall,
        "candidates_per_s": len(lat) * m / wall,
        "wall_s": wall,
    }


def in_process(data: str, fs: FeatureSet, m: int, kv_reuse: bool, repeats: int = 20) -> dict[str, float]:
    """Median ms of one request of ``m`` candidates in this process (no HTTP): featurisation alone, and scoring
    (featurisation + forward), with the registered champion's RequestRanker on one torch thread."""
    import mlflow  # noqa: PLC0415

    from features.online import featurize  # noqa: PLC0415
    from jobs.register import use_tracking  # noqa: PLC0415
    from jobs.serve import request_rows  # noqa: PLC0415

    use_tracking(data)
    ranker = mlflow.pyfunc.load_model("models:/hyformer@champion").unwrap_python_model().ranker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    feat, total = [], []
    for body in requests_of(data, fs, m, repeats + 3, seed=7 * m):
        rows, _ = request_rows([body], 0)
        t0 = time.perf_counter()
        featurize(ranker.source(), ranker.features, rows, ranker.spec)
        t1 = time.perf_counter()
        ranker.score(rows, kv_reuse)
        feat.append(t1 - t0)
        total.append(time.perf_counter() - t1)
    torch.set_num_threads(threads)
    return {"featurize_ms": float(np.median(feat[3:]) * 1000), "score_ms": float(np.median(total[3:]) * 1000)}


def run(data: str, args: argparse.Namespace) -> dict[str, Any]:
    """Deploy once per KV-reuse setting and load it with each candidate count."""
    from ray import serve  # noqa: PLC0415

    from jobs.common import free_port, init_ray  # noqa: PLC0415
    from jobs.serve import build_app  # noqa: PLC0415

    fs, version = setup(data, args.preset)
    init_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cases = []
    try:
        for kv in (True, False):
            app_args = {"data_dir": data, "kv_reuse": kv, "threads": args.threads, "gpu": args.gpu}
            app_args |= {"max_batch_size": args.max_batch_size}
            serve.run(build_app(app_args), name="hyformer", route_prefix="/rank")
            for m in args.candidates:
                bodies = requests_of(data, fs, m, args.warmup + args.requests, seed=m)
                res = load(f"http://127.0.0.1:{port}/rank", bodies, args.concurrency, args.warmup, args.max_seconds)
                cases.append({"kv_reuse": kv, "candidates": m, **res, **in_process(data, fs, m, kv)})
                print(json.dumps(cases[-1]), flush=True)
            serve.delete("hyformer")
    finally:
        serve.shutdown()
    return {
        "cases": cases,
        "model_version": version,
        "preset": args.preset,
        "features": {k: getattr(FEATURES, k) for k in ("long_len", "search_len", "feed_len")},
        "concurrency": args.concurrency,
        "max_batch_size": args.max_batch_size,
        "threads": args.threads,
        "gpu": args.gpu,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def table(res: dict[str, Any]) -> str:
    lines = [
        f"Ray Serve on 127.0.0.1, {res['preset']} model, sequences {res['features']}, {res['concurrency']} client "
        f"threads, batches of <= {res['max_batch_size']}, {res['machine']['cpus']} CPUs"
        + (", GPU" if res["gpu"] else "")
        + ":",
        "",
        "| candidates | KV reuse | requests | p50 ms | p99 ms | requests/s | candidates/s | in process: features ms "
        "| in process: features + model ms |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(res["cases"], key=lambda c: (c["candidates"], not c["kv_reuse"])):
        lines.append(
            f"| {c['candidates']} | {'yes' if c['kv_reuse'] else 'no'} | {c['requests']} | {c['p50_ms']:.1f} | "
            f"{c['p99_ms']:.1f} | {c['requests_per_s']:.1f} | {c['candidates_per_s']:.0f} | {c['featurize_ms']:.1f} | "
            f"{c['score_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Load test of the Ray Serve application on 127.0.0.1.")
    p.add_argument("--data", default="/tmp/hyformer-bench-serving", help="cached setup folder")
    p.add_argument("--preset", default="demo", choices=list(MODEL_PRESETS))
    p.add_argument("--candidates", type=lambda s: [int(x) for x in s.split(",")], default=[10, 200])
    p.add_argument("--requests", type=int, default=200, help="timed requests per case")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per case: stop sending after this long")
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="serving")
    a = p.parse_args(argv)
    res = run(os.path.abspath(a.data), a)
    write_results(a.out, a.name, res, table(res))


if __name__ == "__main__":
    main()

"""Batch scoring with a registered model: Ray Data ``map_batches`` over one day's samples -> Parquet of click scores.

    python -m jobs.score --data-dir /abs/data --model models:/hyformer@champion --date 2026-11-22
    python -m jobs.score --data-dir /abs/data --model models:/hyformer/3 --date 2026-11-22 --out /abs/scores

The model version carries the feature config it was trained on (jobs/pyfunc.py), so the day is scored with the same
store, vocabularies, sequence lengths and side info; the day (and the window before it, which its sequences read)
must be built (the daily workflow does that). Each actor of the pool holds the model and the window's events (put
once into the object store); per batch it materializes the dedup ID tables (as training does) and scores every request's
candidates with KV reuse (hyformer/serving.py): one sequence encoding per request. Output, one row per sample:
``request_id, user_id, item_id, ts, label, p_click, prob`` (``p_click``: the synthetic ground truth, NaN for real logs),
written under a new version of the output folder and committed by its ``_manifest.json`` (``features.storage``), once
the row count is checked against the day's samples; a local folder or an ``s3://`` URI.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from features import storage
from features.build import FeatureConfig
from features.materialize import Materializer
from features.schema import DAY_FORMAT, parse_day
from hyformer import HyFormerConfig, build_model
from hyformer.serving import predict_requests
from jobs.build_features import FeatureSet, store_root
from jobs.common import init_ray, log, setup_logging
from jobs.lease import cli_lock

OUTPUT_COLUMNS = ("request_id", "user_id", "item_id", "ts", "label", "p_click", "prob")


@dataclass(frozen=True)
class ScoreResult:
    path: str  # folder of Parquet files
    rows: int
    requests: int  # distinct requests (= sequence encodings with KV reuse)
    seconds: float


class Scorer:
    """A Ray Data actor: stored samples -> click probabilities (one model and the window's events per actor)."""

    def __init__(
        self, model: tuple[dict, dict], timelines, features: dict, kv_reuse: bool, threads: int, gpu: bool = False
    ):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
        config, state = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.model = build_model(HyFormerConfig.from_dict(config))
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.materialize = Materializer(
            ray.get(timelines) if isinstance(timelines, ray.ObjectRef) else timelines, FeatureConfig(**features)
        )
        self.kv_reuse = kv_reuse

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in self.materialize(batch).items()}
        with torch.no_grad():
            logits = predict_requests(self.model, inputs)[0] if self.kv_reuse else self.model(inputs)
        return {
            "request_id": batch["request_id"].astype(np.int64),
            "user_id": batch["user_id"].astype(np.int64),
            "item_id": batch["ns_item_id"].astype(np.int64),
            "ts": batch["ts"].astype(np.int64),
            "label": batch["label"].astype(np.float32),
            "p_click": inputs["p_click"].cpu().numpy(),
            "prob": torch.sigmoid(logits.float()).cpu().numpy(),
        }


def scoring_window(data_dir: str, features: dict, date: str, days: int) -> FeatureSet:
    """The built window of ``days`` days ending at ``date`` in the store of ``features`` (a FeatureConfig dict)."""
    cfg = FeatureConfig(**features)
    path = f"{store_root(data_dir, cfg)}/window-{date}-{days}d.json"
    if not storage.exists(path):
        raise FileNotFoundError(
            f"no built feature window {path}: build day {date} first (workflows/daily_train.py or jobs.build_features)"
        )
    fs = FeatureSet.load(path)
    return FeatureSet(fs.root, cfg, fs.days, fs.samples)  # the model's read side (lengths, side info), the store's days


def score(
    fs: FeatureSet,
    model: torch.nn.Module,
    out_dir: str,
    days: list[str] | None = None,
    batch_size: int = 1024,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    kv_reuse: bool = True,
    gpu: bool = False,
) -> ScoreResult:
    """Score the samples of ``days`` (default: the window's last day) with ``model``; Parquet files into ``out_dir``.
    ``gpu``: each actor takes one GPU and scores on it."""
    days = list(days or fs.days[-1:])
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(fs.sample_files(days), partitioning=None).drop_columns(["day"])
    expected = storage.num_rows(fs.sample_files(days))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kwargs = {
        "model": ray.put((model.config.to_dict(), state)),
        "timelines": ray.put(fs.timelines()),
        "features": fs.cfg.to_dict(),
        "kv_reuse": kv_reuse,
        "threads": max(1, int(cpus_per_actor)),
        "gpu": gpu,
    }
    pool = ray.data.ActorPoolStrategy(size=actors)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        compute=pool,
        num_cpus=cpus_per_actor,
        num_gpus=1 if gpu else 0,
        batch_format="numpy",
    )
    out_dir, version = storage.absolute(out_dir), storage.new_version()
    filesystem, inner = storage.resolve(storage.join(out_dir, version))
    scored.write_parquet(inner, filesystem=filesystem)
    files = storage.list_files(storage.join(out_dir, version))
    rows, requests = 0, set()
    for f in files:
        ids = storage.read_parquet([f], columns=["request_id"])["request_id"]
        rows += len(ids)
        requests.update(ids.to_list())
    if rows != expected:
        raise RuntimeError(f"score: wrote {rows} rows for {expected} samples of days {days}")
    storage.publish(out_dir, {"version": version, "files": [storage.name(f) for f in files], "rows": rows})
    storage.collect_garbage(out_dir)
    res = ScoreResult(out_dir, rows, len(requests), time.perf_counter() - t0)
    log.info(
        "score: %d rows (%d requests) of %s in %.1f s -> %s", rows, len(requests), ",".join(days), res.seconds, out_dir
    )
    return res


def read_scores(path: str) -> dict[str, np.ndarray]:
    """The scores written by ``score`` as numpy columns (the keys of jobs.evaluate.metrics: label, prob, request_id,
    p_click)."""
    t = storage.read_parquet(storage.current_files(path))
    return {c: t[c].to_numpy() for c in OUTPUT_COLUMNS}


def main(argv: list[str] | None = None) -> None:
    from jobs.register import load_registered  # noqa: PLC0415 - MLflow at the edge

    p = argparse.ArgumentParser(
        description="Score one day's samples with a registered model (Ray Data, KV reuse); Parquet out."
    )
    p.add_argument("--data-dir", default="data")
    p.add_argument(
        "--model", default="models:/hyformer@champion", help="models:/<name>@<alias> or models:/<name>/<version>"
    )
    p.add_argument("--date", required=True, type=parse_day, help="the day to score (its feature window must be built)")
    p.add_argument(
        "--days",
        type=int,
        default=None,
        help="window length the day's sequences read (default: the model's training window)",
    )
    p.add_argument("--out", default=None, help="output folder (default <data>/scores/<model>/<date>)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--no-kv-reuse", action="store_true", help="a plain forward per row (for comparison)")
    a = p.parse_args(argv)
    setup_logging()
    data_dir = storage.absolute(a.data_dir)
    init_ray()
    with tempfile.TemporaryDirectory(prefix="hyformer-model-") as tmp:  # the download: local scratch
        reg = load_registered(data_dir, a.model, tmp)
    day = a.date.strftime(DAY_FORMAT)
    fs = scoring_window(data_dir, reg.features, day, a.days or reg.window_days)
    out = a.out or f"{data_dir}/scores/{reg.name}-v{reg.version}/{day}"
    with cli_lock(data_dir):
        res = score(
            fs,
            reg.model,
            out,
            batch_size=a.batch_size,
            actors=a.actors,
            cpus_per_actor=a.cpus_per_actor,
            kv_reuse=not a.no_kv_reuse,
            gpu=a.gpu,
        )
    print(
        json.dumps(
            {
                "model": f"{reg.name}/{reg.version}",
                "day": day,
                "path": res.path,
                "rows": res.rows,
                "requests": res.requests,
            }
        )
    )


if __name__ == "__main__":
    main()

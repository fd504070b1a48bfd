"""Batch scoring with a registered model: one Ray task per slice of the users -> Parquet of click scores.

    python -m jobs.score --data-dir /abs/data --model models:/hyformer@champion --date 2026-11-22
    python -m jobs.score --data-dir /abs/data --model models:/hyformer/3 --date 2026-11-22 --out /abs/scores

The model version carries the feature config it was trained on (jobs/pyfunc.py), so the day is scored with the same
store, vocabularies, sequence lengths and side info; the day (and the window before it, which its sequences read)
must be built (the daily workflow does that). ``--actors N`` tasks each own a slice of the users
(features.shards.UserSlice, as training's workers do) and read their users' events of the window and samples of the
day from storage; the driver holds only the model, the days' pointers and the counts. Per batch a task materializes
the dedup ID tables (as training does) and scores every request's candidates with KV reuse (hyformer/serving.py): one
sequence encoding per request. Output, one row per sample:
``request_id, user_id, item_id, ts, label, p_click, prob`` (``p_click``: the synthetic ground truth, NaN for real logs),
one file per piece (day x shard) of each slice, written under a new version of the output folder and committed by its
``_manifest.json`` (``features.storage``) once the row count is checked against the day's samples; a local folder or
an ``s3://`` URI.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from features import storage
from features.build import FeatureConfig
from features.materialize import Materializer, Timelines
from features.schema import DAY_FORMAT, parse_day
from features.shards import Layout, Samples, UserSlice
from hyformer import HyFormerConfig, build_model
from hyformer.serving import predict_requests
from jobs.build_features import FeatureSet, store_root
from jobs.common import init_ray, log, setup_logging
from jobs.lease import cli_lock
from jobs.progress import Progress

OUTPUT_COLUMNS = ("request_id", "user_id", "item_id", "ts", "label", "p_click", "prob")


@dataclass(frozen=True)
class ScoreResult:
    path: str  # folder of Parquet files
    rows: int
    requests: int  # distinct requests (= sequence encodings with KV reuse)
    seconds: float


class Scorer:
    """Stored samples -> click probabilities, with one model and the events of the users it scores."""

    def __init__(
        self,
        model: tuple[dict, dict],
        timelines: Timelines,
        features: dict,
        kv_reuse: bool,
        threads: int,
        gpu: bool = False,
    ):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
        config, state = model
        self.model = build_model(HyFormerConfig.from_dict(config))
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.materialize = Materializer(timelines, FeatureConfig(**features))
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


@ray.remote
def score_slice(
    layout: Layout,
    owner: UserSlice,
    days: list[str],
    model: tuple[dict, dict],
    out: str,
    features: dict,
    kv_reuse: bool,
    threads: int,
    gpu: bool,
    batch_size: int,
) -> dict[str, Any]:
    """One task: ``owner``'s samples of ``days`` scored, one Parquet file per piece (day x shard) under ``out``; its
    rows, requests (a request is whole in one slice and one day) and file names."""
    scorer = Scorer(model, layout.timelines(owner), features, kv_reuse, threads, gpu)
    rows, requests, files = 0, 0, []
    for i, piece in enumerate(layout.pieces("samples", days, owner)):
        scored = [scorer(b) for b in Samples([piece]).in_order(batch_size)]
        if not scored:
            continue
        columns = {c: np.concatenate([b[c] for b in scored]) for c in OUTPUT_COLUMNS}
        name = f"part-{owner.rank:04d}-{i:04d}.parquet"
        storage.write_parquet(pa.table(columns), storage.join(out, name))
        rows, requests = rows + len(columns["label"]), requests + len(np.unique(columns["request_id"]))
        files.append(name)
    return {"rows": rows, "requests": requests, "files": files}


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
    ``actors``: parallel tasks, each scoring ~1/actors of the users; ``gpu``: each task takes one GPU and scores on
    it."""
    days = list(days or fs.days[-1:])
    if missing := sorted(set(days) - set(fs.days)):
        raise ValueError(f"score: days {missing} are not in the feature window {fs.days[0]}..{fs.days[-1]}")
    t0 = time.perf_counter()
    layout = fs.layout()  # the days' pointers: each task reads its own users' files (features.shards)
    expected = storage.num_rows(layout.files("samples", days))  # Parquet footers only
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model_ref = ray.put((model.config.to_dict(), state))
    out_dir, version = storage.absolute(out_dir), storage.new_version()
    task = score_slice.options(num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)
    pending = [
        task.remote(
            layout,
            UserSlice(layout.n_shards, r, actors),
            days,
            model_ref,
            storage.join(out_dir, version),
            fs.cfg.to_dict(),
            kv_reuse,
            max(1, int(cpus_per_actor)),
            gpu,
            batch_size,
        )
        for r in range(actors)
    ]
    parts = []
    with Progress("score", total=actors, unit="user slices") as bar:
        while pending:  # as each slice is scored
            done, pending = ray.wait(pending, num_returns=1)
            parts += ray.get(done)
            bar.update(len(done))
    rows, requests = sum(p["rows"] for p in parts), sum(p["requests"] for p in parts)
    if rows != expected:
        raise RuntimeError(f"score: wrote {rows} rows for {expected} samples of days {days}")
    storage.publish(out_dir, {"version": version, "files": [f for p in parts for f in p["files"]], "rows": rows})
    storage.collect_garbage(out_dir)
    res = ScoreResult(out_dir, rows, requests, time.perf_counter() - t0)
    log.info("score: %d rows (%d requests) of %s in %.1f s -> %s", rows, requests, ",".join(days), res.seconds, out_dir)
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
    p.add_argument("--actors", type=int, default=1, help="parallel scoring tasks, each owning ~1/N of the users")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per scoring task")
    p.add_argument("--gpu", action="store_true", help="one GPU per scoring task")
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

"""Online ranking with Ray Serve: the champion, its online features, batched requests, KV reuse, alias reloads.

    serve run jobs.serve:build_app data_dir=$PWD/data            # local Ray; http://127.0.0.1:8000/rank
    serve deploy infra/serve/hyformer.yaml                        # a running cluster (ray start --head)
    curl -s 127.0.0.1:8000/rank -d '{"user_id": 42, "query_id": 7, "candidates": [101, 102, 103]}'

A request is one JSON object: ``user_id``, ``candidates`` (item ids, or objects with ``item_id`` and their own
columns, e.g. ``position``), and optionally ``ts`` (ms, default now), ``query_id`` (none: a feed request),
``device_type``, ``network_type`` and the impressions' extension columns of the model's feature spec. The answer:
``scores`` (click probabilities, in the order of the candidates), the ``model`` version that scored them, the
``source_day`` of the online features and ``fallbacks`` (the reasons, ``features.online.FALLBACKS``, that apply to
this request, e.g. ``no_history``). ``GET /rank`` returns the deployment's state: model, source, requests served and
fallback counts. A malformed request gets HTTP 400 naming the field.

Each replica loads the registered version the alias (``champion``) points to, with the request-level model of
jobs/pyfunc.py (``RequestRanker``: the training features' code on the online source, one sequence encoding per
request for all its candidates). ``serve.batch`` groups concurrent requests into one featurisation and one forward.
A thread polls the registry every ``poll_s`` seconds and swaps in the new version when the alias moves (requests in
flight finish on the old one); the online source is reloaded when a newer version of it is committed. HTTP binds to
127.0.0.1 (Serve's default; infra/serve/hyformer.yaml says so explicitly): put a gateway in front to expose it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from features.online import RequestError
from jobs.pyfunc import RequestRanker
from jobs.register import CHAMPION, MODEL_NAME, use_tracking

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeArgs:
    """The application's arguments (``serve run jobs.serve:build_app key=value ...`` or ``args`` in the config)."""

    data_dir: str  # the project's data directory (absolute): its MLflow store, unless MLFLOW_TRACKING_URI is set
    tracking_uri: str | None = None  # an MLflow tracking server (or store) instead of the data directory's
    model: str = MODEL_NAME  # registered model name
    alias: str = CHAMPION  # the alias to serve and follow
    poll_s: float = 10.0  # how often the registry is asked where the alias points
    kv_reuse: bool = True  # encode each request's sequences once for all its candidates
    max_batch_size: int = 16  # requests per batch (serve.batch)
    batch_wait_s: float = 0.002  # how long a batch waits to fill
    replicas: int = 1
    cpus: float = 1.0  # per replica
    threads: int = 1  # torch threads per replica
    gpu: bool = False  # one GPU per replica

    @staticmethod
    def parse(args: Mapping[str, Any]) -> ServeArgs:
        """From strings (the CLI's key=value) or typed values (a config file); unknown keys are an error."""
        known = {f.name: f for f in fields(ServeArgs)}
        if unknown := sorted(set(args) - set(known)):
            raise ValueError(f"unknown argument(s) {unknown} of jobs.serve:build_app; known: {sorted(known)}")
        out = {}
        for k, v in args.items():
            kind = known[k].type
            if kind == "str | None" and v in ("", "none", "None"):
                v = None
            elif kind == "bool" and isinstance(v, str):
                v = v.lower() in ("1", "true", "yes", "on")
            elif kind in ("int", "float"):
                v = {"int": int, "float": float}[kind](v)
            out[k] = v
        if "data_dir" not in out:
            raise ValueError("jobs.serve:build_app needs data_dir=<absolute path of the data directory>")
        return ServeArgs(**out)


def request_rows(bodies: list[Mapping[str, Any]], now_ms: int) -> tuple[pl.DataFrame, list[int]]:
    """JSON requests -> request rows (features.online: one per candidate, request ids 0..n-1) and the number of
    candidates of each. A RequestError names the request and field that is wrong."""
    rows: list[dict[str, Any]] = []
    counts = []
    for i, body in enumerate(bodies):
        if not isinstance(body, Mapping):
            raise RequestError(f"request {i}: a JSON object is expected, got {type(body).__name__}")
        cands = body.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise RequestError(f"request {i}: 'candidates' must be a non-empty list of item ids or objects")
        if "user_id" not in body:
            raise RequestError(f"request {i}: 'user_id' is missing")
        shared = {k: v for k, v in body.items() if k not in ("candidates", "request_id")}
        shared.setdefault("ts", now_ms)
        for c in cands:
            own = c if isinstance(c, Mapping) else {"item_id": c}
            rows.append({**shared, **own, "request_id": i})
        counts.append(len(cands))
    try:
        return pl.DataFrame(rows, infer_schema_length=None), counts
    except (TypeError, pl.exceptions.PolarsError) as e:
        raise RequestError(f"requests do not make a table of columns: {e}") from None


class Replica:
    """What a replica serves: the alias's current version and its RequestRanker (swapped as a whole)."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self.client = MlflowClient()
        self.current = self.load(self.alias_version())  # (version, ranker): replaced as one object, never mutated
        self.served, self.batches = 0, 0

    def alias_version(self) -> str:
        return str(self.client.get_model_version_by_alias(self.args.model, self.args.alias).version)

    def load(self, version: str) -> tuple[str, RequestRanker]:
        """Download a version and build its ranker (the artifact's checkpoint, its recorded online source)."""
        with tempfile.TemporaryDirectory(prefix=f"hyformer-serve-v{version}-") as dest:  # read into memory, then gone
            path = mlflow.artifacts.download_artifacts(f"models:/{self.args.model}/{version}", dst_path=dest)
            ranker = RequestRanker(Path(path) / "artifacts" / "checkpoint", None, "cuda" if self.args.gpu else "cpu")
        ranker.source()  # fail here, not on the first request, when the source is missing or does not fit
        log.info("serving %s/%s (source %s)", self.args.model, version, ranker.source_root)
        return version, ranker

    def follow(self, stop: threading.Event) -> None:
        """Swap in the version the alias points to whenever it moves (a failed load keeps the current one)."""
        while not stop.wait(self.args.poll_s):
            try:
                version = self.alias_version()
                if version != self.current[0]:
                    self.current = self.load(version)  # one reference swap: a batch uses the old pair or the new
            except Exception as e:  # noqa: BLE001 - the registry or a download failed: keep serving, retry later
                log.warning(
                    "alias %s@%s: reload failed (%s: %s)", self.args.model, self.args.alias, type(e).__name__, e
                )

    def rank(self, bodies: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        version, ranker = self.current  # one consistent pair for the whole batch
        rows, counts = request_rows(bodies, int(time.time() * 1000))
        scored = ranker.score(rows, self.args.kv_reuse)
        probs, source = scored.probs, scored.source  # the source these features came from
        reasons: dict[int, list[str]] = {}
        for reason, ids in scored.flagged.items():
            for i in ids.tolist():
                reasons.setdefault(i, []).append(reason)
        self.served, self.batches = self.served + len(bodies), self.batches + 1
        ends = np.cumsum(counts)
        return [
            {
                "scores": probs[e - n : e].tolist(),
                "model": f"{self.args.model}/{version}",
                "source_day": source["day"],
                "fallbacks": reasons.get(i, []),
            }
            for i, (n, e) in enumerate(zip(counts, ends))
        ]

    def stats(self) -> dict[str, Any]:
        version, ranker = self.current
        meta = ranker.source_meta()  # never waits for a source reload
        return {
            "model": f"{self.args.model}/{version}",
            "alias": self.args.alias,
            "source": {k: meta.get(k) for k in ("root", "version", "day", "exact_from_ts", "end_ts")},
            "requests": self.served,
            "batches": self.batches,
            "fallbacks": dict(ranker.fallbacks),  # since this version was loaded
            "kv_reuse": self.args.kv_reuse,
        }


@serve.deployment(max_ongoing_requests=256)
class Ranker:
    """The Serve deployment (module doc): POST a request, GET the state."""

    def __init__(self, args: dict[str, Any]):
        import torch  # noqa: PLC0415 - the replica's own threads

        self.args = ServeArgs(**args)
        torch.set_num_threads(self.args.threads)
        if self.args.tracking_uri:
            mlflow.set_tracking_uri(self.args.tracking_uri)
        else:
            use_tracking(self.args.data_dir)
        self.replica = Replica(self.args)
        self.stop = threading.Event()
        threading.Thread(target=self.replica.follow, args=(self.stop,), daemon=True).start()
        self.rank.set_max_batch_size(self.args.max_batch_size)
        self.rank.set_batch_wait_timeout_s(self.args.batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def rank(self, bodies: list[Any]) -> list[Any]:
        try:  # featurise and score off the event loop: the next batch can gather meanwhile
            return await asyncio.to_thread(self.replica.rank, bodies)
        except RequestError:
            if len(bodies) == 1:
                raise
            return [await asyncio.to_thread(self._one, b) for b in bodies]  # find which request is bad

    def _one(self, body: Any) -> Any:
        try:
            return self.replica.rank([body])[0]
        except RequestError as e:
            return e

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(self.replica.stats())
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            return JSONResponse({"error": f"not JSON: {e}"}, status_code=400)
        try:
            out = await self.rank(body)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if isinstance(out, RequestError):
            return JSONResponse({"error": str(out)}, status_code=400)
        return JSONResponse(out)

    def __del__(self):
        self.stop.set()


def build_app(args: dict[str, Any]) -> serve.Application:
    """``serve run jobs.serve:build_app data_dir=/abs/data [model=hyformer alias=champion kv_reuse=true ...]``."""
    a = ServeArgs.parse(args)
    options = {"num_cpus": a.cpus, "num_gpus": 1 if a.gpu else 0}
    return Ranker.options(num_replicas=a.replicas, ray_actor_options=options).bind(a.__dict__)

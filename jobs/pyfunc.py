"""The registered model as an MLflow pyfunc that scores ranking requests: candidate rows in, click probabilities out.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/hyformer@champion")
    probs = model.predict(requests)                  # (rows,) float32, in the order of the rows

``requests`` (a pandas DataFrame) has one row per candidate: ``request_id``, ``user_id``, ``ts`` (ms, UTC) and
``item_id``, and optionally ``query_id`` (none: a feed request), ``position`` (default 0: not known before ranking),
``device_type``, ``network_type`` and the impressions' extension columns of the model's feature spec: the
impressions contract without its outcomes (``features.online.request_columns``; the model's signature lists them).
MLflow's schema has no missing integers: send -1 (or leave the column out) for an unknown query, device or network.

The model builds every input itself (``RequestRanker``): the request's profile features and point-in-time sequences
come from the online feature source (``features.online``: each user's latest events, the profiles) through the code
that builds the training features, so a request scores as the same impression scores offline (tests/test_serve.py);
each request's sequences are encoded once for all its candidates (KV reuse, hyformer/serving.py; a spec with a
sequence relevant to the candidate has per-candidate sequences, and is scored with a plain forward). The source is the
one the daily workflow publishes for the model's feature store (``online.json`` in the model, or the environment
variable ``HYFORMER_ONLINE_SOURCE``); a newer committed version is picked up within ``REFRESH_S`` seconds.

The model's artifacts are the checkpoint (``config.json`` + ``model.pt``, what ``hyformer.load_model`` reads), the
feature config it was trained on (``features.json``) and where its online source is (``online.json``). This module
imports only MLflow, pandas, numpy, Polars, torch, ``hyformer`` and ``features``: both packages are shipped with the
model (``code_paths``), so it loads where the rest of the project is absent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np
import polars as pl
import torch

from features.build import FeatureConfig
from features.online import OnlineSource, featurize, request_spec
from features.storage import current
from hyformer import load_model
from hyformer.serving import predict_requests

SOURCE_ENV = "HYFORMER_ONLINE_SOURCE"  # overrides the source recorded in the model
REFRESH_S = 30.0  # how often a loaded model looks for a newer committed version of its source
INPUT_PREFIXES = ("ns_", "bag_", "dense_", "seq_", "len_")
log = logging.getLogger("hyformer")


class RequestRanker:
    """A model, the feature config it was trained on and its online source: request rows -> probabilities."""

    def __init__(self, checkpoint: str | Path, source_root: str | None, device: str = "cpu"):
        ckpt = Path(checkpoint)
        self.device = torch.device(device)
        self.model = load_model(ckpt).to(self.device).eval()
        self.features = FeatureConfig(**json.loads((ckpt / "features.json").read_text()))
        self.spec = request_spec(self.features)
        recorded = ckpt / "online.json"
        recorded = json.loads(recorded.read_text()).get("source") if recorded.exists() else None
        self.source_root = source_root or os.environ.get(SOURCE_ENV) or recorded
        self.fallbacks: Counter = Counter()  # FALLBACKS reason -> count, since loading
        self._source: OnlineSource | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def source(self) -> OnlineSource:
        """The online source, (re)loaded when a newer version is committed (checked at most every REFRESH_S)."""
        if self.source_root is None:
            raise FileNotFoundError(
                f"no online feature source for this model: set {SOURCE_ENV} to a published source "
                "(<data>/online/<store id>, jobs.online)"
            )
        with self._lock:
            now = time.monotonic()
            if self._source is None or now - self._checked > REFRESH_S:
                self._checked = now
                if self._source is None:  # the first load: a source that cannot serve this model is an error
                    self._source = self._load()
                else:  # a newer version that fails to load or to fit keeps the current one serving
                    try:
                        if (current(self.source_root) or {}).get("version") != self._source.version:
                            self._source = self._load()
                    except (OSError, ValueError) as e:
                        log.warning(
                            "online source %s: reload failed, serving the current version (%s)", self.source_root, e
                        )
            return self._source

    def _load(self) -> OnlineSource:
        source = OnlineSource.load(self.source_root)
        source.check(self.features)
        return source

    def source_meta(self) -> dict:
        """The manifest of the source in use (without waiting for a reload in progress; {} before the first)."""
        return self._source.meta if self._source is not None else {}

    @torch.no_grad()
    def score(self, requests: pl.DataFrame, kv_reuse: bool = True) -> Scored:
        """Request rows -> their click probabilities, in the order of the rows (``Scored``)."""
        source = self.source()
        if requests.height == 0:
            return Scored(np.zeros(0, np.float32), {}, {}, 0, source.meta)
        f = featurize(source, self.features, requests, self.spec)
        self.fallbacks.update(f.fallbacks)
        batch = {k: torch.from_numpy(v).to(self.device) for k, v in f.batch.items() if k.startswith(INPUT_PREFIXES)}
        rid = torch.from_numpy(f.batch["request_id"]).to(self.device)
        if kv_reuse:
            logits, encodings = predict_requests(self.model, batch, rid)
        else:
            logits, encodings = self.model(batch), len(rid)
        return Scored(torch.sigmoid(logits.float()).cpu().numpy(), f.fallbacks, f.flagged, encodings, source.meta)


@dataclass(frozen=True)
class Scored:
    probs: np.ndarray  # (rows,) float32
    fallbacks: dict[str, int]  # features.online.FALLBACKS reason -> requests or rows (Featurized.fallbacks)
    flagged: dict[str, np.ndarray]  # reason -> the request ids it concerns
    encodings: int  # sequence encodings run (the requests with KV reuse, else the rows)
    source: dict  # the manifest of the online source the features came from


class HyFormerPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of any architecture of hyformer.zoo; artifact ``checkpoint``: a directory of ``model.save``
    with ``features.json`` (and ``online.json``)."""

    def load_context(self, context) -> None:
        self.ranker = RequestRanker(context.artifacts["checkpoint"], None)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        return self.ranker.score(pl.from_pandas(model_input)).probs


# MLflow "models from code": jobs.register logs this file as the model's code (no pickled object), and loading it
# runs this line to name the model object.
mlflow.models.set_model(HyFormerPyfunc())

"""The registered model as an MLflow pyfunc: ``mlflow.pyfunc.load_model(uri).predict(frame)`` -> click probabilities.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/hyformer@champion")
    probs = model.predict(frame)                     # (rows,) float32

``frame`` has one row per candidate and the model's input columns (hyformer/model.py, input contract):
``ns_<group>`` (a list of ids per row), ``seq_<name>`` (events x side-info ids per row, most recent first, 0 = padding)
and ``len_<name>`` (valid events). With a ``request_id`` column, each request's sequences are encoded once for all
its candidates (KV reuse). ``to_frame`` turns a batch of the feature pipeline (``features.materialize.Materializer``,
dedup tables or not) into such a frame.

The model's artifacts are the checkpoint (``config.json`` + ``model.pt``, what ``hyformer.load_model`` reads) and the
feature config it was trained on (``features.json``: vocabularies, sequence lengths, side info), so a registered
version is enough to rebuild and score it (jobs/score.py). This module imports only MLflow, pandas, numpy, torch and
hyformer: it is shipped with the model (``code_paths``) and loads where the rest of the project is absent.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from hyformer import load_model
from hyformer.serving import predict_requests

INPUT_PREFIXES = ("ns_", "bag_", "dense_", "seq_", "len_")


class HyFormerPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of any architecture of hyformer.zoo; artifact ``checkpoint``: a directory of ``model.save``."""

    def load_context(self, context) -> None:
        self.model = load_model(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        batch = from_frame(model_input)
        if "request_id" not in batch:
            batch["request_id"] = torch.arange(len(model_input))
        logits, _ = predict_requests(self.model, batch)
        return torch.sigmoid(logits.float()).numpy()


def from_frame(frame: pd.DataFrame) -> dict[str, torch.Tensor]:
    """DataFrame of input columns -> the model's batch (one tensor per column, rows stacked)."""
    if not any(c.startswith("ns_") for c in frame.columns) or not any(c.startswith("len_") for c in frame.columns):
        raise ValueError(
            f"model input needs the ns_<group>, seq_<name> and len_<name> columns; got {list(frame.columns)}"
        )
    batch = {}
    for col in frame.columns:
        if col.startswith(INPUT_PREFIXES):
            values = frame[col].to_numpy()
            arr = np.stack([np.asarray(v) for v in values]) if values.dtype == object else values
            dtype = np.float32 if col.startswith("dense_") else np.int64
            batch[col] = torch.from_numpy(np.ascontiguousarray(arr).astype(dtype))
    if "request_id" in frame.columns:
        batch["request_id"] = torch.from_numpy(frame["request_id"].to_numpy().astype(np.int64))
    return batch


def to_frame(batch: Mapping[str, np.ndarray], tables: Mapping[str, str]) -> pd.DataFrame:
    """A materialized batch (numpy; dedup tables are expanded into full sequences, ``tables``: sequence -> the
    table it indexes, FeatureConfig.seq_tables()) -> the pyfunc's input frame."""
    batch = dict(batch)
    if any(k.startswith("inv_") for k in batch):
        from features.materialize import reconstruct  # noqa: PLC0415 - only where the feature pipeline is installed

        batch = reconstruct(batch, tables)  # uniq_<table>[inv_<name>] -> seq_<name> (B, L, F)
    cols = {
        k: (list(v) if np.ndim(v) > 1 else v)
        for k, v in batch.items()
        if k.startswith(INPUT_PREFIXES) or k == "request_id"
    }
    return pd.DataFrame(cols)


# MLflow "models from code": jobs.register logs this file as the model's code (no pickled object), and loading it
# runs this line to name the model object.
mlflow.models.set_model(HyFormerPyfunc())

"""MLflow at the edge: one run per training, with configs, per-epoch metrics, plots, the model, and its registration.

Tracking store: ``MLFLOW_TRACKING_URI`` when set (e.g. a server started from ``infra/``), else an embedded SQLite
store inside the project's data directory (``<data>/mlflow/mlflow.db``, artifacts in ``<data>/mlflow/artifacts``):
no server needed. The model is logged with ``mlflow.pytorch`` (pickle format, with the ``hyformer`` package shipped as
code) so ``mlflow.pytorch.load_model("models:/hyformer/<version>")`` rebuilds it anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

import hyformer
from hyformer import load_model
from jobs.common import log
from jobs.evaluate import plots

EXPERIMENT = "hyformer-daily"
MODEL_NAME = "hyformer"


def tracking_uri(data_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{data_dir}/mlflow/mlflow.db"


def use_tracking(data_dir: str, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    uri = tracking_uri(data_dir)
    embedded = "MLFLOW_TRACKING_URI" not in os.environ  # read before set_tracking_uri, which sets that variable
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")), exist_ok=True)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return mlflow.set_experiment(experiment).experiment_id
    location = Path(f"{data_dir}/mlflow/artifacts").as_uri() if embedded else None
    return mlflow.create_experiment(experiment, artifact_location=location)


def log_configs(configs: Mapping[str, Mapping]) -> None:
    """Each config as flat MLflow params ``<name>.<field>`` (the vocab sizes left out: too many)."""
    for name, cfg in configs.items():
        mlflow.log_params(flat_params(f"{name}.", {k: v for k, v in cfg.items() if k != "vocab"}))


def flat_params(prefix: str, d: Mapping) -> dict[str, str]:
    """Config dict -> MLflow params (nested values as JSON, long values truncated by MLflow's 6000-char limit)."""
    return {f"{prefix}{k}": (json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v))[:6000] for k, v in d.items()}


def log_training_run(
    data_dir: str,
    run_name: str,
    checkpoint_dir: str,
    history: list[dict[str, float]],
    configs: Mapping[str, Mapping],
    extra_metrics: Mapping[str, float] = {},
    tags: Mapping[str, str] = {},
    register_as: str | None = MODEL_NAME,
) -> tuple[str, str | None]:
    """Log one training run and register its model; returns (run_id, model version or None)."""
    exp_id = use_tracking(data_dir)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=dict(tags)) as run:
        log_configs(configs)
        for name, cfg in configs.items():
            mlflow.log_dict(dict(cfg), f"config/{name}.json")
        for h in history:
            step = int(h.get("epoch", 0))
            mlflow.log_metrics({k: v for k, v in h.items() if k != "epoch" and np.isfinite(v)}, step=step)
        if extra_metrics:
            mlflow.log_metrics(dict(extra_metrics))
        pred_file = Path(checkpoint_dir) / "eval_predictions.npz"
        with tempfile.TemporaryDirectory() as tmp:
            if pred_file.exists():
                pred = dict(np.load(pred_file))
                for p in plots(pred, f"{tmp}/"):
                    mlflow.log_artifact(p, "plots")
            if len(history) > 1:
                for p in loss_curve(history, f"{tmp}/"):
                    mlflow.log_artifact(p, "plots")
        model = load_model(checkpoint_dir)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            code_paths=[str(Path(hyformer.__file__).parent)],
            registered_model_name=register_as,
        )
        version = str(info.registered_model_version) if register_as else None
    log.info("mlflow: run %s logged to %s%s", run.info.run_id, mlflow.get_tracking_uri(), f", registered {register_as} v{version}" if version else "")
    return run.info.run_id, version


def log_failed_run(data_dir: str, run_name: str, error: BaseException, configs: Mapping[str, Mapping], tags: Mapping[str, str] = {}) -> str:
    """Record a training that failed (e.g. a non-finite loss) as an MLflow run with status FAILED and the error."""
    exp_id = use_tracking(data_dir)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=dict(tags) | {"error": f"{type(error).__name__}: {error}"[:5000]}) as run:
        log_configs(configs)
        mlflow.end_run(status="FAILED")
    log.info("mlflow: run %s marked FAILED", run.info.run_id)
    return run.info.run_id


def registered_checkpoint(data_dir: str, spec: str, name: str, dest: str) -> str | None:
    """A checkpoint directory (config.json + model.pt) to warm-start from, for ``spec``:

    - ``"latest"``: the newest registered version of model ``name`` (None when there is none yet: a cold start);
    - ``"models:/<model>/<version>"`` or ``"models:/<model>@<alias>"``: that registered version, written to ``dest``;
    - anything else: a checkpoint directory, returned as it is.
    """
    if spec == "latest":
        version = latest_version(data_dir, name)
        if version is None:
            log.info("warm start: no registered version of %s yet, training from scratch", name)
            return None
        spec = f"models:/{name}/{version}"
    if not spec.startswith("models:/"):
        return spec
    use_tracking(data_dir)
    model = mlflow.pytorch.load_model(spec, map_location="cpu")
    model.save(dest)
    log.info("warm start: %s written to %s", spec, dest)
    return dest


def loss_curve(history: list[dict[str, float]], path_prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ("train_loss", "eval_logloss", "eval_oracle_logloss"):
        if all(key in h for h in history):
            ax.plot(epochs, [h[key] for h in history], "o-", label=key)
    ax.set(xlabel="epoch", ylabel="log loss", title="Loss per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{path_prefix}loss.png", dpi=100)
    plt.close(fig)
    return [f"{path_prefix}loss.png"]


def latest_version(data_dir: str, name: str = MODEL_NAME) -> str | None:
    use_tracking(data_dir)
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    return max((v.version for v in versions), key=int, default=None)

"""MLflow at the edge: one run per training (configs, per-epoch metrics, plots, the model), its registration, and
the champion/challenger bookkeeping of the daily workflow.

Tracking store: ``MLFLOW_TRACKING_URI`` when set (e.g. a server started with ``infra/mlflow_server.sh``), else an
embedded SQLite store inside the project's data directory (``<data>/mlflow/mlflow.db``, artifacts in
``<data>/mlflow/artifacts``): no server needed. The model is logged as an MLflow pyfunc (jobs/pyfunc.py, "models from
code", with the ``hyformer`` package shipped as code): ``mlflow.pyfunc.load_model("models:/hyformer@champion")`` scores
a DataFrame anywhere, and ``load_registered`` rebuilds the torch model with the feature config it was trained on.

Registry conventions: one registered model per architecture (``--arch``), one version per daily training, the alias
``champion`` on the version in production; each daily run and version carries tags ``date``, ``outcome``
(promoted | kept | logged) and ``decision_reason``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow.entities import Metric
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

import features as features_pkg
import hyformer
from features import storage
from features.build import FeatureConfig
from features.online import request_columns
from hyformer import load_model
from hyformer.model import RankingModel
from jobs.common import log, pyplot, redact
from jobs.evaluate import plots

EXPERIMENT = "hyformer-daily"
MODEL_NAME = "hyformer"
CHAMPION = "champion"  # the registry alias of the version in production


def tracking_uri(data_dir: str) -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded store of a local data directory. A data directory on object storage
    needs a tracking server (an SQLite file cannot live in a bucket); its artifacts go where the server sends them
    (e.g. ``mlflow server --artifacts-destination s3://...``, infra/mlflow_server.sh)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    if not storage.is_local(data_dir):
        raise ValueError(
            f"data directory {data_dir} is on object storage: set MLFLOW_TRACKING_URI to an MLflow tracking server "
            "(the embedded SQLite store needs a local disk); see docs/operations_infra.md"
        )
    return f"sqlite:///{data_dir}/mlflow/mlflow.db"


def use_tracking(data_dir: str, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    uri = tracking_uri(data_dir)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars garble job logs
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
    return {
        f"{prefix}{k}": (json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v))[:6000] for k, v in d.items()
    }


def start_training_run(data_dir: str, run_name: str, tags: Mapping[str, str] = {}) -> str:
    """Open the MLflow run of a training before it starts (status RUNNING), so that its metrics can be followed while
    it trains (``live_metrics``); ``log_training_run`` / ``log_failed_run`` with ``run_id`` finish it."""
    exp_id = use_tracking(data_dir)
    return MlflowClient().create_run(exp_id, run_name=run_name, tags=dict(tags)).info.run_id


def _run_of(exp_id: str, run_name: str, run_id: str | None) -> dict[str, str]:
    """``mlflow.start_run`` arguments: continue the run ``start_training_run`` opened, else start a new one."""
    return {"run_id": run_id} if run_id else {"experiment_id": exp_id, "run_name": run_name}


def live_metrics(tracking_uri: str, run_id: str) -> Callable[[int, dict[str, float]], None]:
    """A logger of a worker's metrics at a step into run ``run_id`` (hyformer.loop.Hooks.progress). Tracking must not
    stop training: a failure to log is a warning, once, and the logger goes quiet."""
    client, broken = MlflowClient(tracking_uri), []

    def log_step(step: int, metrics: dict[str, float]) -> None:
        if broken:
            return
        now = int(time.time() * 1000)
        try:
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        except Exception as e:  # noqa: BLE001 - any tracking failure: keep training
            broken.append(e)
            log.warning("mlflow: live metrics of run %s stopped (%s: %s)", run_id, type(e).__name__, e)

    return log_step


def log_training_run(
    data_dir: str,
    run_name: str,
    checkpoint_dir: str,
    history: list[dict[str, float]],
    configs: Mapping[str, Mapping],
    extra_metrics: Mapping[str, float] = {},
    tags: Mapping[str, str] = {},
    register_as: str | None = MODEL_NAME,
    experiment_yaml: str | None = None,
    run_id: str | None = None,
    online_source: str | None = None,
) -> tuple[str, str | None]:
    """Log one training run and register its model; returns (run_id, model version or None). ``experiment_yaml``:
    the resolved experiment file (jobs.experiment), logged as ``experiment.yaml``: ``--config`` on it reruns.
    ``run_id``: the run ``start_training_run`` opened (its live metrics kept), else a new one. ``online_source``:
    where the model's online features are published (jobs.online), recorded in the model for serving."""
    exp_id = use_tracking(data_dir)
    with mlflow.start_run(**_run_of(exp_id, run_name, run_id), tags=dict(tags)) as run:
        log_configs(configs)
        if experiment_yaml is not None:
            mlflow.log_text(experiment_yaml, "experiment.yaml")
        for name, cfg in configs.items():
            mlflow.log_dict(dict(cfg), f"config/{name}.json")
        for h in history:
            step = int(h.get("epoch", 0))
            mlflow.log_metrics({k: v for k, v in h.items() if k != "epoch" and np.isfinite(v)}, step=step)
        if extra_metrics:
            mlflow.log_metrics(dict(extra_metrics))
        pred_file = storage.join(checkpoint_dir, "eval_predictions.npz")
        with tempfile.TemporaryDirectory() as tmp:
            if storage.exists(pred_file):
                pred = dict(np.load(io.BytesIO(storage.read_bytes(pred_file))))
                for p in plots(pred, f"{tmp}/"):
                    mlflow.log_artifact(p, "plots")
            if len(history) > 1:
                for p in loss_curve(history, f"{tmp}/"):
                    mlflow.log_artifact(p, "plots")
        features = configs.get("features", {})
        with tempfile.TemporaryDirectory() as tmp:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc.py")),  # models from code: nothing pickled
                artifacts={"checkpoint": model_artifact(checkpoint_dir, features, tags, tmp, online_source)},
                code_paths=[str(Path(hyformer.__file__).parent), str(Path(features_pkg.__file__).parent)],
                registered_model_name=register_as,
                **request_schema(features),
            )
        version = str(info.registered_model_version) if register_as else None
    log.info(
        "mlflow: run %s logged to %s%s",
        run.info.run_id,
        redact(mlflow.get_tracking_uri()),
        f", registered {register_as} v{version}" if version else "",
    )
    return run.info.run_id, version


def request_schema(features: Mapping) -> dict:
    """``signature`` and ``input_example`` of the request-level model (jobs/pyfunc.py) for a feature config."""
    if not features:
        return {}
    cfg = FeatureConfig(**features)
    return {"signature": request_signature(cfg), "input_example": input_example(cfg)}


def request_signature(cfg: FeatureConfig):
    """The model's MLflow signature: the request columns (``request_columns``) in, probabilities out. Integer
    columns are ``long`` and float columns ``double`` whatever their width (what a client's numbers are, pandas'
    included); the model checks and narrows them."""
    types = {pl.Float32: "double", pl.Float64: "double", pl.Boolean: "boolean", pl.String: "string"}
    cols = [
        ColSpec("long" if dtype.is_integer() else types.get(dtype, "string"), name, required)
        for name, (dtype, required) in request_columns(cfg).items()
    ]
    return ModelSignature(Schema(cols), Schema([TensorSpec(np.dtype(np.float32), (-1,))]))


def input_example(cfg: FeatureConfig):
    """Two requests of two candidates (a search and a feed request), every request column filled."""
    rows = {"request_id": [1, 1, 2, 2], "user_id": [7, 7, 8, 8], "ts": [1_764_000_000_000] * 4}
    rows |= {"item_id": [11, 12, 13, 14], "query_id": [3, 3, -1, -1], "position": [0, 1, 0, 1]}
    values = {"string": "", "boolean": False, "double": 0.0}
    for c in request_signature(cfg).inputs.inputs:
        if c.name not in rows:
            rows[c.name] = [values.get(c.type.name, 1)] * 4
    return pd.DataFrame(rows)


def model_artifact(
    checkpoint_dir: str, features: Mapping, tags: Mapping[str, str], tmp: str, online_source: str | None = None
) -> str:
    """The registered model's artifact: the weights and config (no optimiser state) + the feature config it reads
    and where its online source is, copied from ``checkpoint_dir`` (a local folder or a URI) into ``tmp``."""
    out = Path(tmp) / "checkpoint"
    out.mkdir()
    for f in ("config.json", "model.pt", "history.json"):
        if storage.exists(src := storage.join(checkpoint_dir, f)):
            (out / f).write_bytes(storage.read_bytes(src))
    (out / "features.json").write_text(json.dumps(dict(features), indent=1))
    (out / "window.json").write_text(json.dumps({k: tags[k] for k in ("date", "window_days") if k in tags}))
    (out / "online.json").write_text(json.dumps({"source": online_source}))
    return str(out)


def log_failed_run(
    data_dir: str,
    run_name: str,
    error: BaseException,
    configs: Mapping[str, Mapping],
    tags: Mapping[str, str] = {},
    run_id: str | None = None,
) -> str:
    """Record a training that failed (e.g. a non-finite loss) as an MLflow run with status FAILED and the error
    (``run_id``: the run ``start_training_run`` opened, else a new one)."""
    exp_id = use_tracking(data_dir)
    error_tag = {"error": f"{type(error).__name__}: {error}"[:5000]}
    with mlflow.start_run(**_run_of(exp_id, run_name, run_id), tags=dict(tags) | error_tag) as run:
        log_configs(configs)
        mlflow.end_run(status="FAILED")
    log.info("mlflow: run %s marked FAILED", run.info.run_id)
    return run.info.run_id


@dataclass
class RegisteredModel:
    """A registered model version, downloaded: the model and the feature config it was trained on."""

    name: str
    version: str
    run_id: str
    model: RankingModel
    checkpoint_dir: str  # config.json + model.pt (+ features.json, window.json)
    features: dict  # the FeatureConfig (dict) of its training: store, vocabularies, lengths, side info
    window_days: int | None  # days of its training window (None when unknown)
    tags: dict[str, str]


def resolve_version(uri: str):
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> MLflow ModelVersion (clear error otherwise)."""
    client = MlflowClient()
    ref = uri.removeprefix("models:/")
    if not uri.startswith("models:/") or not ref:
        raise ValueError(f"not a registered model URI: {uri!r} (models:/<name>@<alias> or models:/<name>/<version>)")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = ref.partition("/")
    return client.get_model_version(name, version)


def load_registered(data_dir: str, uri: str, dest: str) -> RegisteredModel:
    """Download a registered version (see ``resolve_version``) into ``dest`` and rebuild its model on the CPU."""
    use_tracking(data_dir)
    mv = resolve_version(uri)
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=dest)
    ckpt = Path(path) / "artifacts" / "checkpoint"
    if not (ckpt / "model.pt").exists():
        raise FileNotFoundError(
            f"{uri} (version {mv.version}) has no artifacts/checkpoint/model.pt: not logged by jobs.register"
        )
    features = json.loads((ckpt / "features.json").read_text()) if (ckpt / "features.json").exists() else {}
    window = json.loads((ckpt / "window.json").read_text()) if (ckpt / "window.json").exists() else {}
    days = int(window["window_days"]) if "window_days" in window else None
    return RegisteredModel(
        mv.name, str(mv.version), mv.run_id, load_model(ckpt), str(ckpt), features, days, dict(mv.tags)
    )


def champion(data_dir: str, name: str) -> str | None:
    """The version the ``champion`` alias points to, or None."""
    use_tracking(data_dir)
    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:  # no such model or no alias yet
        return None


def registered_checkpoint(data_dir: str, spec: str | None, name: str, dest: str) -> str | None:
    """A checkpoint directory (config.json + model.pt) to warm-start from, for ``spec``:

    - ``"champion"``: the version the ``champion`` alias of model ``name`` points to (None when there is none yet);
    - ``"latest"``: the newest registered version of model ``name`` (None when there is none yet: a cold start);
    - ``"none"`` (or None): a cold start;
    - ``"models:/<model>/<version>"`` or ``"models:/<model>@<alias>"``: that registered version, downloaded to ``dest``;
    - anything else: a checkpoint directory, returned as it is.
    """
    if spec in (None, "none"):
        return None
    if spec in ("latest", CHAMPION):
        version = latest_version(data_dir, name) if spec == "latest" else champion(data_dir, name)
        if version is None:
            log.info("warm start: no %s version of %s yet, training from scratch", spec, name)
            return None
        spec = f"models:/{name}/{version}"
    if not spec.startswith("models:/"):
        return spec
    reg = load_registered(data_dir, spec, dest)
    log.info("warm start: %s (version %s) downloaded to %s", spec, reg.version, reg.checkpoint_dir)
    return reg.checkpoint_dir


def loss_curve(history: list[dict[str, float]], path_prefix: str) -> list[str]:
    plt = pyplot()

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


# --- champion / challenger bookkeeping (workflows/daily_train.py) ---------------------------------------------------

DAILY_TAGS = ("date", "arch", "hide_sequences")  # what identifies one daily training: a re-run of it is a no-op


def daily_runs(data_dir: str, tags: Mapping[str, str], newest_first: bool) -> list:
    """The FINISHED MLflow runs with these ``DAILY_TAGS``, by start time."""
    exp_id = use_tracking(data_dir)
    query = " and ".join(f"tags.{k} = '{tags[k]}'" for k in DAILY_TAGS) + " and attributes.status = 'FINISHED'"
    order = f"attributes.start_time {'DESC' if newest_first else 'ASC'}"
    return mlflow.search_runs([exp_id], query, output_format="list", order_by=[order])


def daily_record(data_dir: str, tags: Mapping[str, str]) -> dict | None:
    """The committed daily run with these ``DAILY_TAGS`` (its tags, metrics and run id), or None.

    A run counts once its decision is committed (tag ``outcome``); a run that failed or died before that does not."""
    runs = [r for r in daily_runs(data_dir, tags, newest_first=True) if "outcome" in r.data.tags]
    if not runs:
        return None
    r = runs[0]
    return {"run_id": r.info.run_id, **r.data.tags, "metrics": dict(r.data.metrics)}


DECISION = "decision"  # the run's tag holding its whole decision (JSON): the one write that commits it


def commit_decision(
    data_dir: str,
    run_id: str,
    name: str,
    version: str | None,
    decision: Mapping,
    champion_version: str | None,
    champion_metrics: Mapping[str, float] | None,
) -> str:
    """Record the champion/challenger decision of a daily run, then apply it (``apply_decision``); returns the outcome.

    The decision is one tag write (``DECISION``: outcome, version, reason, the metrics compared), after the champion's
    metrics (its inputs). That write is the commit point: a re-run after a crash at any later step completes the same
    decision (``resume_decision``) instead of training and registering again; a crash before it leaves a run with no
    decision, which the re-run marks abandoned (never the champion) before it trains again. Either way, one decision
    per date."""
    use_tracking(data_dir)
    client = MlflowClient()
    promote = bool(decision["promote"]) and version is not None
    if champion_metrics:
        for k, v in champion_metrics.items():
            if np.isfinite(v):
                client.log_metric(run_id, f"champion_{k}", float(v))
    record = {
        "outcome": "promoted" if promote else ("kept" if version is not None else "logged"),
        "version": version or "",
        "champion_version": str(champion_version or ""),
        "reason": decision["reason"],
        "date": decision.get("date", ""),
        "metric": decision["metric"],
        "challenger": decision["challenger"],
        "champion": decision["champion"],  # None: there was no champion
        "oracle": decision.get("oracle", float("nan")),
    }
    client.set_tag(run_id, DECISION, json.dumps(record))
    return apply_decision(data_dir, run_id, name, record)


def apply_decision(data_dir: str, run_id: str, name: str, record: Mapping) -> str:
    """Apply a recorded decision: reason on the run, tags on the version, the alias (if promoted), the per-day plot,
    and last the run's ``outcome`` tag, which makes the date count as done (``daily_record``). Every step can be
    repeated with the same result, so a resumed decision ends exactly as an uninterrupted one."""
    use_tracking(data_dir)
    client = MlflowClient()
    tags = {"decision_reason": record["reason"], "champion_version": record["champion_version"]}
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    if version := record["version"]:
        version_tags = tags | {
            "date": record["date"],
            record["metric"]: f"{record['challenger']:.6f}",
            "outcome": record["outcome"],
        }
        for k, v in version_tags.items():
            client.set_model_version_tag(name, version, k, str(v))
        if record["outcome"] == "promoted":
            client.set_registered_model_alias(name, CHAMPION, version)
            log.info(
                "registry: %s@%s -> version %s (was %s)", name, CHAMPION, version, record["champion_version"] or "none"
            )
    with tempfile.TemporaryDirectory() as tmp:
        history = daily_history(data_dir, name) + [
            {k: record[k] for k in ("date", "outcome", "challenger", "champion", "oracle")}
        ]
        client.log_artifact(run_id, per_day_plot(history, f"{tmp}/per_day_auc.png"), "plots")
    client.set_tag(run_id, "outcome", record["outcome"])
    return record["outcome"]


def resume_decision(data_dir: str, tags: Mapping[str, str], name: str) -> str | None:
    """After a crash: complete the recorded but unfinished decision of the daily run with these ``DAILY_TAGS``
    (returns its outcome), and mark every run of them that finished without a decision abandoned (the run's tag
    ``abandoned``, its version's ``outcome``: never the champion). None when no decision was pending."""
    runs = daily_runs(data_dir, tags, newest_first=False)
    client = MlflowClient()
    outcome = None
    for r in runs:
        if "outcome" in r.data.tags or "abandoned" in r.data.tags:
            continue
        if DECISION in r.data.tags:
            log.warning(
                "daily %s: completing the decision recorded by run %s before a crash", tags["date"], r.info.run_id
            )
            outcome = apply_decision(data_dir, r.info.run_id, name, json.loads(r.data.tags[DECISION]))
            continue
        log.warning("daily %s: run %s ended before its decision: marked abandoned", tags["date"], r.info.run_id)
        for v in client.search_model_versions(f"name='{name}' and run_id='{r.info.run_id}'"):
            client.set_model_version_tag(name, v.version, "outcome", "abandoned")
        client.set_tag(r.info.run_id, "abandoned", "no decision was recorded (the run ended before it)")
    return outcome


def version_date(data_dir: str, name: str, version: str) -> str | None:
    """The date a registered version was trained for (held out): its ``date`` tag, else its run's; None if neither."""
    use_tracking(data_dir)
    client = MlflowClient()
    v = client.get_model_version(name, version)
    if date := v.tags.get("date"):
        return date
    return client.get_run(v.run_id).data.tags.get("date") if v.run_id else None


def daily_history(data_dir: str, name: str) -> list[dict]:
    """The committed daily runs of model ``name``: date, outcome, challenger's and champion's query AUC on that date."""
    exp_id = use_tracking(data_dir)
    runs = mlflow.search_runs(
        [exp_id], f"tags.arch = '{name}' and attributes.status = 'FINISHED'", output_format="list"
    )
    return [
        {
            "date": r.data.tags.get("date", ""),
            "outcome": r.data.tags["outcome"],
            "challenger": r.data.metrics.get("eval_query_auc", float("nan")),
            "champion": r.data.metrics.get("champion_eval_query_auc", float("nan")),
            "oracle": r.data.metrics.get("eval_oracle_query_auc", float("nan")),
        }
        for r in runs
        if "outcome" in r.data.tags
    ]


def per_day_plot(history: list[dict], path: str) -> str:
    """Query-level AUC per date: each day's challenger (filled: promoted), the champion on the same day, the oracle."""
    plt = pyplot()

    rows = sorted(history, key=lambda h: h["date"])
    dates = [h["date"] for h in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(rows) + 3), 3.5))
    x = np.arange(len(rows))
    ax.plot(x, [h["challenger"] for h in rows], "-", color="C0", label="challenger")
    promoted = [i for i, h in enumerate(rows) if h["outcome"] == "promoted"]
    kept = [i for i, h in enumerate(rows) if h["outcome"] != "promoted"]
    ax.plot(promoted, [rows[i]["challenger"] for i in promoted], "o", color="C0", label="promoted")
    ax.plot(kept, [rows[i]["challenger"] for i in kept], "o", mfc="white", color="C0", label="not promoted")
    champ = [h["champion"] if h["champion"] is not None else np.nan for h in rows]
    ax.plot(x, champ, "s--", color="C1", label="champion, same day")
    if any(np.isfinite(h.get("oracle", np.nan)) for h in rows):
        ax.plot(x, [h.get("oracle", np.nan) for h in rows], ":", color="gray", label="oracle")
    ax.set_xticks(x, dates, rotation=45, ha="right")
    ax.set(ylabel="query-level AUC", title="Held-out day, per date")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Training stage (Ray Train, CPU/gloo) and the MLflow edge: metrics, checkpoints, a registered model that loads."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from features.materialize import Materializer
from hyformer import ARCHITECTURES, load_model
from hyformer.training import OptimConfig
from jobs.evaluate import metrics
from jobs.online import publish_source
from jobs.promote import decide, evaluate_registered
from jobs.register import champion, commit_decision, daily_record, load_registered, log_training_run
from jobs.score import read_scores, score
from jobs.train import train
from jobs.train_config import TrainConfig
from tests.conftest import committed_files
from tests.test_online import REQUEST_COLUMNS

pytestmark = pytest.mark.usefixtures("ray_local")

# ~20-90 s each, run with HYFORMER_SLOW=1: what the default suite covers otherwise is named where they are marked
SLOW = pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="~20-90 s; set HYFORMER_SLOW=1")
TINY_MODEL = dict(d_model=16, n_heads=2, n_layers=1, ffn_mult=1, head_hidden=(16,), emb_dim=8)


@pytest.fixture(scope="module")
def trained(feature_set, tmp_path_factory):
    tc = TrainConfig(epochs=2, batch_size=64, workers=1, cpus_per_worker=1, log_every=10, model=TINY_MODEL)
    return train(feature_set, tc, str(tmp_path_factory.mktemp("train")), "test-train")


def eval_batch(fs) -> dict[str, torch.Tensor]:
    samples = pl.read_parquet(fs.sample_files(fs.days[-1:])).sort("request_id", "ns_item_id")
    m = Materializer(fs.timelines(), fs.cfg, dedup=False)
    return {
        k: torch.from_numpy(v) for k, v in m({c: samples[c].to_numpy() for c in samples.columns if c != "day"}).items()
    }


def test_train_reports_every_metric_per_epoch(trained, feature_set):
    assert [h["epoch"] for h in trained.history] == [0, 1]
    n_eval = pl.read_parquet(feature_set.sample_files(feature_set.days[-1:])).height
    for h in trained.history:
        for k in (
            "train_loss",
            "eval_auc",
            "eval_query_auc",
            "eval_logloss",
            "eval_oracle_auc",
            "eval_oracle_query_auc",
        ):
            assert math.isfinite(h[k]), k
        assert h["eval_rows"] == n_eval
        assert 0.0 < h["eval_auc"] < 1.0 and h["eval_oracle_auc"] > 0.6
    # the model learns: the second epoch's training loss is below the first's
    assert trained.history[1]["train_loss"] < trained.history[0]["train_loss"]


def test_checkpoint_reproduces_the_reported_eval_predictions(trained, feature_set):
    model = load_model(trained.checkpoint_dir).eval()
    saved = dict(np.load(f"{trained.checkpoint_dir}/eval_predictions.npz"))
    batch = eval_batch(feature_set)
    with torch.no_grad():
        probs = torch.sigmoid(model(batch)).numpy()
    # the worker scored the same rows in another order: compare per (request, label, p_click) sorted values
    np.testing.assert_allclose(np.sort(probs), np.sort(saved["prob"]), rtol=1e-4, atol=1e-5)
    assert set(saved["request_id"]) == set(batch["request_id"].numpy())


def kill_a_worker_after_the_first_checkpoint(run_dir: str, stop: threading.Event, killed: list[int]) -> None:
    """Wait until the run (a local folder or a URI) has registered a checkpoint, then SIGKILL one Ray Train worker
    process (once)."""
    from ray.util.state import list_actors

    from features import storage

    while not stop.is_set():
        # a checkpoint folder appears when rank 0 writes it; the run restores from it only once Ray Train's controller
        # has registered it (its polls take one report every 2 s), which writes this snapshot
        if storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json")):
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.1)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=SLOW)])  # S3 checkpoints: tests/test_workflow.py
def test_two_async_workers_finish_from_a_checkpoint_after_one_is_killed(
    feature_set, tmp_path, where, request, monkeypatch
):
    """Paper §3.8.2 mode on 2 gloo workers, checkpointing every 8 steps (to a local folder, or to the S3 server); a
    worker is SIGKILLed after the first checkpoint is registered. Ray Train restarts the group, which resumes from the
    last checkpoint: every step of both epochs is trained once and the run finishes. The workers read their own
    users' events: the driver never loads any."""
    from features import materialize, storage
    from features.shards import Samples, UserSlice

    def no_events_on_the_driver(*args, **kwargs):
        raise AssertionError("the driver loaded the window's events")

    monkeypatch.setattr(materialize.Timelines, "load", no_events_on_the_driver)

    runs = str(tmp_path) if where == "local" else storage.join(request.getfixturevalue("s3"), "train")
    tc = TrainConfig(
        epochs=2,
        batch_size=32,
        workers=2,
        cpus_per_worker=1,
        optim=OptimConfig(grad_sync="async"),
        checkpoint_every=8,
        max_failures=1,
        model=TINY_MODEL,
    )
    stop, killed = threading.Event(), []
    watcher = threading.Thread(
        target=kill_a_worker_after_the_first_checkpoint,
        args=(storage.join(runs, "test-kill"), stop, killed),
        daemon=True,
    )
    watcher.start()
    try:
        res = train(feature_set, tc, runs, "test-kill")
    finally:
        stop.set()
    assert killed, "no worker was killed: the run ended before a checkpoint was registered"
    layout = feature_set.layout()
    own = [Samples(layout.pieces("samples", feature_set.days[:-1], UserSlice(layout.n_shards, r, 2))) for r in (0, 1)]
    steps_per_epoch = math.ceil(max(o.count()[0] for o in own) / tc.batch_size)  # the larger slice's
    assert [h["epoch"] for h in res.history] == [0, 1]
    assert res.metrics["restored_step"] >= tc.checkpoint_every  # the restarted workers began from a checkpoint
    assert res.metrics["step"] == 2 * steps_per_epoch  # and no step was lost or repeated
    assert math.isfinite(res.metrics["eval_query_auc"])
    assert res.checkpoint_dir.startswith(runs)  # checkpoints went where they were sent
    assert load_model(storage.download(res.checkpoint_dir, str(tmp_path / "ckpt"))) is not None


def test_mlflow_run_holds_metrics_plots_and_a_loadable_registered_model(
    trained, feature_set, ingested, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_dir = str(tmp_path)
    configs = {
        "train": trained.train_config.to_dict(),
        "model": trained.model_config.to_dict(),
        "features": feature_set.cfg.to_dict(),
    }
    source = publish_source(ingested[0], feature_set, root=f"{data_dir}/online")["root"]
    run_id, version = log_training_run(
        data_dir,
        "test-run",
        trained.checkpoint_dir,
        trained.history,
        configs,
        {"feature_samples": 1.0},
        online_source=source,
    )
    assert version == "1"
    assert mlflow.get_tracking_uri() == f"sqlite:///{data_dir}/mlflow/mlflow.db"
    run = mlflow.get_run(run_id)
    # artifacts (plots, the model) live in the data directory, not in ./mlruns of whatever the working directory is
    assert run.info.artifact_uri.startswith(f"file://{data_dir}/mlflow/artifacts/"), run.info.artifact_uri
    for k in ("eval_auc", "eval_query_auc", "eval_logloss", "eval_oracle_auc"):
        assert k in run.data.metrics
    assert run.data.params["model.d_model"] == "16"
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "eval_auc")
    assert [m.step for m in history] == [0, 1]
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "plots")}
    assert {"plots/roc.png", "plots/calibration.png", "plots/loss.png"} <= artifacts
    # the registered version is a pyfunc that scores ranking requests (one row per candidate) with its online source
    reference = load_model(trained.checkpoint_dir).eval()
    batch = eval_batch(feature_set)  # the held-out day's samples, by (request, item)
    day = feature_set.days[-1]
    imps = pl.read_parquet(committed_files(f"{ingested[0]}/clean/v1/impressions/day={day}")).sort(
        "request_id", "item_id"
    )
    frame = imps.select(REQUEST_COLUMNS).with_columns(pl.col("query_id").fill_null(-1)).to_pandas()
    probs = mlflow.pyfunc.load_model(f"models:/hyformer/{version}").predict(frame)
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.sigmoid(reference(batch)).numpy(), rtol=1e-5, atol=1e-6)
    reg = load_registered(data_dir, "models:/hyformer/1", str(tmp_path / "dl"))  # what warm starts and scoring load
    assert reg.features == feature_set.cfg.to_dict() and reg.run_id == run_id
    with torch.no_grad():
        torch.testing.assert_close(reg.model.eval()(batch), reference(batch))


def by_request(pred: dict[str, np.ndarray]) -> np.ndarray:
    """(request_id, prob) rows sorted: the same rows of a day in any order compare equal."""
    return np.sort(np.rec.fromarrays([pred["request_id"], pred["prob"]]), order=["f0", "f1"]).view(np.recarray)


def test_batch_scoring_equals_the_training_time_evaluation(trained, feature_set, tmp_path):
    """jobs.score (a task per slice of the users, dedup tables, KV reuse per request) on the held-out day gives the
    scores and the metrics the training job's evaluation reported for the same rows, and so does a plain forward per
    row in three tasks."""
    saved = dict(np.load(f"{trained.checkpoint_dir}/eval_predictions.npz"))
    model = load_model(trained.checkpoint_dir)
    res = score(feature_set, model, str(tmp_path / "scores"), batch_size=100)
    scores = read_scores(res.path)
    assert res.rows == len(saved["prob"]) and res.requests == len(np.unique(saved["request_id"])) < res.rows
    got, want = by_request(scores), by_request(saved)
    np.testing.assert_array_equal(got.f0, want.f0)
    np.testing.assert_allclose(got.f1, want.f1, rtol=1e-4, atol=1e-6)
    m = metrics(scores)
    for k in ("eval_auc", "eval_query_auc", "eval_oracle_query_auc"):
        assert m[k] == pytest.approx(trained.metrics[k], abs=1e-4), k
    plain = read_scores(score(feature_set, model, str(tmp_path / "plain"), kv_reuse=False, actors=3).path)
    np.testing.assert_allclose(by_request(plain).f1, got.f1, rtol=1e-4, atol=1e-6)  # 3 tasks, each 1/3 of the users


def test_champion_challenger_decisions_move_the_alias_only_when_the_margin_is_beaten(
    trained, feature_set, tmp_path, monkeypatch
):
    """The registry side of the daily workflow on real MLflow: a first version becomes the champion; a challenger
    scored against it on the same day is kept at margin 0 (they are the same weights: delta 0) and promoted at margin
    -0.01; each decision is recorded on the run and the version, and the date then counts as done."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_dir, features_dir = str(tmp_path), str(Path(feature_set.root).parents[2])  # the fixture's data directory
    configs = {"train": trained.train_config.to_dict(), "features": feature_set.cfg.to_dict()}
    outcomes = []
    for day, margin in (("2026-11-20", 0.0), ("2026-11-21", 0.0), ("2026-11-22", -0.01)):
        tags = {"date": day, "arch": "hyformer", "hide_sequences": "False", "window_days": str(len(feature_set.days))}
        assert daily_record(data_dir, tags) is None
        before = champion(data_dir, "hyformer")
        champ_metrics = None
        if before is not None:
            reg = load_registered(data_dir, f"models:/hyformer/{before}", str(tmp_path / f"champ-{day}"))
            champ_metrics = evaluate_registered(reg, features_dir, feature_set, str(tmp_path / f"scores-{day}"))
            assert champ_metrics["eval_query_auc"] == pytest.approx(trained.metrics["eval_query_auc"], abs=1e-4)
        decision = decide(trained.metrics, champ_metrics, margin)
        run_id, version = log_training_run(
            data_dir, f"daily-{day}", trained.checkpoint_dir, trained.history, configs, tags=tags
        )
        outcomes.append(
            commit_decision(
                data_dir, run_id, "hyformer", version, decision.to_dict() | {"date": day}, before, champ_metrics
            )
        )
        assert daily_record(data_dir, tags)["outcome"] == outcomes[-1]
        assert champion(data_dir, "hyformer") == {"promoted": version}.get(outcomes[-1], before)
        reason = mlflow.get_run(run_id).data.tags["decision_reason"]
        assert reason == decision.reason and "plots/per_day_auc.png" in {
            a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "plots")
        }
    assert outcomes == ["promoted", "kept", "promoted"]
    assert champion(data_dir, "hyformer") == "3"
    tags = {str(v.version): v.tags for v in mlflow.tracking.MlflowClient().search_model_versions("name='hyformer'")}
    assert tags["2"]["outcome"] == "kept" and "not more than margin 0" in tags["2"]["decision_reason"]


def test_a_backfill_is_not_compared_with_a_champion_that_trained_on_its_day() -> None:
    from jobs.promote import backfill_guard

    q = {"eval_query_auc": 0.9}
    d = backfill_guard("2026-11-20", "3", "2026-11-22", q, 0.0)
    assert not d.promote and d.reason.startswith("backfill: the champion (version 3, trained for 2026-11-22)")
    assert backfill_guard("2026-11-22", "3", "2026-11-22", q, 0.0) is None  # held out for the champion: fair
    assert backfill_guard("2026-11-23", "3", "2026-11-22", q, 0.0) is None
    assert backfill_guard("2026-11-20", "3", None, q, 0.0) is None  # unknown date: compared as before


def test_decide() -> None:
    q = "eval_query_auc"
    assert decide({q: 0.7}, None, 0.0).promote
    assert decide({q: 0.71}, {q: 0.70}, 0.005).promote
    kept = decide({q: 0.703}, {q: 0.70}, 0.005)
    assert not kept.promote and "+0.0030 is not more than margin 0.005" in kept.reason
    assert not decide({q: float("nan")}, {q: 0.7}, 0.0).promote  # a broken challenger never replaces the champion
    assert not decide({q: 0.7}, {q: 0.7}, 0.0).promote  # a tie keeps the champion


def test_a_baseline_trains_through_the_same_job_by_name(feature_set, tmp_path):
    """One config value (TrainConfig.arch / --arch) picks a row of the paper's Tables 1-2; same data, same loop.
    (Every architecture's forward/backward/checkpoint is tested in test_architectures; this runs one that is not a
    HyFormer class end to end.)"""
    arch, model_class = "mtgr-transformer", "Unified"
    tc = TrainConfig(epochs=1, batch_size=64, workers=1, cpus_per_worker=1, arch=arch, model=TINY_MODEL)
    res = train(feature_set, tc, str(tmp_path), f"test-{arch}")
    assert res.model_config == ARCHITECTURES[arch].config(res.model_config)  # the architecture's settings hold
    assert res.model_config.d_model == TINY_MODEL["d_model"]  # and the overrides too
    assert math.isfinite(res.metrics["eval_query_auc"]) and res.metrics["train_samples"] > 0
    model = load_model(res.checkpoint_dir).eval()
    assert type(model).__name__ == model_class
    saved = dict(np.load(f"{res.checkpoint_dir}/eval_predictions.npz"))
    with torch.no_grad():
        probs = torch.sigmoid(model(eval_batch(feature_set))).numpy()
    np.testing.assert_allclose(np.sort(probs), np.sort(saved["prob"]), rtol=1e-4, atol=1e-5)


def test_early_stopping_on_validation_days_keeps_the_best_epochs_model(feature_set, tmp_path):
    """--val-days 1: the day before the held-out one leaves training and picks the epoch; two DDP workers stop at the
    same epoch (rank 0's decision is broadcast), and the result is the best validation epoch's model."""
    tc = TrainConfig(
        epochs=3,
        batch_size=64,
        workers=2,
        cpus_per_worker=1,
        val_days=1,
        patience=1,
        optim=OptimConfig(lr=3e-2),
        model=TINY_MODEL,
    )
    res = train(feature_set, tc, str(tmp_path), "test-early-stopping")
    epochs = [h for h in res.history if "best_epoch" not in h]
    assert all(math.isfinite(h["val_auc"]) for h in epochs) and 2 <= len(epochs) <= 3
    best = int(np.argmax([h["val_auc"] for h in epochs]))
    if best < len(epochs) - 1:  # a later epoch was worse: one more entry, the restored best model
        assert len(res.history) == len(epochs) + 1 and res.metrics["best_epoch"] == best
        assert res.metrics["eval_auc"] == pytest.approx(epochs[best]["eval_auc"], abs=1e-6)
    else:
        assert res.history == epochs and res.metrics["eval_auc"] == epochs[-1]["eval_auc"]
    if len(epochs) < 3:  # stopped early: the validation AUC had fallen
        assert epochs[1]["val_auc"] <= epochs[0]["val_auc"]
    # the checkpoint is the reported model, and each rank's share of the held-out requests was gathered: every row
    # once
    saved = dict(np.load(f"{res.checkpoint_dir}/eval_predictions.npz"))
    with torch.no_grad():
        probs = torch.sigmoid(load_model(res.checkpoint_dir).eval()(eval_batch(feature_set))).numpy()
    assert len(saved["prob"]) == len(probs) == res.metrics["eval_rows"]
    np.testing.assert_allclose(np.sort(probs), np.sort(saved["prob"]), rtol=1e-4, atol=1e-5)


def test_a_held_out_day_too_small_or_of_one_class_fails_before_training(feature_set, tmp_path):
    from jobs.train import EvaluationDataError, check_eval_day

    day = feature_set.days[-1]
    rows = pl.read_parquet(feature_set.sample_files([day])).height
    tc = TrainConfig(workers=1, cpus_per_worker=1, model=TINY_MODEL, min_eval_rows=rows + 1)
    with pytest.raises(EvaluationDataError, match=f"held-out day {day}: {rows} rows"):
        train(feature_set, tc, str(tmp_path), "test-too-small")
    assert not any(tmp_path.iterdir())  # no Ray Train run was started
    with pytest.raises(EvaluationDataError, match="only one class"):
        check_eval_day(day, 500, 0, 100)
    with pytest.raises(EvaluationDataError, match="only one class"):
        check_eval_day(day, 500, 500, 100)
    check_eval_day(day, 500, 40, 100)


CRASH = """
import os, sys
from mlflow.tracking import MlflowClient

data_dir, run_id, version, method, tag = sys.argv[1:6]
original = getattr(MlflowClient, method)


def crash(self, *args, **kwargs):  # the process dies at this call: SIGKILL-like, no cleanup, no exception handler
    if method != "set_tag" or args[1] == tag:
        os._exit(9)
    return original(self, *args, **kwargs)


setattr(MlflowClient, method, crash)
from jobs.register import commit_decision

decision = {"promote": True, "reason": "no champion yet", "metric": "eval_query_auc", "challenger": 0.7,
            "champion": float("nan"), "date": "2026-11-22"}
commit_decision(data_dir, run_id, "hyformer", version, decision, None, None)
"""


@pytest.mark.parametrize(
    ("method", "tag"),
    [
        ("set_tag", "decision"),  # before the decision is recorded
        pytest.param("set_tag", "decision_reason", marks=SLOW),  # recorded, nothing applied
        pytest.param("set_model_version_tag", "", marks=SLOW),
        ("set_registered_model_alias", ""),
        pytest.param("log_artifact", "", marks=SLOW),
        pytest.param("set_tag", "outcome", marks=SLOW),  # everything but the commit tag
    ],
)
def test_a_daily_decision_killed_at_any_step_ends_in_exactly_one_decision(
    trained, feature_set, tmp_path, monkeypatch, method, tag
):
    """commit_decision is killed (os._exit) at one MLflow call; the re-run's resume_decision then either completes
    the recorded decision (alias, tags, plot, outcome: as if uninterrupted, no second version) or, when it died before
    recording one, marks the run abandoned (never the champion) so that the date trains again."""
    import subprocess
    import sys

    from jobs.register import resume_decision

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_dir = str(tmp_path)
    tags = {"date": "2026-11-22", "arch": "hyformer", "hide_sequences": "False", "window_days": "4"}
    configs = {"train": trained.train_config.to_dict(), "features": feature_set.cfg.to_dict()}
    run_id, version = log_training_run(
        data_dir, "daily-crash", trained.checkpoint_dir, trained.history, configs, tags=tags
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, data_dir, run_id, version, method, tag], cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert daily_record(data_dir, tags) is None  # the date does not count as done after the crash
    outcome = resume_decision(data_dir, tags, "hyformer")
    client = mlflow.tracking.MlflowClient()
    versions = client.search_model_versions("name='hyformer'")
    assert [str(v.version) for v in versions] == [str(version)]  # nothing registered again
    if tag == "decision":  # died before deciding: abandoned, the date trains again
        assert outcome is None and daily_record(data_dir, tags) is None and champion(data_dir, "hyformer") is None
        assert versions[0].tags["outcome"] == "abandoned" and "abandoned" in mlflow.get_run(run_id).data.tags
    else:  # completed exactly as an uninterrupted decision
        assert outcome == "promoted" and daily_record(data_dir, tags)["outcome"] == "promoted"
        assert champion(data_dir, "hyformer") == version and versions[0].tags["outcome"] == "promoted"
        run_tags = mlflow.get_run(run_id).data.tags
        assert run_tags["decision_reason"] == "no champion yet"
        assert "plots/per_day_auc.png" in {a.path for a in client.list_artifacts(run_id, "plots")}
    assert resume_decision(data_dir, tags, "hyformer") is None  # a second re-run finds nothing pending

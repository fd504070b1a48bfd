"""jobs/tune.py (workflows/tune.py's tuning): a 2-trial Ray Tune run (Optuna + ASHA, Train V2 pattern) on the tiny
window, MLflow runs, the best config file and its round trip into a TrainConfig."""

from __future__ import annotations

import json
import math

import mlflow
import pytest

from jobs.train_config import DISTRIBUTION_NAMES, TrainConfig, read_best_config
from jobs.tune import DISTRIBUTIONS, METRIC, SMALL_SEARCH_SPACE, check_space, fit_width, trial_train_config, tune

TINY_BASE = dict(n_heads=2, ffn_mult=1, head_hidden=(16,), emb_dim=8)
TINY_SPACE = {
    "lr": {"loguniform": [1e-3, 5e-3]},
    "model.d_model": {"choice": [16]},
    "model.n_layers": {"choice": [1]},
    "model.n_queries": {"choice": [1]},
    "model.seq_encoder": {"choice": ["transformer", "longer"]},
}


@pytest.mark.slow
def test_two_trial_tune_run_writes_the_best_config_and_nested_mlflow_runs(
    ray_local, feature_set, tmp_path, monkeypatch
):
    # the embedded store under tmp_path; mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so have monkeypatch
    # unset it again after the test (a plain delenv of an unset variable records nothing to undo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    data_dir = str(tmp_path)
    base = TrainConfig(epochs=2, batch_size=64, workers=1, cpus_per_worker=1, log_every=100, model=TINY_BASE)
    outcome = tune(feature_set, base, data_dir, "t", TINY_SPACE, samples=2, max_concurrent=1)

    assert (outcome.searcher, outcome.scheduler) == ("OptunaSearch", "AsyncHyperBandScheduler")  # ASHA
    assert len(outcome.trials) == 2
    for t in outcome.trials:
        assert t.status in ("completed", "stopped"), t.error
        assert t.history and all(math.isfinite(h[METRIC]) for h in t.history)
        assert set(t.params) == set(TINY_SPACE)

    # the best config: the documented format, TrainConfig fields only, rebuilt as a valid TrainConfig
    assert outcome.best_config_path == f"{data_dir}/tune/t/best_config.json"
    with open(outcome.best_config_path) as f:
        doc = json.load(f)
    assert set(doc) == {"train", "metric", "value", "trial", "tuned_at"}
    assert doc["metric"] == METRIC and doc["trial"] in {t.trial_id for t in outcome.trials}
    best = next(t for t in outcome.trials if t.trial_id == doc["trial"])
    assert doc["value"] == pytest.approx(best.history[-1][METRIC])
    assert doc["value"] == pytest.approx(max(t.history[-1][METRIC] for t in outcome.trials))
    overrides = read_best_config(outcome.best_config_path)
    assert overrides == doc["train"]
    tc = TrainConfig.from_dict(overrides)
    assert tc.optim.lr == pytest.approx(best.params["lr"]) and overrides["optim"]["lr"] == tc.optim.lr
    assert tc.model["d_model"] == 16 and tc.model["seq_encoder"] == best.params["model.seq_encoder"]
    assert tc.model["emb_dim"] == 8  # the base model overrides are kept
    assert "workers" not in overrides and "epochs" not in overrides  # run-time fields stay with the daily workflow
    assert "grad_sync" not in overrides["optim"]

    # MLflow: one parent run with the results, and a child run per trial logged with its per-epoch metric
    client = mlflow.tracking.MlflowClient()
    assert mlflow.get_tracking_uri() == f"sqlite:///{data_dir}/mlflow/mlflow.db"
    exp = client.get_experiment_by_name("hyformer-tune")
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[f"best_{METRIC}"] == pytest.approx(doc["value"])
    assert json.loads(parent.data.params["space.model.seq_encoder"]) == TINY_SPACE["model.seq_encoder"]
    assert parent.data.params["searcher"] == "OptunaSearch"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")
    }
    assert {"best_config.json", f"plots/tune_{METRIC}.png"} <= artifacts
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    statuses = {t.trial_id: t.status for t in outcome.trials}
    for child in children:
        assert METRIC in child.data.metrics
        assert child.info.status == "FINISHED"
        assert "model.seq_encoder" in child.data.params  # the sampled values
        assert json.loads(child.data.params["train.model"])["d_model"] == 16  # and the config it trained
        trial_id = child.info.run_name.removeprefix("run_trial_")
        assert child.data.tags["outcome"] == statuses[trial_id]
        history = client.get_metric_history(child.info.run_id, METRIC)
        assert len(history) == len(next(t for t in outcome.trials if t.trial_id == trial_id).history)


def test_read_best_config_rejects_other_files_and_reads_the_flat_form(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"lr": 1e-3, "d_model": 64}}))  # d_model belongs in "model"
    with pytest.raises(ValueError, match="d_model"):
        read_best_config(str(bad))
    bad.write_text(json.dumps({"train": {"lr": 1e-3, "model": {"width": 64}}}))
    with pytest.raises(ValueError, match="width"):
        read_best_config(str(bad))
    bad.write_text(json.dumps({"lr": 1e-3}))
    with pytest.raises(ValueError, match="'train'"):
        read_best_config(str(bad))
    bad.write_text(json.dumps({"train": {"lr": 1e-3, "sparse_optimizer": "sgd"}}))
    with pytest.raises(ValueError, match="not a valid training config.*sparse_optimizer"):
        read_best_config(str(bad))
    old = tmp_path / "old.json"  # written before the optimiser settings were nested under "optim"
    old.write_text(json.dumps({"train": {"lr": 1e-3, "sparse_lr": 0.1, "batch_size": 32, "model": {"d_model": 16}}}))
    tc = TrainConfig().override(read_best_config(str(old)))
    assert (tc.optim.lr, tc.optim.sparse_lr, tc.batch_size, tc.model) == (1e-3, 0.1, 32, {"d_model": 16})


def test_search_spaces_are_checked():
    check_space(SMALL_SEARCH_SPACE)
    assert tuple(DISTRIBUTIONS) == DISTRIBUTION_NAMES  # the names the experiment file checks are Ray Tune's
    with pytest.raises(ValueError, match="d_modell"):
        check_space({"model.d_modell": {"choice": [16]}})
    with pytest.raises(ValueError, match="unknown distribution"):
        check_space({"lr": {"normal": [0, 1]}})


def test_widths_move_to_the_nearest_one_the_model_accepts(feature_set):
    # T = 3 sequences x 2 queries + 5 NS tokens = 11 tokens, 2 heads: d_model must divide by 22
    assert fit_width(feature_set, {"d_model": 32, "n_heads": 2, "n_queries": 2}, "hyformer")["d_model"] == 22
    assert fit_width(feature_set, {"d_model": 32, "n_heads": 2, "n_queries": 1}, "hyformer")["d_model"] == 32
    tc = trial_train_config(
        feature_set, TrainConfig(model=TINY_BASE), {"lr": 0.003, "model.d_model": 40, "model.n_queries": 2}
    )
    assert tc.optim.lr == 0.003 and tc.model["d_model"] == 44 and tc.model["emb_dim"] == 8


def test_cli_exit_code_names_the_failing_stage(tmp_path, capsys):
    from workflows.tune import main

    assert main(["--features", str(tmp_path / "missing-window.json"), "--data-dir", str(tmp_path)]) == 1
    assert "stage 'features' failed" in capsys.readouterr().err

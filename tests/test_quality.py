"""benchmarks/quality.py on the suite's tiny feature window: the split, the shared batches, matched budgets, the
suites' rows, the table, the MLflow runs and the scaling plots (its numbers are not asserted: benchmarks/ owns them)."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from benchmarks import quality, quality_report
from hyformer.zoo import ARCHITECTURES
from jobs.train import model_config

SMALL = {
    "d_model": 16,
    "d_seq": 8,
    "emb_dim": 8,
    "n_heads": 2,
    "n_layers": 1,
    "ffn_mult": 1,
    "head_hidden": [16],
    "longer_queries": 8,
}


@pytest.fixture(scope="module")
def window(feature_set):
    return quality.Window(feature_set, eval_days=2, batch_size=64)


def test_window_holds_out_the_last_days_and_reconciles_every_sample(window, feature_set):
    days = feature_set.days
    assert window.train_days == days[:-2] and window.eval_day_list == days[-2:]
    per_day = {d: pl.read_parquet(feature_set.sample_files([d])).height for d in days}
    assert window.n_train == sum(per_day[d] for d in days[:-2]) and window.n_eval == sum(per_day[d] for d in days[-2:])
    assert window.n_train + window.n_eval == feature_set.samples
    with pytest.raises(ValueError, match="eval-days"):
        quality.Window(feature_set, eval_days=len(days))


def test_every_model_of_a_seed_trains_on_the_same_batches_and_each_epoch_sees_every_sample_once(window, feature_set):
    cfg = feature_set.cfg
    a, b = window.train_batches(cfg, seed=0, epoch=0), window.train_batches(cfg, seed=0, epoch=0)
    assert a is b  # materialised once per seed, reused by every model
    other = window.train_batches(cfg, seed=1, epoch=0)
    labels = lambda bs: torch.cat([x["request_id"] for x in bs]).numpy()
    assert sum(len(x["label"]) for x in a) == window.n_train
    np.testing.assert_array_equal(np.sort(labels(a)), np.sort(window.train["request_id"]))  # a permutation of the days
    assert not np.array_equal(labels(a), labels(other))  # another seed, another order
    assert all(len(x["label"]) <= 64 for x in a)
    # held-out rows: in stored order, every one once
    np.testing.assert_array_equal(labels(window.eval_batches(cfg)), window.eval["request_id"])


def test_matched_config_lands_near_the_target_and_keeps_the_sequence_width(feature_set):
    target = quality.dense_params(model_config(feature_set, SMALL, "hyformer"))
    for arch in ("longer-rankmixer", "longer-wukong", "mtgr-transformer"):
        cfg = quality.matched_config(feature_set, arch, SMALL, target)
        assert cfg.arch == ARCHITECTURES[arch].overrides["arch"] and cfg.d_seq == SMALL["d_seq"]
        gap = abs(quality.dense_params(cfg) - target) / target
        # no other valid width is closer (the search is exhaustive up to twice the target)
        for width in (cfg.d_model - 4, cfg.d_model + 4):
            try:
                other = model_config(feature_set, SMALL | {"d_model": width}, arch)
            except ValueError:
                continue
            assert gap <= abs(quality.dense_params(other) - target) / target + 1e-12, (arch, width)


def test_suites_have_the_papers_rows(feature_set):
    tables = quality.table_specs(feature_set, SMALL, quality.TABLE_ROWS)
    paper = {n for n, a in ARCHITECTURES.items() if a.table in ("1", "2")}
    # the paper's 13 rows and the reference rows (the counting baseline is no network: it has no spec)
    assert {s.arch for s in tables} == paper | {
        "hyformer-no-seq",
        "din",
        "hyformer-pool-all",
        "hyformer-full-kv",
        "hyformer-target-attn",
    }
    assert len(tables) == 18
    assert quality.COUNTING in quality.TABLE_ROWS
    # HyFormer and its ablations get the paper's encoders; the baselines keep the ones their names say
    by_arch = {s.arch: s.model for s in tables}
    assert dict(by_arch["hyformer"].seq_encoder) == {"long": "longer", "search": "transformer", "feed": "transformer"}
    assert (
        by_arch["longer-rankmixer"].seq_encoder == "longer"
        and by_arch["transformer-rankmixer"].seq_encoder == "transformer"
    )
    side = quality.side_info_specs(feature_set, SMALL, (16, 64))
    assert [(s.arch, dict(s.tags)["long_len"], dict(s.tags)["side_info"]) for s in side] == [
        (arch, length, info) for length in (16, 64) for arch in ("longer-rankmixer", "hyformer") for info in (3, 7)
    ]
    for s in side:
        assert (
            len(s.model.schema.seq_fields) == s.features.side_info
            and s.model.schema.sequences["long"] == s.features.long_len
        )
    sizes = ({"d_model": 16, "d_seq": 8, "n_layers": 1}, {"d_model": 32, "d_seq": 8, "n_layers": 2})
    scaling = quality.scaling_specs(feature_set, SMALL, sizes)
    params = {s.row: quality.dense_params(s.model) for s in scaling}
    for arch in quality.SCALING_ARCHS:
        assert params[f"{arch} size=1"] > params[f"{arch} size=0"]


@pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="~30 s; set HYFORMER_SLOW=1")
def test_the_same_seed_gives_the_same_model(window, feature_set):
    spec = quality.Spec("hyformer", "hyformer", model_config(feature_set, SMALL, "hyformer"), feature_set.cfg)
    tc = quality.TrainConfig(epochs=1, batch_size=64, model=SMALL)
    a, b = quality.fit(window, spec, tc, seed=3), quality.fit(window, spec, tc, seed=3)
    assert a["eval_auc"] == b["eval_auc"] and a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert 0 < a["eval_mean_len_long"] <= feature_set.cfg.long_len


def test_cli_runs_a_suite_logs_mlflow_runs_and_writes_the_table(feature_set, tmp_path, monkeypatch):
    # the embedded store under tmp_path; mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: monkeypatch restores it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    res = quality.main(
        [
            "--suite",
            "tables",
            "--features",
            feature_set.path(),
            "--eval-days",
            "2",
            "--rows",
            "counting,hyformer,longer-rankmixer",
            "--seeds",
            "2",
            "--long-len",
            "32",
            "--model",
            json.dumps(SMALL),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
            "--name",
            "q",
        ]
    )
    assert len(res["runs"]) == 6 and {r["seed"] for r in res["runs"]} == {0, 1}
    counting = [r for r in res["runs"] if r["row"] == quality.COUNTING]
    assert len(counting) == 2 and counting[0]["eval_auc"] == counting[1]["eval_auc"]  # deterministic: one value
    for row, s in res["summary"].items():
        aucs = [r["eval_auc"] for r in res["runs"] if r["row"] == row]
        assert s["eval_auc"]["mean"] == pytest.approx(statistics.fmean(aucs)) and s["eval_auc"]["n"] == 2
        assert s["eval_oracle_auc"]["std"] == pytest.approx(0.0, abs=1e-12)  # the oracle scores the same rows
        assert s["dense_params"] > 0 and (s["train_gflops"] > 0) == (row != quality.COUNTING)  # counting: no network
    for r in res["runs"]:
        assert (
            all(math.isfinite(r[k]) for k in quality_report.EVAL_KEYS)
            and r["eval_rows"] == res["window"]["eval_samples"]
        )
    md = (tmp_path / "out" / "q.md").read_text()
    assert "(`hyformer`)" in md and "(`longer-rankmixer`)" in md and "| ref. |" in md  # the reference row
    assert "(`counting`)" in md and "ΔAUC vs counting" in md and "Ceilings on these rows" in md
    paired = quality_report.paired_delta(res["runs"], "hyformer", "longer-rankmixer")
    by_seed = {(r["row"], r["seed"]): r["eval_auc"] for r in res["runs"]}
    expected = [100 * (by_seed["hyformer", s] / by_seed["longer-rankmixer", s] - 1) for s in (0, 1)]
    assert paired["mean"] == pytest.approx(statistics.fmean(expected)) and f"{paired['mean']:+.2f}%" in md
    # --render rewrites the table from the JSON alone
    (tmp_path / "out" / "q.md").unlink()
    quality.main(["--render", str(tmp_path / "out" / "q.json")])
    assert (tmp_path / "out" / "q.md").read_text() == md
    assert json.loads((tmp_path / "out" / "q.json").read_text())["suite"] == "tables"
    # MLflow: one parent run with the table, a nested run per model and seed with its metrics
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/work/mlflow/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hyformer-quality"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.params["arch"] for c in children} == {"hyformer", "longer-rankmixer"}
    assert all("eval_query_auc" in c.data.metrics and "dense_params" in c.data.metrics for c in children)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id)}
    assert {"q.md", "q.json"} <= artifacts


def test_validation_days_leave_training_and_pick_the_epoch(feature_set):
    win = quality.Window(feature_set, eval_days=1, val_days=1, batch_size=64)
    days = feature_set.days
    assert win.train_days == days[:-2] and win.val_day_list == days[-2:-1] and win.eval_day_list == days[-1:]
    assert win.n_train + len(win.val["label"]) + win.n_eval == feature_set.samples
    spec = quality.Spec("hyformer", "hyformer", model_config(feature_set, SMALL, "hyformer"), feature_set.cfg)
    run = quality.fit(win, spec, quality.TrainConfig(epochs=2, patience=2, batch_size=64, model=SMALL), seed=0)
    vals = [h["val_auc"] for h in run["history"]]
    assert len(vals) == 2 and run["best_epoch"] == 1 + int(np.argmax(vals))
    assert run["eval_auc"] == pytest.approx(run["history"][int(np.argmax(vals))]["eval_auc"], abs=1e-9)
    with pytest.raises(ValueError, match="val-days"):
        quality.Window(feature_set, eval_days=1, val_days=len(days) - 1)


def test_counting_baseline_learns_rates_and_never_sees_a_rows_own_label():
    from hyformer.counting import CountingBaseline

    rng = np.random.default_rng(0)
    n, items = 20_000, rng.integers(0, 300, 20_000)
    quality_of = rng.normal(0, 1, 300)
    y = (rng.random(n) < 1 / (1 + np.exp(-(-2 + quality_of[items])))).astype(float)
    train, test = np.arange(n) < 15_000, np.arange(n) >= 15_000
    model = CountingBaseline().fit({"item": items[train]}, y[train], np.arange(n)[train] // 10)
    from hyformer.metrics import auc

    assert auc(y[test], model.predict({"item": items[test]})) > 0.65  # the item's rate carries its quality
    # pure noise keys (each id seen once): out-of-fold rates are the prior, so the regression gives them no weight
    noise = CountingBaseline().fit({"row": np.arange(15_000)}, y[train], np.arange(15_000) // 10)
    assert abs(noise.weights[1]) < 1e-3 or np.ptp(noise.predict({"row": np.arange(15_000, 20_000)})) < 1e-6


def test_auc_standard_error_matches_hanley_mcneil():
    # at AUC 0.5, Q1 = Q2 = 1/3: SE = sqrt((0.25 + 198 / 12) / 10^4) = 0.0409 for 100 positives and 100 negatives
    assert quality_report.auc_standard_error(0.5, 100, 100) == pytest.approx(0.0409, abs=1e-4)
    assert quality_report.auc_standard_error(0.7, 600, 5400) < quality_report.auc_standard_error(
        0.7, 60, 540
    )  # more rows, less error


def test_scaling_plots_are_written(tmp_path):
    stat = lambda m: {"mean": m, "std": 0.001, "n": 2}
    summary = {
        f"{arch} size={i}": {
            "arch": arch,
            "dense_params": 1e5 * (i + 1),
            "train_gflops": 2.0 * (i + 1),
            "eval_auc": stat(0.6 + i / 100),
            "eval_oracle_auc": stat(0.7),
        }
        for i in range(2)
        for arch in quality.SCALING_ARCHS
    }
    paths = quality_report.scaling_plots({"summary": summary, "seeds": 2}, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["scaling_params.png", "scaling_flops.png"]
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

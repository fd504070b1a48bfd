"""The benchmark entry points run for real at a tiny size (their numbers are not asserted: benchmarks/ owns them)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ~40 s of feature builds that tests/test_features.py covers in CI; the suite's budget is ~15 min on 2 cores
@pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="~40 s; set HYFORMER_SLOW=1")
@pytest.mark.slow
def test_features_benchmark_runs_and_writes_its_results(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.features",
        "--scale",
        "0.01",
        "--windows",
        "2,3",
        "--lengths",
        "16",
        "--batches",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "features.json").read_text())
    assert [b["days"] for b in res["builds"]] == [2, 3]
    assert res["builds"][1]["impressions"] > res["builds"][0]["impressions"] > 0
    assert res["increment"]["days_built"] == 1  # only the deleted newest day is rebuilt
    assert res["read_side"][0]["long_len"] == 16 and 0 < res["read_side"][0]["unique_ratio"] <= 1
    assert "| window days |" in (tmp_path / "out" / "features.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="~40 s; set HYFORMER_SLOW=1")
def test_transfer_benchmark_runs_and_writes_its_results(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.transfer",
        "--scale",
        "0.01",
        "--lengths",
        "8,24",
        "--batch-size",
        "16",
        "--batches",
        "1",
        "--warmup",
        "0",
        "--model",
        '{"d_model": 16, "n_heads": 2, "n_layers": 1, "emb_dim": 4}',
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray cluster
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert res["machine"]["torch"] and res["machine"]["device"] == "cpu" and res["batch_size"] == 16
    assert res["model_overrides"]["d_model"] == 16 and res["model_overrides"]["seq_encoder"]["long"] == "longer"
    assert [r["long_len"] for r in res["rows"]] == [8, 24]
    for r in res["rows"]:
        assert r["config"]["schema"]["sequences"]["long"] == r["long_len"]
        assert 0 < r["unique_ratio"] <= 1 and 0 < r["fill_long"] <= 1
        naive, dedup = r["naive"], r["dedup"]
        for fmt in (naive, dedup):
            assert fmt["bytes"] > fmt["seq_bytes"] > 0 and fmt["collate_ms"] > 0 and fmt["fwd_bwd_ms"] > 0
            assert fmt["pin_ms"] is None and fmt["h2d_ms"] is None  # no copy on the CPU: not applicable, not zero
            assert len(fmt["per_batch"]["bytes"]) == 1
        if r["unique_ratio"] < 1:
            assert dedup["bytes"] < naive["bytes"] and r["reduction"] > 1
        assert r["max_abs_logit_diff"] < 1e-5 and r["max_abs_logit"] > 0  # both formats: the same logits
        assert r["max_abs_grad_diff"] < 1e-5 and r["max_abs_grad"] > 0  # ... and the same gradients
    assert "| L_long |" in (tmp_path / "out" / "transfer.md").read_text()


# the workers part is two Ray Train runs (~100 s): jobs.train's own tests cover that path in CI
WORKERS = pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="~100 s; set HYFORMER_SLOW=1")


@pytest.mark.slow
@pytest.mark.parametrize("parts", ["step", pytest.param("step,workers", marks=WORKERS)])
def test_throughput_benchmark_runs_and_writes_its_results(tmp_path, parts):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.throughput",
        "--parts",
        parts,
        "--presets",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "32",
        "--scale",
        "0.2",
        "--days",
        "3",
        "--epochs",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray cluster
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert res["machine"]["torch"] and res["machine"]["ray"] and res["parts"] == parts.split(",")
    step = res["step"]
    assert step["device"] == "cpu" and step["steps"] == 2
    assert [(r["preset"], r["arch"]) for r in step["rows"]] == [("tiny", "hyformer"), ("tiny", "longer-rankmixer")]
    for r in step["rows"]:
        assert r["batch_size"] == 32 and r["precision"] == "fp32" and len(r["times_ms"]) == 2
        assert r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["train_gflops_per_step"] > 0 and r["dense_params"] > 0
        assert r["mfu"] is None and r["peak_memory_gb"] is None  # CUDA only
    md = (tmp_path / "out" / "throughput.md").read_text()
    assert "| preset |" in md
    if "workers" not in parts:
        return
    w = res["workers"]
    assert [r["grad_sync"] for r in w["runs"]] == ["ddp", "async"] and w["window"]["days"] == 3
    for r in w["runs"]:
        assert r["steps"] > 0 and r["train_samples"] > 0 and r["samples_per_s"] > 0 and r["step_ms"] > 0
        for k in ("eval_auc", "eval_query_auc", "eval_oracle_query_auc"):
            assert 0 <= r[k] <= 1, (k, r[k])  # finite (NaN fails the comparison)
        assert math.isfinite(r["eval_logloss"]) and r["eval_logloss"] > 0
    assert set(w["summary"]) == {"ddp", "async"} and w["summary"]["ddp"]["eval_auc"]["std"] is None  # one seed
    assert "| grad sync |" in md


@pytest.mark.skipif(not os.environ.get("HYFORMER_SLOW"), reason="~3 min; set HYFORMER_SLOW=1")
@pytest.mark.slow
def test_data_plane_benchmark_runs_on_both_storages_and_counts_the_network(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.data_plane", "--scales", "0.25", "--days", "3"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "data_plane.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["local", "s3"]
    for r in rows:
        for stage in ("ingest", "features", "train"):
            assert r[stage]["seconds"] > 0 and r[stage]["written_mb"] > 0, (r["backend"], stage)
    assert rows[1]["ingest"]["s3_received_mb"] > 0 and rows[1]["features"]["s3_sent_mb"] > 0  # through the relay
    assert "| 0.25x | s3 |" in (tmp_path / "data_plane.md").read_text()

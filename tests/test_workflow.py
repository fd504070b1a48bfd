"""End to end: the README's main command at a small size, a failing stage, and `ray job submit` to a local head."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--date", "2026-11-22", "--days", "4", "--synth-scale", "0.3", "--long-len", "16", "--batch-size", "128"]
METRICS = ("eval_auc", "eval_query_auc", "eval_logloss", "eval_oracle_auc")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # as with an activated venv: `python` is ours
    return env | {"PYTHONUNBUFFERED": "1", "PATH": path} | extra


def run_workflow(data_dir: Path, *args: str, timeout: int = 480) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "workflows/daily_train.py", "--data-dir", str(data_dir), *SMALL, *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def assert_run_logged(data_dir: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{data_dir}/mlflow/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hyformer-daily"], output_format="list")
    assert len(runs) == 1
    for k in METRICS:
        assert k in runs[0].data.metrics, k
    assert [str(v.version) for v in mlflow.tracking.MlflowClient().search_model_versions("name='hyformer'")] == ["1"]


@pytest.mark.slow
def test_readme_main_command_runs_end_to_end(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "bash infra/install.sh && .venv/bin/python workflows/daily_train.py" in readme.split("\n\n")[1]
    proc = run_workflow(tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "daily_train: done" in proc.stdout
    for stage in ("synthesize", "ingest", "features", "train", "register"):
        assert f"=== stage {stage}: done" in proc.stderr + proc.stdout, stage
    assert_run_logged(tmp_path / "data")


@pytest.mark.slow
def test_rerun_reuses_ingest_and_features_warm_starts_and_a_diverging_run_is_marked_failed(tmp_path):
    data = tmp_path / "data"
    # day 1: two workers with the paper's asynchronous all-reduce
    first = run_workflow(data, "--workers", "2", "--cpus-per-worker", "1", "--grad-sync", "async")
    log = first.stderr + first.stdout
    assert first.returncode == 0, log[-3000:]
    assert "2 workers (cpu/gloo, grad sync async)" in log
    # the same date again: every ingested day is skipped, no feature day is rebuilt; training warm-starts from the
    # registered version, diverges (lr 1e30) and stops with a clear error; the MLflow run is marked FAILED
    proc = run_workflow(data, "--init-from", "latest", "--lr", "1e30", "--sparse-lr", "1e30")
    log = proc.stderr + proc.stdout
    assert "features: all 4 days up to date" in log, log[-3000:]
    assert "0 day partitions to validate, 12 up to date" in log, log[-3000:]  # 4 days x 3 daily tables
    assert "warm start: models:/hyformer/1 written to" in log and "train: warm start from" in log, log[-3000:]
    assert proc.returncode == 1
    assert re.search(r"daily_train: stage 'train' failed: NonFiniteError: .*non-finite loss or gradient at step \d+", proc.stderr), proc.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{data}/mlflow/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hyformer-daily"], output_format="list")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert failed.data.tags["error"].startswith("NonFiniteError") and failed.data.params["train.lr"] == "1e+30"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on free ports; yields the dashboard address; `ray stop` afterwards."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash = free_port(), free_port()
    env = clean_env()
    start = [ray_bin, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=4", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_ray_job_submit_runs_the_workflow(ray_head, tmp_path):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    data_dir = tmp_path / "data"
    cmd = [
        ray_bin, "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
        "python", "workflows/daily_train.py", "--data-dir", str(data_dir), *SMALL, "--workers", "2", "--cpus-per-worker", "1",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-2000:]
    assert "daily_train: done" in out
    assert "2 workers (cpu/gloo, grad sync ddp)" in out
    assert_run_logged(data_dir)
    assert time.time() - t0 < 600

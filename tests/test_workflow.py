"""End to end: the daily workflow at a small size (a two-day schedule, re-runs, a failing stage, the lock) and a
scheduled submission to a local Ray head logging to an MLflow server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import polars as pl
import pytest

from jobs.common import free_port
from tests.conftest import committed_files
from tests.test_online import REQUEST_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--days", "4", "--synthetic", "--synth-scale", "0.3", "--long-len", "16", "--batch-size", "128"]
METRICS = ("eval_auc", "eval_query_auc", "eval_logloss", "eval_oracle_auc")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # as with an activated venv: `python` is ours
    return env | {"PYTHONUNBUFFERED": "1", "PATH": path} | extra


def run_workflow(data_dir: Path, *args: str, timeout: int = 480) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "workflows/daily_train.py", "--data-dir", str(data_dir), *SMALL, *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def registry(data_dir: Path) -> tuple[list, dict[str, str], str]:
    """(runs, {version: outcome tag}, champion version) of the data directory's embedded MLflow store."""
    mlflow.set_tracking_uri(f"sqlite:///{data_dir}/mlflow/mlflow.db")
    client = mlflow.tracking.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["hyformer-daily"], output_format="list")
    versions = {str(v.version): v.tags.get("outcome", "") for v in client.search_model_versions("name='hyformer'")}
    return runs, versions, str(client.get_model_version_by_alias("hyformer", "champion").version)


def assert_run_logged(data_dir: Path) -> None:
    runs, versions, champion = registry(data_dir)
    assert len(runs) == 1
    for k in METRICS:
        assert k in runs[0].data.metrics, k
    assert versions == {"1": "promoted"} and champion == "1"


@pytest.mark.slow
def test_two_day_schedule_promotes_then_keeps_the_champion_reruns_are_no_ops_and_a_diverging_run_fails(tmp_path):
    """The README's main command as a two-day backfill (day D-1, then D), then the same date again, then a forced
    re-run that diverges. (test_ray_job_submit_runs_the_workflow runs the plain README command.)"""
    readme = (ROOT / "README.md").read_text()
    assert "bash infra/install.sh && .venv/bin/python workflows/daily_train.py" in readme.split("\n\n")[1]
    data = tmp_path / "data"
    # two days in order, two workers with the paper's asynchronous all-reduce; margin 1: day D cannot beat day D-1
    first = run_workflow(
        data,
        "--from",
        "2026-11-21",
        "--to",
        "2026-11-22",
        "--promotion-margin",
        "1",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--grad-sync",
        "async",
    )
    log = first.stderr + first.stdout
    assert first.returncode == 0, log[-4000:]  # the last day was not promoted: a healthy day all the same
    status = json.loads((data / "status" / "2026-11-22.json").read_text())
    assert status["outcome"] == "kept" and "champion kept" in status["reason"]
    assert "2 workers (cpu/gloo, grad sync async)" in log
    for stage in (
        "synthesize",
        "ingest",
        "features",
        "online features",
        "train",
        "load champion",
        "evaluate champion",
        "register",
        "decide",
    ):
        assert f"=== stage {stage}: done" in log, stage
    assert re.search(
        r"daily 2026-11-21: no champion yet: challenger \(eval_query_auc 0\.\d+\) becomes the champion", log
    ), log[-3000:]
    assert re.search(
        r"daily 2026-11-22: challenger eval_query_auc 0\.\d+ vs champion 0\.\d+: "
        r"[-+]0\.\d+ is not more than margin 1; champion kept",
        log,
    ), log[-3000:]
    assert "warm start: models:/hyformer/1 (version 1) downloaded to" in log  # day D started from the champion
    runs, versions, champion = registry(data)
    assert versions == {"1": "promoted", "2": "kept"} and champion == "1"
    # serving: the newest day's online source is published, and the champion scores requests with it
    (source,) = [json.loads(p.read_text()) for p in (data / "online").glob("*/_manifest.json")]
    assert source["day"] == "2026-11-22" and source["counts"]["search"]["events"] > 0
    model = mlflow.pyfunc.load_model("models:/hyformer@champion")
    assert model.metadata.get_input_schema() is not None and model.metadata.saved_input_example_info is not None
    imps = pl.read_parquet(committed_files(f"{data}/clean/v1/impressions/day=2026-11-22")).head(50)
    probs = model.predict(imps.select(REQUEST_COLUMNS).with_columns(pl.col("query_id").fill_null(-1)).to_pandas())
    assert probs.shape == (50,) and ((probs > 0) & (probs < 1)).all() and probs.std() > 0
    by_date = {r.data.tags["date"]: r for r in runs}
    assert (
        by_date["2026-11-22"].data.tags["outcome"] == "kept"
        and "champion kept" in by_date["2026-11-22"].data.tags["decision_reason"]
    )
    assert (
        "champion_eval_query_auc" in by_date["2026-11-22"].data.metrics
        and "champion_eval_query_auc" not in by_date["2026-11-21"].data.metrics
    )
    for r in runs:
        for k in METRICS:
            assert k in r.data.metrics, k
        artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(r.info.run_id, "plots")}
        assert {"plots/roc.png", "plots/calibration.png", "plots/per_day_auc.png"} <= artifacts
    # the same date again: a no-op with the recorded outcome (no ingest, no training, no new version)
    again = run_workflow(data, "--date", "2026-11-22", "--exit-3-when-kept")  # the old exit code, on request
    assert again.returncode == 3 and "daily 2026-11-22: already done" in again.stderr + again.stdout, (
        again.stderr + again.stdout
    )[-3000:]
    assert "=== stage ingest" not in again.stderr + again.stdout
    # --force trains again: every ingested day and feature day is up to date. A narrower model (e.g. a newly tuned
    # config) cannot warm-start from the champion, so it trains from scratch; lr 1e30 diverges and stops with a clear
    # error; the MLflow run is FAILED and the champion stays
    narrow = '{"d_model": 16, "n_heads": 2, "n_layers": 2, "ffn_mult": 2, "head_hidden": [64]}'
    proc = run_workflow(
        data, "--date", "2026-11-22", "--force", "--model", narrow, "--lr", "1e30", "--sparse-lr", "1e30"
    )
    log = proc.stderr + proc.stdout
    assert "features: all 4 days up to date" in log, log[-3000:]
    assert "0 day partitions to validate, 12 up to date" in log, log[-3000:]  # 4 days x 3 daily tables
    assert "warm start: models:/hyformer/1 (version 1) downloaded to" in log, log[-3000:]
    assert re.search(r"warm start: the champion cannot start this model \(.*shape .*\): training from scratch", log), (
        log[-3000:]
    )
    assert "train: warm start from" not in log
    assert proc.returncode == 1
    assert re.search(
        r"daily_train: 2026-11-22: stage 'train' failed: NonFiniteError: .*non-finite loss or gradient at step \d+",
        proc.stderr,
    ), proc.stderr[-2000:]
    runs, versions, champion = registry(data)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert failed.data.tags["error"].startswith("NonFiniteError") and failed.data.params["train.lr"] == "1e+30"
    assert versions == {"1": "promoted", "2": "kept"} and champion == "1"
    # a backfill of an older date: the champion (trained for 2026-11-21) has trained on 2026-11-20, so it is neither
    # scored on that day nor warm-started from, and the alias cannot move to the older challenger
    back = run_workflow(data, "--date", "2026-11-20", "--days", "3")
    log = back.stderr + back.stdout
    assert back.returncode == 0, log[-3000:]
    assert "backfill: the champion (version 1, trained for 2026-11-21) has trained on 2026-11-20" in log, log[-3000:]
    assert "training from scratch (no warm start from it)" in log and "=== stage evaluate champion" not in log
    _, versions, champion = registry(data)
    assert versions["3"] == "kept" and champion == "1"


def test_a_second_run_on_a_locked_data_directory_exits_75_naming_the_holder(tmp_path):
    from filelock import FileLock

    data = tmp_path / "data"
    (data / "locks").mkdir(parents=True)
    (data / "locks" / "daily.holder.json").write_text('{"pid": 4242, "host": "other-node"}')
    with FileLock(str(data / "locks" / "daily.lock")):
        proc = run_workflow(data, "--lock-timeout", "0.5")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "is locked by another run" in proc.stderr and "other-node" in proc.stderr
    assert not (data / "logs").exists()  # nothing was touched


def test_a_data_directory_without_logs_fails_naming_them_instead_of_training_on_synthetic_data(tmp_path):
    """A mistyped --data-dir must not train (and promote into a shared registry) a model of synthetic logs: only the
    demo's default directory, or --synthetic, gets them."""
    data = tmp_path / "typo"
    args = [a for a in SMALL if a != "--synthetic"]
    proc = subprocess.run(
        [sys.executable, "workflows/daily_train.py", "--data-dir", str(data), *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"no logs in {data}/logs/v1" in proc.stderr and "--synthetic" in proc.stderr
    assert not (data / "logs").exists() and not (data / "mlflow").exists()


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on free ports; yields the dashboard address; `ray stop` afterwards."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash = free_port(), free_port()
    env = clean_env()
    start = [
        ray_bin,
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--num-cpus=4",
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("HYFORMER_SLOW"),
    reason="~3 min; the two-node S3 test below covers submission + server by default; set HYFORMER_SLOW=1",
)
def test_scheduled_submission_runs_the_workflow_on_a_cluster_logging_to_an_mlflow_server(
    ray_head, mlflow_server, tmp_path
):
    """What a scheduler runs (infra/schedule/): jobs/submit.py submits the README's main command to a Ray cluster and
    exits with the workflow's code; the run, its plots and the registered champion are on the MLflow server started
    by infra/mlflow_server.sh (proxied artifacts), where the UI shows them."""
    from mlflow.tracking import MlflowClient

    url, server_dir, server_out = mlflow_server
    assert server_out.read_text().splitlines()[0] == f"export MLFLOW_TRACKING_URI={url}"
    data_dir = tmp_path / "data"
    cmd = [
        sys.executable,
        "jobs/submit.py",
        "--address",
        ray_head,
        "--",
        "--data-dir",
        str(data_dir),
        "--date",
        "2026-11-22",
        *SMALL,
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=clean_env(RAY_AUTH_MODE="token", MLFLOW_TRACKING_URI=url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "daily_train: done" in out and "2 workers (cpu/gloo, grad sync ddp)" in out and "no champion yet" in out
    assert not (data_dir / "mlflow").exists()  # nothing in the embedded store
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    (run,) = client.search_runs([client.get_experiment_by_name("hyformer-daily").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "promoted"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # uploaded through the server
    for k in METRICS:
        assert k in run.data.metrics, k
    assert {"plots/roc.png", "plots/calibration.png", "plots/per_day_auc.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")
    }
    assert list((server_dir / "artifacts").rglob("per_day_auc.png"))  # stored under the server's artifact root
    champion = client.get_model_version_by_alias("hyformer", "champion")
    assert champion.version in ("1", 1) and champion.run_id == run.info.run_id
    mlflow.set_tracking_uri(url)
    assert mlflow.pyfunc.load_model("models:/hyformer@champion").metadata.run_id == run.info.run_id


@pytest.fixture
def two_node_cluster(tmp_path):
    """A Ray cluster of two nodes on this machine: `ray start --head` and a second `ray start --address ...` with its
    own temp dir and resources (the workflow's tasks and workers may land on either); yields the dashboard address."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash = free_port(), free_port()
    env = clean_env()
    second_tmp = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")
    head = [ray_bin, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2"]
    second = [
        ray_bin,
        "start",
        f"--address=127.0.0.1:{gcs}",
        "--num-cpus=2",
        '--resources={"second_node": 1}',
        f"--temp-dir={second_tmp}",  # short: Ray's socket paths below it must fit in 107 bytes
    ]
    try:
        subprocess.run([*head, "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        # joining a cluster needs its token (~/.ray/auth_token, written by the head) and token mode on the client
        second_env = env | {"RAY_AUTH_MODE": "token"}
        subprocess.run([*second, "--disable-usage-stats"], env=second_env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(second_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_two_node_cluster_runs_the_workflow_from_s3_with_artifacts_in_the_bucket(
    two_node_cluster, s3, tmp_path, monkeypatch
):
    """The cluster path: no shared disk. A two-node Ray cluster runs the daily workflow submitted with
    jobs/submit.py on ``--data-dir s3://...`` (logs, clean data, features, Ray Train checkpoints, scores, the lock),
    MLflow's artifacts go through the tracking server into the same bucket, and nothing lands on a local disk."""
    import boto3
    from mlflow.tracking import MlflowClient

    from tests.conftest import serve_mlflow

    bucket = s3.removeprefix("s3://")
    data_dir = f"{s3}/data"
    monkeypatch.chdir(tmp_path)
    with serve_mlflow(tmp_path, f"{s3}/mlflow") as (url, server_dir, _):
        cmd = [sys.executable, str(ROOT / "jobs" / "submit.py"), "--address", two_node_cluster]
        cmd += ["--working-dir", str(ROOT), "--", "--data-dir", data_dir, "--date", "2026-11-22", *SMALL]
        cmd += ["--workers", "2", "--cpus-per-worker", "1", "--checkpoint-every", "5"]
        env = clean_env(RAY_AUTH_MODE="token", MLFLOW_TRACKING_URI=url, HYFORMER_DATA_DIR=str(tmp_path / "data"))
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "daily_train: done" in out and "2 workers (cpu/gloo" in out
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        (run,) = client.search_runs([client.get_experiment_by_name("hyformer-daily").experiment_id])
        assert run.data.tags["outcome"] == "promoted" and "eval_query_auc" in run.data.metrics
        assert "plots/per_day_auc.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    keys = [
        o["Key"]
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    for prefix in ("data/logs/v1/impressions/day=", "data/clean/v1/impressions/day=", "data/features/v2/"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert any(k.startswith("data/train/daily-2026-11-22") and k.endswith("/model.pt") for k in keys)  # checkpoints
    assert any(k.startswith("mlflow/") and k.endswith("per_day_auc.png") for k in keys)  # MLflow artifacts
    assert any(k.startswith("mlflow/") and k.endswith("model.pt") for k in keys)  # the registered model
    assert not any(k.startswith("data/locks/") for k in keys)  # the lease was given back
    # nothing of the run on a local disk: no data directory, no Parquet, no checkpoint (the MLflow server's own
    # database and logs are all there is)
    local = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not (tmp_path / "data").exists()
    assert not [p for p in local if p.suffix in (".parquet", ".pt", ".npz")], local
    assert {p.name for p in local} <= {"mlflow.db", "mlflow-server.out", "mlflow-server.err"}, local

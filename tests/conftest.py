"""Shared fixtures: one local Ray cluster and one tiny synthetic data directory per test session."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import json
import os

import pytest

from jobs.common import free_port

# Object storage for the tests: an S3-compatible server on 127.0.0.1 (moto's, started by the `s3` fixture on this
# port). Set before any Ray cluster starts, so that its workers inherit them; tests never reach a real cloud.
# (setdefault: `from tests.conftest import ...` imports this file a second time, under another module name)
S3_PORT = int(os.environ.setdefault("HYFORMER_TEST_S3_PORT", str(free_port())))
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_EC2_METADATA_DISABLED="true",
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)

END = dt.date(2026, 11, 22)
DAYS = 5
# Tiny but with enough history per user that sequences are non-trivial.
TINY_SYNTH = dict(
    days=DAYS,
    users=60,
    items=300,
    authors=30,
    queries=60,
    requests_per_day=40,
    search_events_per_day=300,
    feed_events_per_day=400,
)


def _start_ray():
    from jobs.common import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster for one test module (shut down after it, so end-to-end tests can start their own)."""
    import ray

    _start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    from features.synth import SynthConfig, generate

    d = str(tmp_path_factory.mktemp("data"))
    generate(dataclasses.replace(SynthConfig(), **TINY_SYNTH), d, END)
    return d


@pytest.fixture(scope="session")
def ingested(synth_dir):
    from jobs.ingest import ingest

    _start_ray()
    return synth_dir, ingest(synth_dir, END, DAYS)


@pytest.fixture(scope="session")
def feature_set(ingested):
    from features.build import FeatureConfig
    from jobs.build_features import build_features

    data_dir, _ = ingested
    _start_ray()
    return build_features(data_dir, END, DAYS, FeatureConfig(long_len=64, search_len=16, feed_len=16, n_shards=2))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (a real HTTP S3 API) on 127.0.0.1:S3_PORT for the session."""
    import socket
    import time

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    deadline = time.monotonic() + 30
    while True:  # start() returns before the server thread listens
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, f"the S3 server did not listen on 127.0.0.1:{S3_PORT} within 30 s"
            time.sleep(0.1)
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3(s3_server, request) -> str:
    """A new bucket on the S3 server; yields its ``s3://<bucket>`` URI."""
    import re
    import uuid

    import boto3

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture
def mlflow_server(tmp_path):
    """``infra/mlflow_server.sh`` on a free port with its store under tmp_path; yields (url, server dir, stdout
    path)."""
    with serve_mlflow(tmp_path) as server:
        yield server


@contextlib.contextmanager
def serve_mlflow(tmp_path, artifacts: str | None = None):
    """``infra/mlflow_server.sh`` on a free port with its store under tmp_path and its proxied artifacts there or at
    ``artifacts`` (e.g. an s3:// URI); yields (url, server dir, stdout path)."""
    import signal
    import subprocess
    import time
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    port, server_dir = free_port(), tmp_path / "mlflow-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_SERVER_DIR": str(server_dir),
        "MLFLOW_PORT": str(port),
    }
    if artifacts:
        env["MLFLOW_ARTIFACTS_DIR"] = artifacts
    out_path = tmp_path / "mlflow-server.out"
    with open(out_path, "w") as out, open(tmp_path / "mlflow-server.err", "w") as err:
        proc = subprocess.Popen(
            ["bash", str(root / "infra" / "mlflow_server.sh")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (
                f"mlflow_server.sh exited with {proc.returncode}: "
                f"{(tmp_path / 'mlflow-server.err').read_text()[-2000:]}"
            )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{url}/health did not answer within 90 s")
            time.sleep(0.5)
        yield url, server_dir, out_path
    finally:
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # the script exec's mlflow, whose workers share its process group
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


def committed_files(folder: str, pointer: str = "_manifest.json") -> list[str]:
    """Every file that a committed pointer at or below local ``folder`` names (features.storage: a partition's files
    live under its committed version), sorted by partition."""
    out = []
    for m in sorted(glob.glob(f"{folder}/**/{pointer}", recursive=True)):
        man = json.load(open(m))
        out += [f"{os.path.dirname(m)}/{man['version']}/{f}" for f in man["files"]]
    return out

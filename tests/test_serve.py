"""Online scoring end to end on a local Ray cluster: the registered request-level model scores the held-out day as
the offline evaluation does (no train/serve skew); the Ray Serve application (jobs/serve.py) scores requests on
127.0.0.1, counts fallbacks, names bad requests and follows the champion alias; a bounded load run measures it."""

from __future__ import annotations

import socket
import time

import mlflow
import numpy as np
import polars as pl
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from benchmarks.serving import load, register_initial, requests_of
from features.build import bucket
from features.online import FALLBACKS, featurize
from jobs.common import free_port
from jobs.online import publish_source
from jobs.score import read_scores, score
from jobs.serve import build_app, request_rows
from tests.conftest import committed_files
from tests.test_online import REQUEST_COLUMNS

pytestmark = pytest.mark.slow
TINY = dict(d_model=16, n_heads=2, n_layers=1, ffn_mult=1, head_hidden=(16,), emb_dim=8)


@pytest.fixture(scope="module")
def served(feature_set, ingested, ray_local, tmp_path_factory):
    """Two registered versions (initial weights of two seeds) in a store of their own, their online source published,
    ``champion`` on the first."""
    data_dir, _ = ingested
    serving = str(tmp_path_factory.mktemp("serving"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = publish_source(data_dir, feature_set, root=f"{serving}/online/{feature_set.cfg.store_id()}")["root"]
        v1 = register_initial(serving, feature_set, TINY, seed=0, source=root)
        v2 = register_initial(serving, feature_set, TINY, seed=1, source=root)
    uri = f"sqlite:///{serving}/mlflow/mlflow.db"
    mlflow.set_tracking_uri(uri)
    MlflowClient().set_registered_model_alias("hyformer", "champion", v1)
    return {"dir": serving, "uri": uri, "versions": (v1, v2)}


def test_the_champion_scores_the_held_out_day_as_the_offline_evaluation(served, feature_set, ingested, tmp_path):
    data_dir, _ = ingested
    mlflow.set_tracking_uri(served["uri"])
    day = feature_set.days[-1]
    online = mlflow.pyfunc.load_model("models:/hyformer@champion")
    assert {c.name for c in online.metadata.get_input_schema().inputs} >= set(REQUEST_COLUMNS)
    impressions = pl.read_parquet(committed_files(f"{data_dir}/clean/v1/impressions/day={day}"))
    frame = impressions.select(REQUEST_COLUMNS).with_columns(pl.col("query_id").fill_null(-1)).to_pandas()
    probs = online.predict(frame)
    assert online.predict(frame.iloc[:0]).shape == (0,)  # no candidates: no scores
    # the offline evaluation of the same version: batch scoring of the day from the feature store (jobs.score)
    model = online.unwrap_python_model().ranker.model
    offline = read_scores(score(feature_set, model, str(tmp_path / "scores")).path)
    # jobs.score's item_id is the item's bucket (the samples keep no raw id): compare on the bucket
    items = pl.DataFrame({"item_id": frame["item_id"].to_numpy()})
    bucketed = items.select(bucket("item_id", feature_set.cfg.vocab["item"]).cast(pl.Int64))["item_id"]
    got = pl.DataFrame({"request_id": frame["request_id"], "item_id": bucketed, "online": probs})
    want = pl.DataFrame(
        {"request_id": offline["request_id"], "item_id": offline["item_id"], "offline": offline["prob"]}
    )
    both = got.join(want, on=["request_id", "item_id"], how="inner", validate="1:1")
    assert both.height == impressions.height == len(offline["prob"])
    np.testing.assert_allclose(both["online"], both["offline"], rtol=0, atol=2e-6)
    assert both["online"].std() > 1e-4  # the scores differ between rows: the inputs reached the model


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def post(url: str, body: dict) -> dict:
    r = requests.post(url, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def expected(version: str, bodies: list[dict]) -> list[np.ndarray]:
    """The registered version's pyfunc on the same requests (in process)."""
    rows, counts = request_rows(bodies, int(time.time() * 1000))
    probs = mlflow.pyfunc.load_model(f"models:/hyformer/{version}").predict(rows.to_pandas())
    return np.split(probs, np.cumsum(counts)[:-1])


def test_the_serve_app_scores_requests_and_follows_the_champion(served, feature_set, ingested):
    from ray import serve

    data_dir, _ = ingested
    v1, v2 = served["versions"]
    mlflow.set_tracking_uri(served["uri"])
    MlflowClient().set_registered_model_alias("hyformer", "champion", v1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"data_dir": served["dir"], "tracking_uri": served["uri"], "poll_s": "0.5", "max_batch_size": "4"}
        serve.run(build_app(args), name="hyformer", route_prefix="/rank")
        url = f"http://127.0.0.1:{port}/rank"
        bodies = requests_of(data_dir, feature_set, m=10, n=4)
        for body, want in zip(bodies, expected(v1, bodies)):
            got = post(url, body)
            assert got["model"] == f"hyformer/{v1}" and got["source_day"] == feature_set.days[-1]
            np.testing.assert_allclose(got["scores"], want, rtol=0, atol=2e-6)
        # the proxy listens on the loopback interface only
        address = outward_address()
        if address is not None:
            with pytest.raises(requests.ConnectionError):
                requests.post(f"http://{address}:{port}/rank", json=bodies[0], timeout=5)
        # a user nobody knows: empty sequences, and the reasons say so
        stranger = post(url, {**bodies[0], "user_id": 10**12})
        assert {"no_history", "unknown_user"} <= set(stranger["fallbacks"]) <= set(FALLBACKS)
        # malformed requests: 400 naming the field
        for bad, field in (({"user_id": 1}, "candidates"), ({"candidates": [1]}, "user_id")):
            r = requests.post(url, json=bad, timeout=30)
            assert r.status_code == 400 and field in r.json()["error"], r.text
        r = requests.post(url, json={**bodies[0], "item_id": None, "candidates": [{"item_id": -3}]}, timeout=30)
        assert r.status_code == 400 and "item_id=-3" in r.json()["error"], r.text
        stats = requests.get(url, timeout=30).json()
        assert stats["model"] == f"hyformer/{v1}" and stats["fallbacks"]["no_history"] >= 1
        # the alias moves: the app serves the new version within a few polls
        MlflowClient().set_registered_model_alias("hyformer", "champion", v2)
        deadline = time.time() + 60
        while (got := post(url, bodies[0]))["model"] != f"hyformer/{v2}":
            assert time.time() < deadline, "the app did not follow the alias"
            time.sleep(0.5)
        np.testing.assert_allclose(got["scores"], expected(v2, bodies[:1])[0], rtol=0, atol=2e-6)
        # a bounded load run (benchmarks/serving.py's client): every request answered, latencies measured
        res = load(url, requests_of(data_dir, feature_set, m=10, n=12, seed=5), concurrency=2, warmup=2, max_seconds=60)
        assert res["requests"] == 10 and 0 < res["p50_ms"] <= res["p99_ms"] and res["requests_per_s"] > 0
    finally:
        serve.shutdown()


def test_the_exported_graph_scores_a_featurized_request_as_the_registered_model(
    served, feature_set, ingested, tmp_path
):
    from hyformer.export import load_scorer
    from jobs.export import export_registered, split_request

    data_dir, _ = ingested
    mlflow.set_tracking_uri(served["uri"])
    v1 = served["versions"][0]
    res = export_registered(served["dir"], f"models:/hyformer/{v1}", str(tmp_path / "graph"))
    assert res["model"] == f"hyformer/{v1}" and (tmp_path / "graph" / "features.json").exists()
    scorer = load_scorer(tmp_path / "graph")
    ranker = mlflow.pyfunc.load_model(f"models:/hyformer/{v1}").unwrap_python_model().ranker
    for body in requests_of(data_dir, feature_set, m=7, n=3, seed=11):
        rows, _ = request_rows([body], int(time.time() * 1000))
        featurized = featurize(ranker.source(), ranker.features, rows)
        assert sum(int(featurized.batch[k][0]) for k in featurized.batch if k.startswith("len_")) > 0
        with torch.no_grad():
            logits = scorer(*split_request(ranker.model, featurized.batch))
        np.testing.assert_allclose(torch.sigmoid(logits).numpy(), ranker.score(rows).probs, rtol=0, atol=2e-6)

"""Online features (features/online.py, jobs/online.py): a request gets, field by field, the features the feature
store gives the logged impression it mirrors; the source keeps exactly the events that needs; unknown users fall
back to empty sequences, counted; bad requests are named."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from features.build import EVENT_COLUMNS
from features.materialize import Materializer
from features.online import OnlineSource, RequestError, featurize, retain
from features.schema import day_start_ms, parse_day
from jobs.online import publish_source
from tests.conftest import committed_files

REQUEST_COLUMNS = ("request_id", "user_id", "query_id", "item_id", "position", "ts", "device_type", "network_type")


def clean_day(data_dir: str, table: str, day: str) -> pl.DataFrame:
    return pl.read_parquet(committed_files(f"{data_dir}/clean/v1/{table}/day={day}"))


@pytest.fixture(scope="module")
def source(feature_set, ingested, tmp_path_factory):
    data_dir, _ = ingested
    root = str(tmp_path_factory.mktemp("online"))
    manifest = publish_source(data_dir, feature_set, root=root)
    return OnlineSource.load(root), manifest


def offline_batch(fs, day: str) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """The store's samples of ``day`` in (request, position, item) order and their materialized inputs."""
    samples = pl.read_parquet(fs.sample_files([day])).sort("request_id", "ns_position_b", "ns_item_id")
    batch = Materializer(fs.timelines(), fs.cfg, dedup=False)({c: samples[c].to_numpy() for c in samples.columns})
    return samples, batch


def test_a_request_gets_the_features_of_the_logged_impression(feature_set, ingested, source):
    data_dir, _ = ingested
    src, manifest = source
    day = feature_set.days[-1]
    assert manifest["day"] == day and manifest["exact_from_ts"] == day_start_ms(parse_day(day))
    requests = clean_day(data_dir, "impressions", day).sort("request_id", "position", "item_id")
    _, offline = offline_batch(feature_set, day)
    got = featurize(src, feature_set.cfg, requests.select(REQUEST_COLUMNS))
    keys = [k for k in offline if k.startswith(("ns_", "dense_", "bag_", "seq_", "len_"))]
    assert {k for k in got.batch if k.startswith(("seq_", "len_"))} == {
        k for k in keys if k.startswith(("seq_", "len_"))
    }
    for k in keys:
        np.testing.assert_array_equal(got.batch[k], offline[k], err_msg=k)
    np.testing.assert_array_equal(got.batch["request_id"], offline["request_id"])
    assert sum(int((offline[k] > 0).sum()) for k in keys if k.startswith("len_")) > 100  # real histories compared
    assert "before_source" not in got.fallbacks and "no_history" not in got.fallbacks


def test_rows_come_back_in_the_order_they_were_sent(feature_set, ingested, source):
    data_dir, _ = ingested
    src, _ = source
    day = feature_set.days[-1]
    requests = clean_day(data_dir, "impressions", day).select(REQUEST_COLUMNS).head(200)
    shuffled = requests.sample(fraction=1.0, shuffle=True, seed=3)
    a = featurize(src, feature_set.cfg, requests).batch
    b = featurize(src, feature_set.cfg, shuffled).batch
    order = {r: i for i, r in enumerate(zip(requests["request_id"], requests["item_id"], requests["position"]))}
    perm = [order[r] for r in zip(shuffled["request_id"], shuffled["item_id"], shuffled["position"])]
    for k in a:
        if k.startswith(("ns_", "seq_", "len_")):
            np.testing.assert_array_equal(b[k], a[k][perm], err_msg=k)


def test_unknown_users_and_old_requests_fall_back_with_a_counted_reason(feature_set, ingested, source):
    data_dir, _ = ingested
    src, manifest = source
    day = feature_set.days[-1]
    known = clean_day(data_dir, "impressions", day).select(REQUEST_COLUMNS).head(1)
    stranger = known.with_columns(pl.lit(10**12, pl.Int64).alias("user_id"), pl.lit(7, pl.Int64).alias("request_id"))
    before = pl.lit(manifest["exact_from_ts"] - 1, pl.Int64)
    earlier = known.with_columns(before.alias("ts"), pl.lit(8, pl.Int64).alias("request_id"))
    got = featurize(src, feature_set.cfg, pl.concat([known, stranger, earlier]))
    assert got.fallbacks["unknown_user"] == 1 and got.fallbacks["no_history"] == 1
    assert got.fallbacks["before_source"] == 1
    later = known.with_columns(pl.lit(manifest["end_ts"], pl.Int64).alias("ts"))  # the next day: its events missing
    assert featurize(src, feature_set.cfg, later).fallbacks == {"after_source": 1}
    lens = [k for k in got.batch if k.startswith("len_")]
    assert all(got.batch[k][1] == 0 for k in lens)  # the stranger: every sequence empty
    assert sum(int(got.batch[k][0]) for k in lens) > 0  # the known user has a history
    # a feed request (no query column at all), an item nobody knows, no position: scored, counted
    feed = known.drop("query_id", "position").with_columns(pl.lit(10**12, pl.Int64).alias("item_id"))
    got = featurize(src, feature_set.cfg, feed)
    assert got.fallbacks == {"unknown_item": 1}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.drop("user_id"), "lack the column(s) ['user_id']"),
        (lambda r: r.with_columns(pl.lit(-1).alias("item_id")), "request row 0: item_id=-1"),
        (lambda r: r.with_columns(pl.lit("x").alias("ts")), "request column 'ts'"),
        (lambda r: r.with_columns(pl.lit(42.7).alias("user_id")), "request row 0: user_id=42.7 is not an integer"),
        (lambda r: r.with_columns(pl.lit([1, 2]).alias("device_type")), "request column 'device_type'"),
    ],
)
def test_bad_requests_are_named(feature_set, ingested, source, change, message):
    data_dir, _ = ingested
    src, _ = source
    row = clean_day(data_dir, "impressions", feature_set.days[-1]).select(REQUEST_COLUMNS).head(1)
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        featurize(src, feature_set.cfg, change(row))


def test_the_source_keeps_what_any_request_of_its_last_day_reads():
    """Brute force: for times in the last day, the last L events (all, and of each key) before it are the same in
    the kept events as in the full history."""
    rng = np.random.default_rng(0)
    n, since = 4000, 10_000
    ev = pl.DataFrame(
        {
            "user_id": rng.integers(0, 5, n),
            "ts": rng.integers(0, 12_000, n),
            "key": rng.integers(0, 4, n),
            **{f: rng.integers(1, 50, n).astype(np.int32) for f in EVENT_COLUMNS[3:]},
        }
    ).sort(EVENT_COLUMNS)
    n_all, n_key = 7, 3
    kept = retain(ev.lazy(), since, n_all, n_key).collect()
    assert kept.height < ev.height / 4
    for t in rng.integers(since, 12_500, 30).tolist():
        for u in range(5):
            full, mine = (e.filter((pl.col("user_id") == u) & (pl.col("ts") < t)) for e in (ev, kept))
            assert full.tail(n_all).equals(mine.tail(n_all))
            for k in range(4):
                assert full.filter(pl.col("key") == k).tail(n_key).equals(mine.filter(pl.col("key") == k).tail(n_key))


@pytest.mark.parametrize("feed_only", [False, True])
def test_a_feature_spec_reaches_the_request_as_it_reaches_the_store(feed_only):
    """The hand inputs of tests/test_spec.py with a declared dense feature, an id-list feature and a filtered
    candidate-relevance sequence (and, feed-only, no query at all): featurize over the day's events gives the batch
    the feature store materializes for the same impressions."""
    from features.build import build_day, empty_state, plan_vocab, relevance_tables
    from features.materialize import Stream, Timelines
    from features.online import DIM_KEYS
    from tests.test_spec import SPEC, hand_spec_inputs, spec_config

    tags = {10: "3|17|4|9", 11: "", 12: "5"}
    features = SPEC["features"] | {
        "item_tags": {"table": "items", "column": "tags", "kind": "ids", "vocab": 50, "max_len": 3}
    }
    tokens = SPEC["tokens"] | {"item": (*SPEC["tokens"]["item"], "item_tags")}
    sequences = SPEC["sequences"]
    if feed_only:  # no query: relevance none / candidate only, no query tokens
        sequences = {n: s | {"relevance": "candidate"} for n, s in sequences.items() if s["relevance"] != "none"}
        tokens = {g: f for g, f in tokens.items() if g not in ("query", "cross")}
    cfg = spec_config(
        columns={"items": {"tags": {"type": "id_list"}}}, features=features, tokens=tokens, sequences=sequences
    )
    imps, search, feed, dims, cfg = hand_spec_inputs(cfg)
    dims["items"] = dims["items"].with_columns(pl.col("item_id").replace_strict(tags, default=None).alias("tags"))
    if feed_only:
        imps = imps.with_columns(pl.lit(None, pl.Int64).alias("query_id"))
        dims["queries"] = dims["queries"].clear()
    cfg = dataclasses.replace(cfg, vocab=plan_vocab(dims, cfg))
    lazy = {k: v.lazy() for k, v in dims.items()}
    out = build_day(
        imps.lazy(),
        {"search": search.lazy(), "feed": feed.lazy()},
        {s: empty_state() for s in cfg.streams()},
        lazy,
        cfg,
    )
    no_state = empty_state().collect()
    samples = out["samples"]
    want = Materializer(
        Timelines({s: Stream.build(out[f"events/{s}"], no_state) for s in cfg.streams()}), cfg, dedup=False
    )({c: samples[c].to_numpy() for c in samples.columns})
    item_keys, query_keys = relevance_tables(cfg, lazy)
    source = OnlineSource(
        {"version": "v", "exact_from_ts": 0, "end_ts": 2**62},
        {s: out[f"events/{s}"] for s in cfg.streams()},
        {t: d.sort(DIM_KEYS[t]) for t, d in dims.items()},
        {"items": item_keys.collect().sort("item_id"), "queries": query_keys.collect().sort("query_id")},
    )
    requests = imps.sort("request_id", "position", "item_id").select(c for c in REQUEST_COLUMNS if c in imps.columns)
    got = featurize(source, cfg, requests)
    keys = [k for k in want if k.startswith(("ns_", "dense_", "bag_", "seq_", "len_"))]
    assert {"dense_item", "bag_item", "seq_liked"} <= set(keys) and int(want["len_liked"].sum()) > 0
    for k in keys:
        np.testing.assert_array_equal(got.batch[k], want[k], err_msg=k)


def test_a_source_keeps_the_longest_retention_of_its_root_and_a_backfill_does_not_replace_it(
    feature_set, ingested, tmp_path
):
    data_dir, _ = ingested
    root = str(tmp_path / "online")
    first = publish_source(data_dir, feature_set, root=root)
    shorter = publish_source(data_dir, feature_set.with_read_side(long_len=4, search_len=2, feed_len=2), root=root)
    assert shorter["version"] != first["version"] and shorter["retention"] == first["retention"]
    older = dataclasses.replace(feature_set, days=feature_set.days[:-1])
    kept = publish_source(data_dir, older, root=root)
    assert kept["version"] == shorter["version"] and OnlineSource.load(root).meta["day"] == feature_set.days[-1]

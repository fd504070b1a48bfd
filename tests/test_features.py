"""Feature stage: point-in-time sequences (no leaks), relevance ranges, materialisation, row counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.build import FeatureConfig, build_shard, plan_vocab
from features.materialize import Materializer, Timeline
from jobs.build_features import FeatureSet, scan_clean

H = 3_600_000


def hand_inputs():
    """One user (7) with 4 search clicks and 1 feed event; 2 requests. Query 0 -> category 3, query 1 -> category 4."""
    imps = pl.DataFrame(
        {
            "request_id": [1, 1, 2], "user_id": [7, 7, 7], "query_id": [0, 0, 1], "item_id": [10, 11, 12],
            "position": [0, 1, 0], "ts": [10 * H, 10 * H, 20 * H], "device_type": [1, 1, 2], "network_type": [1, 1, 1],
            "label": [1, 0, 0], "p_click": [0.5, 0.1, 0.2], "day": ["d", "d", "d"],
        }
    )
    search = pl.DataFrame(
        {
            "user_id": [7, 7, 7, 7], "ts": [1 * H, 2 * H, 10 * H, 15 * H], "query_id": [0, 1, 0, 0],
            "item_id": [20, 21, 22, 23], "author_id": [1, 2, 1, 1], "category_id": [3, 4, 3, 3],
            "watch_time_s": [10.0, 5.0, 1.0, 2.0], "like": [1, 0, 0, None],
        }
    )
    feed = pl.DataFrame(
        {
            "user_id": [7, 8], "ts": [5 * H, 1 * H], "item_id": [30, 31], "author_id": [1, 1], "category_id": [4, 4],
            "watch_time_s": [3.0, 1.0], "finish": [1, 0], "like": [0, 0],
        }
    )
    dims = {
        "items": pl.DataFrame({"item_id": list(range(40)), "author_id": [1] * 40, "category_id": [3] * 40, "duration_s": [10.0] * 40}),
        "queries": pl.DataFrame({"query_id": [0, 1], "category_id": [3, 4], "n_terms": [2, 3]}),
        "users": pl.DataFrame({"user_id": [7, 8], "age_bucket": [1, 2], "gender": [1, 2], "city_id": [5, 6]}),
    }
    cfg = FeatureConfig(long_len=3, search_len=2, feed_len=2)
    return imps, search, feed, dims, dataclasses.replace(cfg, vocab=plan_vocab(dims, cfg))


def test_pointers_on_hand_example():
    imps, search, feed, dims, cfg = hand_inputs()
    out = build_shard(imps.lazy(), search.lazy(), feed.lazy(), {k: v.lazy() for k, v in dims.items()}, cfg)
    got = out["samples"].select("request_id", "ns_item_id", "long_hi", "search_lo", "search_hi", "feed_lo", "feed_hi")
    # At 10h: search clicks at 1h, 2h are earlier (the one at exactly 10h is not); the category-3 timeline is
    # [1h, 10h, 15h] (idx 0..2), of which only 1h is earlier. At 20h all 4 are earlier; category 4 = [2h] is
    # idx 3 of the (category, ts) order; the feed event of category 4 at 5h is earlier.
    want = pl.DataFrame(
        {
            "request_id": [1, 1, 2], "ns_item_id": [11, 12, 13], "long_hi": [2, 2, 4],
            "search_lo": [0, 0, 3], "search_hi": [1, 1, 4], "feed_lo": [0, 0, 0], "feed_hi": [0, 0, 1],
        },
        schema_overrides={c: pl.Int32 for c in ("ns_item_id", "long_hi", "search_lo", "search_hi", "feed_lo", "feed_hi")},
    )
    assert_frame_equal(got, want)


def test_materialize_hand_example():
    imps, search, feed, dims, cfg = hand_inputs()
    out = build_shard(imps.lazy(), search.lazy(), feed.lazy(), {k: v.lazy() for k, v in dims.items()}, cfg)
    m = Materializer({k: v for k, v in out.items() if k != "samples"}, cfg)
    b = m({c: out["samples"][c].to_numpy() for c in out["samples"].columns})
    assert b["seq_long"].shape == (3, 3, 5) and b["seq_search"].shape == (3, 2, 5)
    np.testing.assert_array_equal(b["len_long"], [2, 2, 3])  # sample 3 has 4 earlier events, capped at L=3
    np.testing.assert_array_equal(b["len_search"], [1, 1, 1])
    np.testing.assert_array_equal(b["len_feed"], [0, 0, 1])
    # most recent first: item 21 (2h) then item 20 (1h); bucket = id + 1 since vocab > max id
    np.testing.assert_array_equal(b["seq_long"][0, :, 0], [22, 21, 0])
    np.testing.assert_array_equal(b["seq_long"][2, :, 0], [24, 23, 22])
    # dt of the 2h event seen at 10h: 480 minutes -> 1 + floor(log2(481)) = 9
    assert b["seq_long"][0, 0, 3] == 9
    assert (b["seq_feed"][:2] == 0).all()  # empty sequences are all padding
    np.testing.assert_array_equal(b["ns_item"][:, 0], [11, 12, 13])


def load(fs: FeatureSet):
    samples = pl.read_parquet(fs.sample_files())
    return samples, fs.timelines()


def test_every_impression_becomes_one_sample(ingested, feature_set):
    data_dir, counts = ingested
    samples, _ = load(feature_set)
    assert samples.height == feature_set.samples == counts["impressions"].clean
    assert samples.select(pl.struct("request_id", "ns_item_id").n_unique()).item() == samples.height


def test_no_sequence_event_at_or_after_its_impression(feature_set):
    """The leak test: every materialised event of every sample is strictly older than the sample."""
    samples, timelines = load(feature_set)
    cfg = feature_set.cfg
    users, ts = samples["user_id"].to_numpy(), samples["ts"].to_numpy()
    checked = 0
    for name, tl_name, lo, hi in (
        ("long", "search_by_ts", np.zeros(samples.height, np.int64), samples["long_hi"].to_numpy()),
        ("search", "search_by_cat", samples["search_lo"].to_numpy(), samples["search_hi"].to_numpy()),
        ("feed", "feed_by_cat", samples["feed_lo"].to_numpy(), samples["feed_hi"].to_numpy()),
    ):
        tl = Timeline(timelines[tl_name])
        L = cfg.seq_len(name)
        n = np.clip(hi - np.maximum(lo, hi - L), 0, L)
        rows = tl.user_start(users)[:, None] + hi[:, None] - 1 - np.arange(L)[None, :]
        valid = np.arange(L)[None, :] < n[:, None]
        ev_ts = tl.ts[np.where(valid, rows, 0)]
        assert (ev_ts[valid] < np.broadcast_to(ts[:, None], valid.shape)[valid]).all(), name
        ev_user = timelines[tl_name].sort("user_id", maintain_order=True)["user_id"].to_numpy()  # Timeline's row order
        assert (ev_user[np.where(valid, rows, 0)][valid] == np.broadcast_to(users[:, None], valid.shape)[valid]).all(), name
        checked += int(valid.sum())
    assert checked > 1000  # the fixture has real histories


def test_long_sequence_is_the_complete_recent_history(ingested, feature_set):
    """long_hi = number of the user's search clicks strictly before the impression (brute force)."""
    data_dir, _ = ingested
    samples, _ = load(feature_set)
    events = scan_clean(data_dir, "search_events").select("user_id", pl.col("ts").alias("ev_ts")).collect()
    brute = (
        samples.select("request_id", "ns_item_id", "user_id", "ts")
        .join(events, on="user_id", how="left")
        .group_by("request_id", "ns_item_id")
        .agg((pl.col("ev_ts") < pl.col("ts")).sum().alias("n_before"))
    )
    got = samples.join(brute, on=["request_id", "ns_item_id"])
    assert (got["long_hi"] == got["n_before"]).all()


def test_search_and_feed_sequences_are_top_k_relevant(ingested, feature_set):
    """Relevant = category of the query; the sequence holds min(k, #relevant earlier events) of them, the latest."""
    data_dir, _ = ingested
    samples, _ = load(feature_set)
    k = feature_set.cfg.search_len
    queries = pl.read_parquet(f"{data_dir}/clean/v1/queries/*.parquet").select("query_id", pl.col("category_id").alias("qcat"))
    imps = scan_clean(data_dir, "impressions").select("request_id", "item_id", "query_id").collect().join(queries, on="query_id")
    vocab_item = feature_set.cfg.vocab["item"]
    imps = imps.with_columns((pl.col("item_id") % (vocab_item - 1) + 1).cast(pl.Int32).alias("ns_item_id"))
    for name, table in (("search", "search_events"), ("feed", "feed_events")):
        events = scan_clean(data_dir, table).select("user_id", pl.col("ts").alias("ev_ts"), pl.col("category_id").alias("qcat")).collect()
        brute = (
            samples.select("request_id", "ns_item_id", "user_id", "ts")
            .join(imps.select("request_id", "ns_item_id", "qcat"), on=["request_id", "ns_item_id"])
            .join(events, on=["user_id", "qcat"], how="left")
            .group_by("request_id", "ns_item_id")
            .agg((pl.col("ev_ts") < pl.col("ts")).sum().alias("n_rel"))
        )
        got = samples.join(brute, on=["request_id", "ns_item_id"])
        n = got[f"{name}_hi"] - got[f"{name}_lo"]
        assert (n == got["n_rel"].clip(upper_bound=k)).all(), name
        assert (n > 0).sum() > samples.height // 4, name  # relevance is not vacuous on this data


@pytest.mark.parametrize("bad_day", ["2026-13-01", "yesterday"])
def test_bad_day_is_a_clear_error(bad_day):
    from features.schema import parse_day

    with pytest.raises(ValueError, match=bad_day):
        parse_day(bad_day)

"""Feature stage: point-in-time ordinals (no leaks), relevance, materialisation, dedup tables, incremental days."""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import json
import os
import shutil

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.build import EVENT_FIELDS, SIDE_INFO, STREAMS, FeatureConfig, build_day, empty_state, plan_vocab
from features.materialize import Materializer, Stream, Timelines, reconstruct, unique_ratio
from jobs.build_features import FeatureSet, build_features
from tests.conftest import DAYS, END, committed_files

H = 3_600_000


def hand_inputs(cfg: FeatureConfig | None = None):
    """One user (7) with 4 search clicks and 1 feed event; 2 requests. Query 0 -> category 3, query 1 -> category 4."""
    imps = pl.DataFrame(
        {
            "request_id": [1, 1, 2],
            "user_id": [7, 7, 7],
            "query_id": [0, 0, 1],
            "item_id": [10, 11, 12],
            "position": [0, 1, 0],
            "ts": [10 * H, 10 * H, 20 * H],
            "device_type": [1, 1, 2],
            "network_type": [1, 1, 1],
            "label": [1, 0, 0],
            "p_click": [0.5, 0.1, 0.2],
            "p_click_ns": [0.3, 0.05, 0.1],
            "p_click_seq": [0.2, 0.06, 0.1],
            "day": ["d", "d", "d"],
        }
    )
    search = pl.DataFrame(
        {
            "user_id": [7, 7, 7, 7],
            "ts": [1 * H, 2 * H, 10 * H, 15 * H],
            "query_id": [0, 1, 0, 0],
            "item_id": [20, 21, 22, 23],
            "author_id": [1, 2, 1, 1],
            "category_id": [3, 4, 3, 3],
            "watch_time_s": [10.0, 5.0, 1.0, 2.0],
            "like": [1, 0, 0, None],
        }
    )
    feed = pl.DataFrame(
        {
            "user_id": [7, 8],
            "ts": [5 * H, 1 * H],
            "item_id": [30, 31],
            "author_id": [1, 1],
            "category_id": [4, 4],
            "watch_time_s": [3.0, 1.0],
            "finish": [1, 0],
            "like": [0, 0],
        }
    )
    cats = {20: 3, 21: 4, 22: 3, 23: 3, 30: 4, 31: 4}
    dims = {
        "items": pl.DataFrame(
            {
                "item_id": list(range(40)),
                "author_id": [1] * 40,
                "category_id": [cats.get(i, 3) for i in range(40)],
                "duration_s": [10.0] * 40,
            }
        ),
        "queries": pl.DataFrame({"query_id": [0, 1], "category_id": [3, 4], "n_terms": [2, 3]}),
        "users": pl.DataFrame({"user_id": [7, 8], "age_bucket": [1, 2], "gender": [1, 2], "city_id": [5, 6]}),
    }
    cfg = cfg or FeatureConfig(long_len=3, search_len=2, feed_len=2)
    return imps, search, feed, dims, dataclasses.replace(cfg, vocab=plan_vocab(dims, cfg))


def build_hand(cfg: FeatureConfig | None = None) -> tuple[dict[str, pl.DataFrame], FeatureConfig]:
    imps, search, feed, dims, cfg = hand_inputs(cfg)
    state = {s: empty_state() for s in STREAMS}
    out = build_day(
        imps.lazy(), {"search": search.lazy(), "feed": feed.lazy()}, state, {k: v.lazy() for k, v in dims.items()}, cfg
    )
    return out, cfg


def materialize_hand(out: dict[str, pl.DataFrame], cfg: FeatureConfig, dedup: bool = False) -> dict[str, np.ndarray]:
    t = Timelines({s: Stream.build(out[f"events/{s}"], empty_state().collect()) for s in STREAMS})
    return Materializer(t, cfg, dedup=dedup)({c: out["samples"][c].to_numpy() for c in out["samples"].columns})


def test_ordinals_on_hand_example():
    out, _ = build_hand()
    got = out["samples"].select("request_id", "ns_item_id", "rel_key", "long_hi", "search_hi", "feed_hi")
    # At 10h: the clicks at 1h and 2h are earlier (the one at exactly 10h is not); of category 3 (query 0) only 1h.
    # At 20h all 4 clicks are earlier; of category 4 (query 1) only the 2h one; the category-4 feed event at 5h is.
    want = pl.DataFrame(
        {
            "request_id": [1, 1, 2],
            "ns_item_id": [11, 12, 13],
            "rel_key": [3, 3, 4],
            "long_hi": [2, 2, 4],
            "search_hi": [1, 1, 1],
            "feed_hi": [0, 0, 1],
        },
        schema_overrides={"ns_item_id": pl.Int32},
    )
    assert_frame_equal(got, want)
    state = out["state/search"].sort("user_id", "key")
    assert state.rows() == [(7, 3, 3), (7, 4, 1)]  # cumulative (user, category) counts after the day


def test_materialize_hand_example():
    out, cfg = build_hand()
    b = materialize_hand(out, cfg)
    assert cfg.seq_fields == SIDE_INFO[7] and b["seq_long"].shape == (3, 3, 7) and b["seq_search"].shape == (3, 2, 7)
    np.testing.assert_array_equal(b["len_long"], [2, 2, 3])  # sample 3 has 4 earlier events, capped at L=3
    np.testing.assert_array_equal(b["len_search"], [1, 1, 1])
    np.testing.assert_array_equal(b["len_feed"], [0, 0, 1])
    # most recent first: item 21 (2h) then item 20 (1h); bucket = id + 1 since vocab > max id
    np.testing.assert_array_equal(b["seq_long"][0, :, 0], [22, 21, 0])
    np.testing.assert_array_equal(b["seq_long"][2, :, 0], [24, 23, 22])
    np.testing.assert_array_equal(b["seq_search"][2, :, 0], [22, 0])  # the category-4 click
    # dt of the 2h event seen at 10h: 480 minutes -> 1 + floor(log2(481)) = 9; its hour-of-day id: 2 + 1
    fields = cfg.seq_fields
    assert b["seq_long"][0, 0, fields.index("dt")] == 9 and b["seq_long"][0, 0, fields.index("hour")] == 3
    assert (b["seq_feed"][:2] == 0).all()  # empty sequences are all padding
    np.testing.assert_array_equal(b["ns_item"][:, 0], [11, 12, 13])
    # the synthetic ground truth rides along (evaluation only), as float32
    for k, want in {
        "p_click": [0.5, 0.1, 0.2],
        "p_click_ns": [0.3, 0.05, 0.1],
        "p_click_seq": [0.2, 0.06, 0.1],
    }.items():
        assert b[k].dtype == np.float32
        np.testing.assert_array_equal(b[k], np.array(want, np.float32))


def test_logs_without_ground_truth_give_nan():
    """Real logs (or a clean day ingested before the contract had p_click_ns / p_click_seq): NaN, not an error."""
    imps, search, feed, dims, cfg = hand_inputs()
    imps = imps.drop("p_click_ns", "p_click_seq").with_columns(pl.lit(None, pl.Float32).alias("p_click"))
    out = build_day(
        imps.lazy(),
        {"search": search.lazy(), "feed": feed.lazy()},
        {s: empty_state() for s in STREAMS},
        {k: v.lazy() for k, v in dims.items()},
        cfg,
    )
    assert out["samples"].select(pl.col("p_click", "p_click_ns", "p_click_seq").null_count()).row(0) == (3, 3, 3)
    b = materialize_hand(out, cfg)
    for k in ("p_click", "p_click_ns", "p_click_seq"):
        assert b[k].dtype == np.float32 and np.isnan(b[k]).all()
    batch = {c: out["samples"][c].to_numpy() for c in out["samples"].columns if not c.startswith("p_click")}
    t = Timelines({s: Stream.build(out[f"events/{s}"], empty_state().collect()) for s in STREAMS})
    old = Materializer(t, cfg)(batch)  # samples without the columns at all
    assert all(np.isnan(old[k]).all() for k in ("p_click", "p_click_ns", "p_click_seq"))


def test_a_stream_without_events_gives_empty_sequences():
    imps, search, feed, dims, cfg = hand_inputs()
    out = build_day(
        imps.lazy(),
        {"search": search.lazy(), "feed": feed.head(0).lazy()},
        {s: empty_state() for s in STREAMS},
        {k: v.lazy() for k, v in dims.items()},
        cfg,
    )
    naive, dedup = materialize_hand(out, cfg), materialize_hand(out, cfg, dedup=True)
    np.testing.assert_array_equal(naive["len_feed"], [0, 0, 0])
    assert (naive["seq_feed"] == 0).all() and naive["seq_feed"].shape == (3, 2, 7)
    np.testing.assert_array_equal(reconstruct(dedup, cfg.seq_tables())["seq_feed"], naive["seq_feed"])
    np.testing.assert_array_equal(naive["len_long"], [2, 2, 3])  # the other streams are unaffected


def test_side_info_3_is_a_column_subset_of_7():
    out, cfg7 = build_hand()
    cfg3 = dataclasses.replace(cfg7, side_info=3)
    b7, b3 = materialize_hand(out, cfg7), materialize_hand(out, cfg3)
    cols = [SIDE_INFO[7].index(f) for f in SIDE_INFO[3]]
    for s in ("long", "search", "feed"):
        assert b3[f"seq_{s}"].shape[-1] == 3
        np.testing.assert_array_equal(b3[f"seq_{s}"], b7[f"seq_{s}"][..., cols])
    with pytest.raises(ValueError, match="side_info"):
        FeatureConfig(side_info=4)


def test_relevance_none_takes_the_most_recent_events():
    out, cfg = build_hand(FeatureConfig(long_len=3, search_len=2, feed_len=2, relevance="none"))
    s = out["samples"]
    assert (s["search_hi"] == s["long_hi"]).all()
    b = materialize_hand(out, cfg)
    np.testing.assert_array_equal(b["seq_search"][2, :, 0], [24, 23])  # the two latest clicks, any category


def test_relevance_keys_table(tmp_path):
    # items 20 and 23 share key 9 with query 1: at 20h its search sequence is [23, 20]
    pl.DataFrame({"item_id": [20, 21, 22, 23], "key": [9, 1, 1, 9]}).write_parquet(tmp_path / "items.parquet")
    pl.DataFrame({"query_id": [0, 1], "key": [1, 9]}).write_parquet(tmp_path / "queries.parquet")
    out, cfg = build_hand(
        FeatureConfig(long_len=3, search_len=2, feed_len=2, relevance="keys", relevance_keys=str(tmp_path))
    )
    b = materialize_hand(out, cfg)
    np.testing.assert_array_equal(b["seq_search"][2, :, 0], [24, 21])
    np.testing.assert_array_equal(b["len_feed"], [0, 0, 0])  # feed items have no key: relevant to nothing
    with pytest.raises(ValueError, match="relevance_keys"):
        FeatureConfig(relevance="keys")


def test_huge_history_of_one_user_is_capped_to_the_latest():
    imps, search, feed, dims, cfg = hand_inputs(FeatureConfig(long_len=3000, search_len=50, feed_len=50))
    n = 5000
    big = pl.DataFrame(
        {
            "user_id": [7] * n,
            "ts": [1 + i * 100 for i in range(n)],
            "query_id": [0] * n,
            "item_id": [i % 40 for i in range(n)],
            "author_id": [1] * n,
            "category_id": [3] * n,
            "watch_time_s": [1.0] * n,
            "like": [0] * n,
        }
    )
    out = build_day(
        imps.lazy(),
        {"search": big.lazy(), "feed": feed.lazy()},
        {s: empty_state() for s in STREAMS},
        {k: v.lazy() for k, v in dims.items()},
        cfg,
    )
    assert out["samples"]["long_hi"].to_list() == [n, n, n]
    b = materialize_hand(out, cfg, dedup=True)
    assert b["inv_long"].shape == (3, 3000) and (b["len_long"] == 3000).all() and (b["len_search"] == 50).all()
    seq = reconstruct(b, cfg.seq_tables())["seq_long"]
    np.testing.assert_array_equal(seq[0, :3, 0], [(n - 1 - i) % 40 + 1 for i in range(3)])  # newest first
    # 3 samples x (3000 long + 50 search) tokens; the two candidates of request 1 share events, the search sequence
    # is a subset of the long one; request 2 sees the same events at another age (dt): 2 x 3000 unique + padding
    assert len(b["uniq_search"]) == 2 * 3000 + 1


# --- on the synthetic fixture -------------------------------------------------------------------------------------


def all_samples(fs: FeatureSet) -> pl.DataFrame:
    return pl.read_parquet(fs.sample_files())


def clean(data_dir: str, table: str) -> pl.DataFrame:
    return pl.read_parquet(committed_files(f"{data_dir}/clean/v1/{table}"))


def test_every_impression_becomes_one_sample(ingested, feature_set, materialized):
    data_dir, counts = ingested
    samples = all_samples(feature_set)
    assert samples.height == feature_set.samples == counts["impressions"].clean
    assert samples.select(pl.struct("request_id", "ns_item_id").n_unique()).item() == samples.height
    # the synthetic ground truth of each impression reaches its sample and the materialised batch unchanged
    truth = ["p_click", "p_click_ns", "p_click_seq"]
    vocab = feature_set.cfg.vocab
    imps = clean(data_dir, "impressions").select(
        "request_id", (pl.col("item_id") % (vocab["item"] - 1) + 1).cast(pl.Int32).alias("ns_item_id"), *truth
    )
    joined = samples.join(imps, on=["request_id", "ns_item_id"], suffix="_clean")
    assert joined.height == samples.height and joined.select(pl.col(truth).null_count()).sum_horizontal().item() == 0
    for k in truth:
        assert (joined[k] == joined[f"{k}_clean"]).all(), k
    sorted_samples, batch = materialized
    for k in truth:
        assert batch[k].dtype == np.float32 and not np.isnan(batch[k]).any()
        np.testing.assert_array_equal(batch[k], sorted_samples[k].to_numpy())


@pytest.fixture(scope="module")
def materialized(feature_set):
    samples = all_samples(feature_set).sort("request_id", "ns_item_id")
    batch = {c: samples[c].to_numpy() for c in samples.columns}
    m = Materializer(feature_set.timelines(), feature_set.cfg, dedup=False)
    return samples, m(batch)


def brute_force(data_dir: str, samples: pl.DataFrame, relevant: bool, table: str, vocab: dict) -> pl.DataFrame:
    """For every sample: the item buckets of the user's earlier events (relevant ones only if asked), newest first."""
    ev = clean(data_dir, table).select(
        "user_id", pl.col("ts").alias("ev_ts"), "item_id", pl.col("category_id").alias("ev_cat")
    )
    queries = clean(data_dir, "queries").select("query_id", pl.col("category_id").alias("qcat"))
    imps = clean(data_dir, "impressions").select("request_id", "item_id", "query_id").join(queries, on="query_id")
    imps = imps.with_columns((pl.col("item_id") % (vocab["item"] - 1) + 1).cast(pl.Int32).alias("ns_item_id"))
    s = samples.select("request_id", "ns_item_id", "user_id", "ts").join(
        imps.select("request_id", "ns_item_id", "qcat"), on=["request_id", "ns_item_id"]
    )
    j = s.join(ev, on="user_id", how="left").filter(pl.col("ev_ts") < pl.col("ts"))
    if relevant:
        j = j.filter(pl.col("ev_cat") == pl.col("qcat"))
    j = j.sort("ev_ts", "item_id", descending=True)
    return s.join(
        j.group_by("request_id", "ns_item_id").agg((pl.col("item_id") % (vocab["item"] - 1) + 1).alias("items")),
        on=["request_id", "ns_item_id"],
        how="left",
    )


@pytest.mark.parametrize(
    "seq,table,relevant",
    [("long", "search_events", False), ("search", "search_events", True), ("feed", "feed_events", True)],
)
def test_sequences_equal_a_brute_force_point_in_time_join(ingested, feature_set, materialized, seq, table, relevant):
    """Leak test and completeness: each sequence is exactly the latest <= L earlier (relevant) events, newest first."""
    data_dir, _ = ingested
    samples, b = materialized
    want = brute_force(data_dir, samples, relevant, table, feature_set.cfg.vocab)
    want = samples.select("request_id", "ns_item_id").join(
        want, on=["request_id", "ns_item_id"], how="left", maintain_order="left"
    )
    L = feature_set.cfg.seq_len(seq)
    checked = 0
    for i, items in enumerate(want["items"].to_list()):
        items = (items or [])[:L]
        n = int(b[f"len_{seq}"][i])
        assert n == len(items), (seq, i)
        got = b[f"seq_{seq}"][i, :n, 0].tolist()
        # events with equal timestamps may be ordered differently: compare as multisets, order by ts checked above
        assert sorted(got) == sorted(items), (seq, i)
        checked += n
    assert checked > 1000  # the fixture has real histories


def test_dedup_tables_reconstruct_the_naive_sequences_exactly(feature_set, materialized):
    samples, naive = materialized
    batch = {c: samples[c].to_numpy() for c in samples.columns}
    for side_info in (3, 7):
        fs = feature_set.with_read_side(side_info=side_info)
        dd = Materializer(fs.timelines(), fs.cfg, dedup=True)(batch)
        nv = naive if side_info == 7 else Materializer(fs.timelines(), fs.cfg, dedup=False)(batch)
        rebuilt = reconstruct(dd, fs.cfg.seq_tables())
        for s in ("long", "search", "feed"):
            np.testing.assert_array_equal(rebuilt[f"seq_{s}"], nv[f"seq_{s}"])
            np.testing.assert_array_equal(dd[f"len_{s}"], nv[f"len_{s}"])
        assert (dd["uniq_search"][0] == 0).all() and dd["inv_long"].shape == nv["seq_long"].shape[:2]
    assert 0 < unique_ratio(dd) < 0.5  # candidates of a request share their events
    # ids and indices travel as int32 (every id space of the store has < 2^31 ids)
    assert {k: v.dtype for k, v in dd.items() if k.startswith(("ns_", "uniq_", "inv_"))} == dict.fromkeys(
        [k for k in dd if k.startswith(("ns_", "uniq_", "inv_"))], np.dtype(np.int32)
    )
    assert naive["seq_long"].dtype == np.int32


def test_stored_bytes_do_not_depend_on_sequence_length(feature_set):
    short = dataclasses.replace(feature_set.cfg, long_len=8)
    assert short.store_id() == feature_set.cfg.store_id()  # lengths and side info are read-side choices
    assert "long_hi" in all_samples(feature_set).columns and "long_len" not in json.load(
        open(f"{feature_set.root}/store.json")
    )


# --- incremental days ---------------------------------------------------------------------------------------------


def store_frames(root: str) -> dict[str, pl.DataFrame]:
    """Every committed parquet file of a store, by day and path below its version (day=D/<version>/x -> day=D/x)."""
    out = {}
    for f in committed_files(root, "_meta.json"):
        day, _version, rest = f.removeprefix(f"{root}/").split("/", 2)
        out[f"{day}/{rest}"] = pl.read_parquet(f)
    return out


def assert_same_store(a: str, b: str) -> None:
    fa, fb = store_frames(a), store_frames(b)
    assert fa.keys() == fb.keys() and len(fa) > 0
    for k in fa:
        assert_frame_equal(fa[k], fb[k], check_row_order=True), k


def recommit(partition: str, change) -> None:
    """As if ingest re-validated a clean partition: ``change`` of its data under a new version, then the pointer."""
    from features import storage

    m = storage.current(partition)
    df = change(storage.read_parquet(storage.files_of(partition, m)))
    m = m | {"version": storage.new_version()}
    storage.write_parquet(df, storage.files_of(partition, m)[0])
    storage.publish(partition, m)


def copy_clean(src: str, dst) -> str:
    shutil.copytree(f"{src}/clean", f"{dst}/clean")
    return str(dst)


CFG = FeatureConfig(long_len=64, search_len=16, feed_len=16, n_shards=2)


@pytest.mark.usefixtures("ray_local")
def test_day_by_day_equals_a_full_rebuild_and_reruns_are_idempotent(ingested, tmp_path):
    data_dir, _ = ingested
    inc, full = copy_clean(data_dir, tmp_path / "inc"), copy_clean(data_dir, tmp_path / "full")
    first = END - dt.timedelta(days=DAYS - 1)
    for k in range(1, DAYS + 1):  # the daily schedule: each run's window ends one day later
        fs = build_features(inc, first + dt.timedelta(days=k - 1), k, CFG)
        assert json.load(open(fs.path()))["built"] == [fs.days[-1]]  # only the new day was built
    fs_full = build_features(full, END, DAYS, CFG)
    assert json.load(open(fs_full.path()))["built"] == list(fs_full.days)
    assert_same_store(fs.root, fs_full.root)
    meta = {d: json.load(open(f"{fs.root}/day={d}/_meta.json"))["fp"] for d in fs.days}
    again = build_features(inc, END, DAYS, CFG)  # nothing stale: nothing built, nothing changed
    assert json.load(open(again.path()))["built"] == []
    assert {d: json.load(open(f"{fs.root}/day={d}/_meta.json"))["fp"] for d in fs.days} == meta
    forced = build_features(inc, END, DAYS, CFG, force=True)  # a forced re-run replaces days with equal content
    assert json.load(open(forced.path()))["built"] == list(fs.days)
    assert_same_store(fs.root, fs_full.root)
    assert not glob.glob(f"{fs.root}/.tmp-*") and not glob.glob(f"{fs.root}/*.old-*")

    # a window that starts after the store's first day (ordinals offset by the earlier days) materialises exactly
    # like a store built from that window's first day
    late = build_features(inc, END, DAYS - 1, CFG)
    fresh_fs = build_features(copy_clean(data_dir, tmp_path / "fresh"), END, DAYS - 1, CFG)  # a new store starts there
    samples = all_samples(late)
    batch = {c: samples[c].to_numpy() for c in samples.columns}
    fresh_samples = all_samples(fresh_fs)
    fresh_batch = {c: fresh_samples[c].to_numpy() for c in fresh_samples.columns}
    a = Materializer(late.timelines(), late.cfg, dedup=False)(batch)
    b = Materializer(fresh_fs.timelines(), fresh_fs.cfg, dedup=False)(fresh_batch)
    assert (samples["long_hi"] > fresh_samples["long_hi"]).any()  # the ordinals do differ
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.usefixtures("ray_local")
def test_reingested_day_rebuilds_it_and_its_successors_only(ingested, tmp_path):
    data_dir, _ = ingested
    d = copy_clean(data_dir, tmp_path / "d")
    fs = build_features(d, END, DAYS, CFG)
    middle = fs.days[2]
    recommit(f"{d}/clean/v1/search_events/day={middle}", lambda df: df.head(df.height // 2))  # fewer events
    fs2 = build_features(d, END, DAYS, CFG)
    assert json.load(open(fs2.path()))["built"] == list(fs.days[2:])
    full = copy_clean(d, tmp_path / "full")
    assert_same_store(fs2.root, build_features(full, END, DAYS, CFG).root)


@pytest.mark.usefixtures("ray_local")
def test_a_failed_build_leaves_the_store_unchanged(ingested, tmp_path):
    data_dir, _ = ingested
    d = copy_clean(data_dir, tmp_path / "d")
    fs = build_features(d, END - dt.timedelta(days=1), DAYS - 1, CFG)  # all days but the newest
    before = store_frames(fs.root)
    recommit(f"{d}/clean/v1/impressions/day={END}", lambda df: df.drop("query_id"))  # the newest day cannot be built
    with pytest.raises(Exception, match="query_id"):
        build_features(d, END, DAYS, CFG)
    after = store_frames(fs.root)
    assert before.keys() == after.keys()
    assert not os.path.exists(f"{fs.root}/day={END}/_meta.json"), "the failed day is not committed"


@pytest.mark.parametrize("bad_day", ["2026-13-01", "yesterday"])
def test_bad_day_is_a_clear_error(bad_day):
    from features.schema import parse_day

    with pytest.raises(ValueError, match=bad_day):
        parse_day(bad_day)


def test_event_fields_cover_every_side_info_choice():
    for fields in SIDE_INFO.values():
        assert set(fields) <= set(EVENT_FIELDS) | {"dt"}

"""Tests of the synthetic log generator: the contract on disk, determinism, and the signals the paper's claims need."""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from features.schema import DAILY_TABLES, DIM_TABLES, MS_PER_DAY, TABLES, day_start_ms, logs_root, table_dir, window
from features.synth import SynthConfig, generate

END = dt.date(2026, 1, 31)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Large enough for the signal tests to have power, small enough to generate in about a second.
MODERATE = SynthConfig(
    days=28,
    users=400,
    items=1500,
    authors=120,
    queries=240,
    categories=8,
    requests_per_day=400,
    candidates=10,
    search_events_per_day=1200,
    feed_events_per_day=1800,
)


def _daily(root: str, table: str) -> pl.DataFrame:
    return pl.read_parquet(f"{root}/{table}/day=*/*.parquet", hive_partitioning=False)


def _dim(root: str, table: str) -> pl.DataFrame:
    return pl.read_parquet(f"{table_dir(root, table)}/*.parquet")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, dict]:
    data_dir = str(tmp_path_factory.mktemp("tiny"))
    return logs_root(data_dir), generate(SynthConfig.tiny(), data_dir, END)


@pytest.fixture(scope="module")
def moderate(tmp_path_factory) -> dict[str, pl.DataFrame]:
    data_dir = str(tmp_path_factory.mktemp("moderate"))
    generate(MODERATE, data_dir, END)
    root = logs_root(data_dir)
    frames = {t: _daily(root, t) for t in DAILY_TABLES}
    frames.update({t: _dim(root, t) for t in DIM_TABLES})
    return frames


# ------------------------------------------------------------------------------------------------------- contract


def test_files_match_contract_schema(tiny):
    root, _ = tiny
    days = window(END, SynthConfig.tiny().days)
    for name, table in TABLES.items():
        if table.daily:
            folders = sorted(glob.glob(f"{root}/{name}/day=*"))
            assert folders == [table_dir(root, name, d) for d in days]
            files = [f"{f}/part-0.parquet" for f in folders]
        else:
            files = [f"{table_dir(root, name)}/part-0.parquet"]
        for f in files:
            assert os.listdir(os.path.dirname(f)) == ["part-0.parquet"]  # no temp file left behind
            schema = pq.read_schema(f)
            assert schema.equals(table.schema, check_metadata=False), f"{f}: {schema} != {table.schema}"


def test_rows_in_their_day_required_non_null_and_bounds(tiny):
    root, summary = tiny
    for name, table in TABLES.items():
        for f in glob.glob(f"{root}/{name}/**/*.parquet", recursive=True):
            df = pl.read_parquet(f, hive_partitioning=False)
            assert df.height > 0
            assert df.select(pl.col(table.required).null_count()).sum_horizontal().item() == 0
            for c in table.columns:
                assert df[c.name].null_count() == 0, f"optional column {c.name} of {name} should be filled"
                if c.min is not None:
                    assert df[c.name].min() >= c.min, (name, c.name)
                if c.max is not None:
                    assert df[c.name].max() <= c.max, (name, c.name)
            if table.daily:
                day = dt.date.fromisoformat(os.path.basename(os.path.dirname(f)).removeprefix("day="))
                start = day_start_ms(day)
                assert df["ts"].min() >= start and df["ts"].max() < start + MS_PER_DAY
                assert summary["rows_per_day"][name][day.isoformat()] == df.height


def test_request_structure(tiny):
    root, _ = tiny
    cfg = SynthConfig.tiny()
    imp = _daily(root, "impressions")
    per_request = imp.group_by("request_id").agg(
        n=pl.len(),
        positions=pl.col("position").sort(),
        users=pl.col("user_id").n_unique(),
        queries=pl.col("query_id").n_unique(),
        ts=pl.col("ts").n_unique(),
        items=pl.col("item_id").n_unique(),
    )
    assert per_request.height == cfg.days * cfg.requests_per_day
    assert (per_request["n"] == cfg.candidates).all()
    assert (per_request["items"] == cfg.candidates).all()
    assert (per_request.select(pl.col("users", "queries", "ts")) == 1).to_numpy().all()
    assert all(p.to_list() == list(range(cfg.candidates)) for p in per_request["positions"])
    # request ids unique across days: one day per request
    days = imp.group_by("request_id").agg((pl.col("ts") // MS_PER_DAY).n_unique().alias("d"))
    assert (days["d"] == 1).all()
    # watch time only after a click
    assert imp.filter(pl.col("label") == 0)["watch_time_s"].max() == 0.0
    assert imp.filter(pl.col("label") == 1)["watch_time_s"].min() > 0.0


def test_ids_covered_by_dims_and_consistent(tiny):
    root, _ = tiny
    users, items, queries = (_dim(root, t) for t in DIM_TABLES)
    assert users["user_id"].to_list() == list(range(users.height))
    for t in DAILY_TABLES:
        df = _daily(root, t)
        assert df["user_id"].is_in(users["user_id"].implode()).all()
        assert df["item_id"].is_in(items["item_id"].implode()).all()
        if "query_id" in df.columns:
            assert df["query_id"].is_in(queries["query_id"].implode()).all()
        if "author_id" in df.columns:  # events carry the item's own author and category
            joined = df.join(items, on="item_id", suffix="_dim")
            assert (joined["author_id"] == joined["author_id_dim"]).all()
            assert (joined["category_id"] == joined["category_id_dim"]).all()
    assert queries["category_id"].is_in(items["category_id"].implode()).all()


def test_search_events_contain_clicks_after_their_impression(tiny):
    root, summary = tiny
    imp = _daily(root, "impressions").filter(pl.col("label") == 1)
    se = _daily(root, "search_events")
    cfg = SynthConfig.tiny()
    assert se.height == imp.height + cfg.days * cfg.search_events_per_day
    j = imp.join(se, on=["user_id", "query_id", "item_id"], suffix="_click")
    first_after = j.filter(pl.col("ts_click") > pl.col("ts")).group_by("request_id", "item_id").agg(pl.len())
    assert first_after.height == imp.height  # every click has a search event strictly after its impression
    assert (se["watch_time_s"] > 0).all()
    # extra clicks use a query of the clicked item's category: an off-query-category click is an impression's click
    q = _dim(root, "queries").select("query_id", query_cat="category_id")
    off = se.join(q, on="query_id").filter(pl.col("query_cat") != pl.col("category_id"))
    assert off.join(imp, on=["user_id", "query_id", "item_id"], how="anti").height == 0
    assert summary["rows"]["search_events"] == se.height


# ---------------------------------------------------------------------------------------------------- determinism


def _read_all(data_dir: str) -> dict[str, bytes]:
    root = logs_root(data_dir)
    files = sorted(glob.glob(f"{root}/**/*.parquet", recursive=True))
    return {os.path.relpath(f, root): open(f, "rb").read() for f in files}


def test_deterministic_per_seed(tmp_path, tiny):
    cfg = SynthConfig.tiny()
    generate(cfg, str(tmp_path / "a"), END)
    generate(cfg, str(tmp_path / "b"), END)
    generate(dataclasses.replace(cfg, seed=1), str(tmp_path / "c"), END)
    a, b, c = (_read_all(str(tmp_path / x)) for x in "abc")
    assert a == b  # byte-identical files
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


# Content hashes of SynthConfig.tiny() ending at END, recorded before p_click_ns / p_click_seq were added: the new
# columns draw no random number, so every column that existed then is bit-identical. (Per table, per day file, the
# raw bytes of each listed column; the float columns hold float32 values of libm's exp/log, which a platform with
# another libm could change in the last bit of a float64 and, rarely, of a float32.)
GOLDEN_TINY = {
    "impressions": "de1b9eb9e5628233",
    "search_events": "741b6d3f3924bf08",
    "feed_events": "b16bb447a941b380",
    "users": "868675ae2ba6f9f5",
    "items": "89ab64c4f8f8a7f6",
    "queries": "6e341f0a11c8404e",
}
IMPRESSION_COLUMNS_BEFORE = (
    "request_id",
    "user_id",
    "query_id",
    "item_id",
    "position",
    "ts",
    "device_type",
    "network_type",
    "label",
    "watch_time_s",
    "p_click",
)


def _content_hash(root: str, table: str, columns) -> str:
    h = hashlib.sha256()
    for f in sorted(glob.glob(f"{table_dir(root, table)}/**/*.parquet", recursive=True)):
        t = pq.read_table(f)
        for c in columns:
            h.update(c.encode())
            h.update(np.ascontiguousarray(t.column(c).to_numpy()).tobytes())
    return h.hexdigest()[:16]


def test_existing_columns_are_bit_identical_to_before_the_ground_truth_split(tiny):
    root, _ = tiny
    for table, want in GOLDEN_TINY.items():
        cols = IMPRESSION_COLUMNS_BEFORE if table == "impressions" else TABLES[table].schema.names
        assert _content_hash(root, table, cols) == want, table


def test_refuses_to_overwrite(tmp_path):
    cfg = dataclasses.replace(SynthConfig.tiny(), days=2)
    generate(cfg, str(tmp_path), END)
    with pytest.raises(FileExistsError):
        generate(cfg, str(tmp_path), END)
    summary = generate(dataclasses.replace(cfg, days=1, seed=3), str(tmp_path), END, overwrite=True)
    root = logs_root(str(tmp_path))
    assert sorted(os.listdir(f"{root}/impressions")) == [f"day={END.isoformat()}"]  # old partitions removed
    assert summary["rows"]["impressions"] == cfg.requests_per_day * cfg.candidates


def test_config_validation():
    with pytest.raises(ValueError, match="authors >= categories"):
        SynthConfig(authors=3, categories=8)


# --------------------------------------------------------------------------------------------------------- signals


def _auc(score: pl.Series, label: pl.Series) -> float:
    r = score.rank("average").to_numpy()
    y = label.to_numpy() == 1
    n_pos, n_neg = y.sum(), (~y).sum()
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_ctr_and_oracle_auc(moderate):
    imp = moderate["impressions"]
    assert 0.05 <= imp["label"].mean() <= 0.15
    assert abs(imp["label"].mean() - imp["p_click"].mean()) < 0.01  # label ~ Bernoulli(p_click)
    assert _auc(imp["p_click"], imp["label"]) > 0.7
    # each half of the click model ranks better than chance and worse than the whole
    full, ns, seq = (_auc(imp[c], imp["label"]) for c in ("p_click", "p_click_ns", "p_click_seq"))
    assert 0.55 < ns < full - 0.02 and 0.55 < seq < full - 0.02, (full, ns, seq)


# ------------------------------------------------------------------------------------------- ground truth, split


def _logit(p: pl.Series) -> np.ndarray:
    x = np.clip(p.to_numpy().astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(x) - np.log1p(-x)


def _impressions(cfg: SynthConfig, data_dir: str) -> tuple[pl.DataFrame, dict]:
    summary = generate(cfg, data_dir, END)
    return _daily(logs_root(data_dir), "impressions"), summary


def test_ground_truth_halves_recombine(tmp_path, tiny):
    """Without noise, logit(p_click) = logit(p_click_ns) + logit(p_click_seq) - bias; with it, both halves hold the
    same noise draw, so the left-over is exactly that draw once: sd click_noise."""
    cfg = SynthConfig.tiny()
    imp, _ = _impressions(dataclasses.replace(cfg, click_noise=0.0), str(tmp_path / "quiet"))
    rest = _logit(imp["p_click_ns"]) + _logit(imp["p_click_seq"]) - cfg.click_bias - _logit(imp["p_click"])
    np.testing.assert_allclose(rest, 0.0, atol=1e-4)  # float32 probabilities
    root, summary = tiny
    imp = _daily(root, "impressions")
    noise = _logit(imp["p_click_ns"]) + _logit(imp["p_click_seq"]) - cfg.click_bias - _logit(imp["p_click"])
    assert imp.height > 1000 and abs(noise.mean()) < 0.05 and 0.25 < noise.std() < 0.35
    for c in ("p_click", "p_click_ns", "p_click_seq"):
        assert summary[f"mean_{c}"] == pytest.approx(imp[c].cast(pl.Float64).mean(), rel=1e-9)


def test_ground_truth_halves_hold_exactly_their_terms(tmp_path):
    """With the history-only weights at 0, p_click_ns is p_click; with every other weight at 0, p_click_seq is."""
    cfg = SynthConfig.tiny()
    no_history = dataclasses.replace(cfg, click_interest=0.0, click_fav_match=0.0, click_fav_other=0.0)
    imp, _ = _impressions(no_history, str(tmp_path / "a"))
    assert (imp["p_click_ns"] == imp["p_click"]).all() and not (imp["p_click_seq"] == imp["p_click"]).all()
    history_only = dataclasses.replace(
        cfg,
        click_relevance=0.0,
        click_position=0.0,
        click_evening=0.0,
        click_night=0.0,
        click_device=(0.0,) * 4,
        click_mobile_duration=0.0,
        click_web_duration=0.0,
        click_cellular_duration=0.0,
        click_quality=0.0,
    )
    imp, _ = _impressions(history_only, str(tmp_path / "b"))
    assert (imp["p_click_seq"] == imp["p_click"]).all() and not (imp["p_click_ns"] == imp["p_click"]).all()


def test_position_bias(moderate):
    imp = moderate["impressions"]
    ctr = imp.group_by("position").agg(pl.col("label").mean()).sort("position")["label"]
    assert ctr[0] > ctr[-1] + 0.03


def _with_categories(m: dict[str, pl.DataFrame]) -> pl.DataFrame:
    return (
        m["impressions"]
        .join(m["queries"].select("query_id", query_cat="category_id"), on="query_id")
        .join(m["items"].select("item_id", "author_id", item_cat="category_id"), on="item_id")
    )


def test_query_relevance(moderate):
    imp = _with_categories(moderate)
    ctr = imp.group_by(relevant=pl.col("item_cat") == pl.col("query_cat")).agg(pl.col("label").mean())
    ctr = dict(zip(ctr["relevant"], ctr["label"]))
    assert ctr[True] > 1.5 * ctr[False]


def test_history_carries_author_affinity(moderate):
    """On query-relevant items, an author already in the user's history is clicked more than an unseen one."""
    events = pl.concat([moderate[t].select("user_id", "author_id", "ts") for t in ("search_events", "feed_events")])
    first_seen = events.group_by("user_id", "author_id").agg(first_ts=pl.col("ts").min())
    imp = (
        _with_categories(moderate)
        .filter(pl.col("item_cat") == pl.col("query_cat"))
        .join(first_seen, on=["user_id", "author_id"], how="left")
        .with_columns(seen=pl.col("first_ts").is_not_null() & (pl.col("first_ts") < pl.col("ts")))
    )
    ctr = imp.group_by("seen").agg(pl.len(), pl.col("label").mean())
    ctr = dict(zip(ctr["seen"], ctr["label"]))
    assert ctr[True] > ctr[False] + 0.01


def test_interest_drift(moderate):
    """Category mix of a user's events: early days vs the last week differ more than two spans of the last week.

    The three spans have the same length (3 days) so that sampling noise is the same on both sides.
    """
    events = pl.concat(
        [moderate[t].select("user_id", "category_id", "ts") for t in ("search_events", "feed_events")]
    ).with_columns(d=(pl.col("ts") - day_start_ms(window(END, MODERATE.days)[0])) // MS_PER_DAY)
    D = MODERATE.days

    def mix(lo: int, hi: int) -> pl.DataFrame:
        span = events.filter(pl.col("d").is_between(lo, hi, closed="left"))
        return span.group_by("user_id", "category_id").agg(n=pl.len())

    def mean_tv(a: pl.DataFrame, b: pl.DataFrame, min_events: int = 15) -> float:
        both = a.join(b, on=["user_id", "category_id"], how="full", coalesce=True).fill_null(0)
        both = both.with_columns(
            na=pl.col("n").sum().over("user_id"), nb=pl.col("n_right").sum().over("user_id")
        ).filter((pl.col("na") >= min_events) & (pl.col("nb") >= min_events))
        tv = both.group_by("user_id").agg(
            tv=(pl.col("n") / pl.col("na") - pl.col("n_right") / pl.col("nb")).abs().sum() / 2
        )
        assert tv.height >= 30
        return tv["tv"].mean()

    early, last_a, last_b = mix(0, 3), mix(D - 7, D - 4), mix(D - 4, D - 1)
    assert mean_tv(early, last_a) > 1.1 * mean_tv(last_a, last_b)


def test_heavy_and_light_users(moderate):
    clicks = moderate["search_events"].group_by("user_id").len()["len"]
    assert clicks.max() > 10 * clicks.median()


# ------------------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "features.synth", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli(tmp_path):
    help_ = _cli("--help")
    assert help_.returncode == 0 and "--requests-per-day" in help_.stdout and "synthetic" in help_.stdout.lower()
    args = ["--data-dir", str(tmp_path), "--end", "2026-01-31", "--days", "3", "--users", "50", "--items", "150"]
    args += ["--authors", "20", "--queries", "30", "--categories", "5", "--requests-per-day", "20"]
    args += ["--candidates", "4", "--search-events-per-day", "40", "--feed-events-per-day", "60", "--seed", "7"]
    run = _cli(*args)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["rows"]["impressions"] == 3 * 20 * 4
    assert summary["rows"]["feed_events"] == 3 * 60
    assert summary["rows"]["users"] == 50
    assert list(summary["rows_per_day"]["impressions"]) == ["2026-01-29", "2026-01-30", "2026-01-31"]
    again = _cli(*args)
    assert again.returncode != 0 and "overwrite" in again.stderr
    assert _cli(*args, "--overwrite").returncode == 0

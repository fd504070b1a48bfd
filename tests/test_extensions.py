"""Extension columns: declared extra columns of the logs are validated at ingest (type, bounds) and kept, and
features read them; undeclared ones are still dropped (and named)."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from features.build import FeatureConfig
from jobs.build_features import logs_to_features
from tests.conftest import END, committed_files

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = {
    "columns": {
        "items": {"length_min": {"type": "float32", "min": 0}, "tags": {"type": "id_list"}},
        "impressions": {"slot": {"type": "int32", "min": 0, "max": 9, "doc": "ad slot of the page"}},
    },
    "features": {
        "item_length": {"table": "items", "column": "length_min", "kind": "dense", "norm": "log1p"},
        "slot": {"table": "impressions", "column": "slot", "kind": "id", "vocab": 11},
    },
    "tokens": {
        "user": ("user_id", "age_bucket"),
        "item": ("item_id", "item_category", "item_length"),
        "context": ("position_b", "slot"),
    },
    "long_len": 16,
    "search_len": 4,
    "feed_len": 4,
    "n_shards": 2,
}


def test_declared_columns_are_validated_kept_and_read_by_features(tmp_path, synth_dir):
    data = tmp_path / "data"
    shutil.copytree(f"{synth_dir}/logs", data / "logs")
    logs = data / "logs" / "v1"
    for f in (logs / "items").glob("*.parquet"):
        items = pl.read_parquet(f)
        tags = pl.format("{}|{}", pl.col("category_id"), pl.col("author_id"))
        tags = pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("7,8")).otherwise(tags)  # not an id list: quarantined
        items.with_columns((pl.col("duration_s") / 60).alias("length_min"), tags.alias("tags")).write_parquet(f)
    imps = []
    for day in ("2026-11-21", "2026-11-22"):
        for f in (logs / "impressions" / f"day={day}").glob("*.parquet"):
            df = pl.read_parquet(f).with_columns((pl.col("position") % 10).cast(pl.Int32).alias("slot"))
            df = df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(42).otherwise(pl.col("slot")).alias("slot"))
            df.with_columns(pl.lit("x").alias("undeclared")).write_parquet(f)
            imps.append(df)
    cfg = FeatureConfig(**SPEC)
    counts, fs = logs_to_features(str(data), END, 2, cfg, max_quarantine_share=0.5)
    # the out-of-bounds slot is quarantined with its reason; every other row is kept with its extension column
    q = pl.read_parquet(committed_files(f"{data}/quarantine/v1/impressions"))
    slot = q.filter(pl.col("_reason").str.starts_with("slot: "))
    assert slot.height == 2 and slot["_row"].to_list() == [0, 0] and slot["_reason"][0] == "slot: 42 outside [0, 9]"
    # the rest: impressions of the item whose tags were quarantined (its id is no longer in the clean items)
    assert q.filter(~pl.col("_reason").str.starts_with("slot: "))["_reason"].str.contains("not in items").all()
    clean = pl.read_parquet(committed_files(f"{data}/clean/v1/impressions"))
    assert "slot" in clean.columns and "undeclared" not in clean.columns
    assert counts["impressions"].clean == clean.height == sum(df.height for df in imps) - q.height
    assert counts["impressions"].extra_columns == ["undeclared"]  # named in the log, not kept
    assert {"length_min", "tags"} <= set(pl.read_parquet(committed_files(f"{data}/clean/v1/items")).columns)
    bad_items = pl.read_parquet(committed_files(f"{data}/quarantine/v1/items"))
    assert bad_items["_reason"].to_list() == ["tags: 7,8 does not match (\\d+(\\|\\d+)*)?"]
    # the features read them: ns_slot (id, bucket of the slot) and dense_item_length (log1p(minutes))
    samples = pl.read_parquet(fs.sample_files()).sort("request_id", "ns_item_id")
    items = pl.read_parquet(committed_files(f"{data}/clean/v1/items")).select("item_id", "length_min")
    vocab = fs.cfg.vocab
    want = clean.join(items, on="item_id").select(
        "request_id",
        (pl.col("item_id") % (vocab["item"] - 1) + 1).cast(pl.Int32).alias("ns_item_id"),
        (pl.col("slot") % 10 + 1).alias("want_slot"),
        pl.col("length_min").log1p().cast(pl.Float32).alias("want_len"),
    )
    j = samples.join(want, on=["request_id", "ns_item_id"])
    assert j.height == samples.height
    assert (j["ns_slot"] == j["want_slot"]).all()
    assert ((j["dense_item_length"] - j["want_len"]).abs() < 1e-5).all()
    # a second run keeps everything (same declaration: up to date); another declaration re-validates
    again, _ = logs_to_features(str(data), END, 2, cfg, max_quarantine_share=0.5)
    assert again["impressions"].skipped_days == 2
    wider = FeatureConfig(**(SPEC | {"columns": SPEC["columns"] | {"users": {"score": {"type": "float64"}}}}))
    third, _ = logs_to_features(str(data), END, 2, wider, max_quarantine_share=0.5)
    assert third["impressions"].skipped_days == 2 and third["users"].clean > 0  # only the users snapshot changed

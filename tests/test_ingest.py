"""Ingest stage: counts reconcile, invalid rows are quarantined with reasons, missing/corrupt input is a clear error."""

from __future__ import annotations

import datetime as dt
import glob
import json
import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest

from features.schema import TABLES, day_start_ms, window
from features.validate import ContractError, validate
from jobs.ingest import MissingPartitionError, ingest
from tests.conftest import DAYS, END, committed_files

pytestmark = pytest.mark.usefixtures("ray_local")


def test_counts_reconcile_and_clean_data_is_typed(ingested):
    data_dir, counts = ingested
    assert set(counts) == set(TABLES)
    for name, c in counts.items():
        assert c.read == c.clean + c.quarantined and c.read > 0, name
        assert c.quarantined == 0, name  # the generator writes valid logs
        clean = pl.read_parquet(committed_files(f"{data_dir}/clean/v1/{name}"))
        assert clean.height == c.clean
        want = pl.from_arrow(TABLES[name].schema.empty_table()).schema
        assert {k: clean.schema[k] for k in want} == dict(want), name
    assert counts["impressions"].files == DAYS
    with open(f"{data_dir}/clean/v1/_ingest.json") as f:
        summary = json.load(f)
    assert sorted(summary["partitions"]["impressions"]) == [str(d) for d in window(END, DAYS)]
    for day in window(END, DAYS):  # each day partition carries the manifest that makes re-runs skip it
        with open(f"{data_dir}/clean/v1/impressions/day={day}/_manifest.json") as f:
            m = json.load(f)
        assert m["day"] == str(day) and m["counts"]["read"] == m["counts"]["clean"] and len(m["files"]) == 1


def test_rerun_skips_days_that_are_up_to_date(ingested):
    data_dir, first = ingested
    again = ingest(data_dir, END, DAYS)
    for name, c in again.items():
        assert (c.read, c.clean, c.quarantined) == (first[name].read, first[name].clean, first[name].quarantined)
        assert c.skipped_days == (DAYS if TABLES[name].daily else 0), name


def copy_logs(src: str, dst) -> str:
    shutil.copytree(f"{src}/logs", f"{dst}/logs")
    return str(dst)


def test_invalid_rows_are_quarantined_with_reasons(synth_dir, tmp_path):
    data_dir = copy_logs(synth_dir, tmp_path)
    f = glob.glob(f"{data_dir}/logs/v1/impressions/day={END}/*.parquet")[0]
    df = pl.read_parquet(f)
    bad = (
        df.with_row_index()
        .with_columns(
            pl.when(pl.col("index") == 0).then(3).otherwise(pl.col("label")).cast(pl.Int8).alias("label"),
            pl.when(pl.col("index") == 1).then(None).otherwise(pl.col("user_id")).alias("user_id"),
            pl.when(pl.col("index") == 2)
            .then(day_start_ms(END - dt.timedelta(days=3)))
            .otherwise(pl.col("ts"))
            .alias("ts"),
        )
        .drop("index")
    )
    pq.write_table(bad.to_arrow(), f)  # nullable types: the contract schema would refuse the null
    counts = ingest(data_dir, END, 2)
    c = counts["impressions"]
    assert c.quarantined == 3 and c.clean == c.read - 3 and c.read == 2 * df.height  # 2 days of equal size
    q = pl.read_parquet(committed_files(f"{data_dir}/quarantine/v1/impressions")).sort("_reason")
    reasons = " | ".join(q["_reason"].to_list())
    assert "label: 3 outside [0, 1]" in reasons
    assert "user_id: null in required field" in reasons
    assert f"outside partition day={END}" in reasons
    assert all(p == f for p in q["_file"])  # every bad row came from the one rewritten file ...
    assert sorted(q["_row"].to_list()) == [0, 1, 2]  # ... and is named by its row
    assert q["day"].to_list() == [str(END)] * 3
    assert q["_raw"].str.contains('"label":3').any()
    assert c.skipped_days == 0 and c.days == 2


def test_missing_partition_is_named(synth_dir, tmp_path):
    data_dir = copy_logs(synth_dir, tmp_path)
    gone = f"{data_dir}/logs/v1/feed_events/day={END - dt.timedelta(days=1)}"
    shutil.rmtree(gone)
    with pytest.raises(MissingPartitionError, match=gone):
        ingest(data_dir, END, 2)


def test_corrupt_file_is_named(synth_dir, tmp_path):
    data_dir = copy_logs(synth_dir, tmp_path)
    f = glob.glob(f"{data_dir}/logs/v1/search_events/day={END}/*.parquet")[0]
    with open(f, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ContractError, match=f"unreadable Parquet file {f}"):
        ingest(data_dir, END, 2)


def test_missing_required_column_names_file_and_column():
    df = pl.DataFrame({"user_id": [1], "ts": [day_start_ms(END)]})
    with pytest.raises(
        ValueError, match=r"x\.parquet: table 'feed_events' is missing required column\(s\) \['item_id'"
    ):
        validate(df, TABLES["feed_events"], END, "x.parquet")


def test_window_outside_the_logs_is_a_clear_error(synth_dir):
    with pytest.raises(MissingPartitionError, match=f"day={END + dt.timedelta(days=1)}"):
        ingest(synth_dir, END + dt.timedelta(days=1), 2)

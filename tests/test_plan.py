"""--dry-run / --validate-only: the config, storage, window and schemas checked, the plan printed, nothing written."""

from __future__ import annotations

import json
import os
import shutil

import polars as pl

from tests.conftest import END


def snapshot(root) -> dict[str, tuple[int, int]]:
    return {
        os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(root)
        for f in files
    }


def plan_of(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("daily_train: plan ")).split(" ", 2)[2])


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path, synth_dir, capsys):
    from workflows.daily_train import main

    data = tmp_path / "data"
    shutil.copytree(f"{synth_dir}/logs", data / "logs")
    before = snapshot(data)
    assert main(["--data-dir", str(data), "--date", str(END), "--days", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = plan_of(out)
    assert plan["ingest"] == {
        "partitions": 3 + 3 * 3,  # users, items, queries + 3 days of impressions, search and feed events
        "to_validate": 12,
        "days_to_validate": ["2026-11-20", "2026-11-21", "2026-11-22"],
    }
    assert plan["features"]["new_store"] and plan["features"]["days_to_build"] == plan["ingest"]["days_to_validate"]
    m = plan["model"]
    assert list(m["sequences"]) == ["long", "search", "feed"] and m["dense_params"] > 0 and m["embedding_params"] > 0
    assert m["train_gflops_per_step"] > 0
    assert "ingest: 12 of 12 partitions to validate" in out and "features: 3 day(s) to build" in out
    assert snapshot(data) == before  # no lock, no clean/, no features/, no mlflow/


def test_validate_only_names_a_file_without_a_required_column(tmp_path, synth_dir, capsys):
    from workflows.daily_train import main

    data = tmp_path / "data"
    shutil.copytree(f"{synth_dir}/logs", data / "logs")
    part = data / "logs" / "v1" / "feed_events" / f"day={END}"
    f = next(part.glob("*.parquet"))
    pl.read_parquet(f).drop("watch_time_s").write_parquet(f)
    before = snapshot(data)
    assert main(["--data-dir", str(data), "--date", str(END), "--days", "2", "--validate-only"]) == 1
    err = capsys.readouterr().err
    assert str(f) in err and "watch_time_s" in err, err
    assert snapshot(data) == before
    # a feed-only experiment does not read search events: a broken search_events day does not concern it
    search = data / "logs" / "v1" / "search_events" / f"day={END}"
    for g in search.glob("*.parquet"):
        g.write_bytes(b"not parquet")
    pl.read_parquet(f).with_columns(pl.lit(1.0, pl.Float32).alias("watch_time_s")).write_parquet(f)
    feed_only = ["--config", "configs/movielens.yaml", "--data-dir", str(data), "--date", str(END), "--days", "2"]
    assert main([*feed_only, "--dry-run"]) == 0
    assert plan_of(capsys.readouterr().out)["tables"] == ["impressions", "users", "items", "feed_events"]

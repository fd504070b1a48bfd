"""The benchmark entry points run for real at a tiny size (their numbers are not asserted: benchmarks/ owns them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_features_benchmark_runs_and_writes_its_results(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.features", "--scale", "0.01", "--windows", "2,3", "--lengths", "16",
           "--batches", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "features.json").read_text())
    assert [b["days"] for b in res["builds"]] == [2, 3]
    assert res["builds"][1]["impressions"] > res["builds"][0]["impressions"] > 0
    assert res["increment"]["days_built"] == 1  # only the deleted newest day is rebuilt
    assert res["read_side"][0]["long_len"] == 16 and 0 < res["read_side"][0]["unique_ratio"] <= 1
    assert "| window days |" in (tmp_path / "out" / "features.md").read_text()

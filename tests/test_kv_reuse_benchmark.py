"""The KV-reuse benchmark runs for real at a tiny size; its behaviour is asserted, never its timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kv_reuse_benchmark_runs_and_writes_its_results(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.kv_reuse",
        "--preset",
        "tiny",
        "--ms",
        "1,4",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "kv_reuse.json").read_text())
    assert res["preset"] == "tiny" and res["config"]["attn_impl"] == "sdpa"
    assert res["machine"]["torch"] and res["machine"]["cpu_count"] >= 1
    assert [r["m"] for r in res["rows"]] == [1, 4]
    for r in res["rows"]:
        assert r["speedup"] > 0 and r["baseline_ms"] > 0 and r["reuse_ms"] > 0
        assert len(r["times_ms"]["baseline"]) == len(r["times_ms"]["reuse"]) == 2
        assert r["max_abs_diff"] < 1e-4  # both paths compute the same logits
        assert r["max_abs_logit"] > 0  # ... which are not all zero
        assert r["reuse_gflops"] == pytest.approx(r["encode_gflops"] + r["score_gflops"]) and r["score_gflops"] > 0
    one, four = res["rows"]
    # with one candidate both paths do the same work; with more, only the baseline repeats the sequence side
    assert one["flops_ratio"] == 1.0
    assert four["encode_gflops"] == one["encode_gflops"] and four["flops_ratio"] > 1
    assert four["baseline_gflops"] == pytest.approx(4 * one["baseline_gflops"])
    assert res["flops_speedup_limit"] > four["flops_ratio"]
    assert "| M candidates |" in (tmp_path / "kv_reuse.md").read_text()

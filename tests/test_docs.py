"""The docs and the code agree: every contract column is documented; every entry point answers --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from features.schema import TABLES

ROOT = Path(__file__).resolve().parents[1]


def test_data_doc_lists_every_contract_column():
    doc = (ROOT / "docs" / "data.md").read_text()
    for t in TABLES.values():
        section = doc.split(f"### `{t.name}`")[1].split("###")[0]
        for c in t.columns:
            row = next((line for line in section.splitlines() if line.startswith(f"| `{c.name}` |")), None)
            assert row is not None, f"{t.name}.{c.name} missing from docs/data.md"
            assert ("| yes |" in row) == c.required, f"{t.name}.{c.name}: required flag differs"


def test_readme_opens_with_the_two_commands():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.strip()]
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block == [
        "bash infra/install.sh && .venv/bin/python workflows/daily_train.py",
        "bash infra/install.sh --dev && .venv/bin/python -m pytest",
    ]
    assert "bash infra/install.sh --dev && .venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "cmd",
    [
        ["workflows/daily_train.py"],
        ["-m", "jobs.ingest"],
        ["-m", "jobs.build_features"],
        ["-m", "jobs.train"],
        ["-m", "jobs.score"],
        ["-m", "jobs.online"],
        ["-m", "jobs.export"],
        ["workflows/tune.py"],
        ["jobs/submit.py"],
        ["-m", "features.synth"],
    ],
)
def test_entry_points_answer_help(cmd):
    proc = subprocess.run([sys.executable, *cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--" in proc.stdout


def test_results_doc_holds_the_committed_benchmark_tables_and_plots():
    """docs/results.md quotes benchmarks/results/quality_*.md verbatim, and every file it links exists."""
    import re

    doc = (ROOT / "docs" / "results.md").read_text()
    names = ("quality_tables", "quality_side_info", "quality_scaling", "quality_movielens")
    for name in names:
        table = (ROOT / "benchmarks" / "results" / f"{name}.md").read_text().strip()
        assert table in doc, f"docs/results.md is out of date with benchmarks/results/{name}.md"
    for link in re.findall(r"\]\(([^)#]+)\)", doc):
        if not link.startswith("http"):
            assert (ROOT / "docs" / link).resolve().exists(), link

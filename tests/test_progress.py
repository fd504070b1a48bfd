"""Progress people can see: lines with rate and ETA where there is no terminal, a tqdm bar where there is one."""

from __future__ import annotations

import io
import logging
import re

from jobs.progress import Progress


def test_without_a_terminal_progress_is_plain_lines_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="hyformer")
    with Progress("ingest days", total=4, unit="partitions", every_s=0.0, tty=False) as bar:
        for _ in range(4):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"ingest days: 1/4 partitions \(25%\), [\d.e+]+ partitions/s, ETA \d+:\d\d:\d\d", lines[0])
    assert len(lines) == 4  # 3 while it runs (every_s=0), then the end; never two at 100%
    assert re.fullmatch(r"ingest days: 4/4 partitions \(100%\), [\d.e+]+ partitions/s, in \d+:\d\d:\d\d", lines[-1])


def test_lines_are_throttled_to_one_per_interval(caplog):
    caplog.set_level(logging.INFO, logger="hyformer")
    with Progress("features", total=1000, unit="shard-days", every_s=3600.0, tty=False) as bar:
        for _ in range(1000):
            bar.update()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["features: 1000/1000 shard-days"]


def test_in_a_terminal_it_is_a_bar():
    out = io.StringIO()
    with Progress("score", total=3, unit="user slices", tty=True, file=out) as bar:
        bar.update(3)
    text = out.getvalue()
    assert "score" in text and "3/3" in text and "user slices/s" in text

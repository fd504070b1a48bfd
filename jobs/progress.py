"""Progress of a long stage that people can see: a bar with rate and ETA in a terminal, plain periodic lines elsewhere.

    with Progress("ingest", total=len(parts), unit="partitions") as bar:
        for result in results:          # as each one finishes
            bar.update()

In a terminal (stderr is a TTY) it is a tqdm bar; in CI, in `ray job logs` and under a scheduler it logs one line at
most every ``every_s`` seconds and one at the end::

    ingest: 35/140 partitions (25%), 4.1 partitions/s, ETA 0:00:26

Training has its own lines (hyformer.loop: loss, learning rate, samples/s, epoch ETA, every --log-every steps),
mirrored to MLflow while the run goes (jobs.train.LiveMetrics).
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from typing import TextIO

from tqdm import tqdm

from jobs.common import log


def _eta(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


class Progress:
    """``total`` units of work of stage ``what``; ``update(n)`` as they finish. ``tty`` (default: whether ``file``,
    stderr, is a terminal) picks the bar or the lines."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "it",
        every_s: float = 10.0,
        tty: bool | None = None,
        file: TextIO | None = None,
    ):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        file = file or sys.stderr
        self.tty = file.isatty() if tty is None else tty
        self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=file, dynamic_ncols=True) if self.tty else None

    def line(self, final: bool = False) -> str:
        """``what: done/total unit (pct), rate unit/s, ETA h:mm:ss`` (at the end: the time taken instead of the ETA)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _eta((self.total - self.done) / rate) if rate > 0 else "?"
        tail = f"in {_eta(elapsed)}" if final else f"ETA {eta}"
        return f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.3g} {self.unit}/s, {tail}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            log.info("%s", self.line(final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

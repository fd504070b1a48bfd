"""Leftovers of earlier runs, removed at the start of the next daily run, so that disk use stays bounded.

- Ray Train run folders (``<data>/train/daily-<date>-<unix time>``: checkpoints with the optimisers' state) beyond the
  newest ``KEEP_RUNS`` once older than ``RUN_RETENTION_S``. A registered model has its own copy (MLflow's artifacts),
  so a run folder only serves to resume that run or to warm-start from an explicit checkpoint path.
- Registry downloads in the local temporary folder (``hyformer-registry-*``, ``hyformer-model-*``) older than
  ``storage.RETENTION_S``: a run that ends removes its own, a killed one leaves them.

Old versions of the data directory's partitions are collected by each commit (``features.storage.collect_garbage``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

from features import storage
from jobs.common import log

KEEP_RUNS = 3  # the newest training runs are always kept
RUN_RETENTION_S = 7 * 24 * 3600
TEMP_PREFIXES = ("hyformer-registry-", "hyformer-model-")
RUN_NAME = re.compile(r"daily-\d{4}-\d{2}-\d{2}-(\d+)")  # workflows/daily_train.py's run names (+ "-noseq")


def stale_runs(names: list[str], now: float) -> list[str]:
    """The training runs among folder ``names`` to remove: all but the newest ``KEEP_RUNS``, once older than
    ``RUN_RETENTION_S`` (their start time is in their name); other folders are never touched."""
    runs = sorted((int(m.group(1)), n) for n in names if (m := RUN_NAME.match(n)))
    return [n for started, n in runs[:-KEEP_RUNS] if now - started > RUN_RETENTION_S]


def clean_leftovers(data_dir: str, now: float | None = None, temp_dir: str | None = None) -> dict[str, int]:
    """Remove what earlier (also killed) runs left behind (module docstring); returns how many of each."""
    now = time.time() if now is None else now
    train_dir = storage.join(data_dir, "train")
    runs = stale_runs(storage.list_dirs(train_dir, "daily-"), now) if storage.exists(train_dir) else []
    for name in runs:
        storage.remove(storage.join(train_dir, name))
    downloads = 0
    with os.scandir(temp_dir or tempfile.gettempdir()) as entries:
        for e in entries:
            if e.name.startswith(TEMP_PREFIXES) and e.is_dir(follow_symlinks=False):
                if now - e.stat(follow_symlinks=False).st_mtime > storage.RETENTION_S:
                    shutil.rmtree(e.path, ignore_errors=True)
                    downloads += 1
    if runs or downloads:
        log.info(
            "clean up: %d old training run folder(s), %d leftover registry download(s) removed", len(runs), downloads
        )
    return {"train_runs": len(runs), "downloads": downloads}

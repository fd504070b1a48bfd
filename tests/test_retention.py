"""jobs.retention: what earlier (and killed) runs left behind is removed by the next run, so disk use stays bounded."""

from __future__ import annotations

import os
import time

import pytest

from features import storage
from jobs.retention import KEEP_RUNS, RUN_RETENTION_S, clean_leftovers

DAY = 24 * 3600


@pytest.fixture(params=["local", "s3"])
def data_dir(request, tmp_path) -> str:
    return str(tmp_path / "data") if request.param == "local" else storage.join(request.getfixturevalue("s3"), "data")


def test_old_training_runs_beyond_the_newest_and_killed_runs_downloads_are_removed(data_dir, tmp_path):
    now = time.time()
    ages = [30, 20, 10, 9, 8, 1]  # days; the 3 newest stay whatever their age, the others once past the retention
    runs = [f"daily-2026-11-{20 + i:02d}-{int(now - age * DAY)}" for i, age in enumerate(ages)]
    for name in [*runs, "other-folder"]:
        storage.write_bytes(storage.join(data_dir, "train", name, "checkpoint_0", "model.pt"), b"weights")
    temp = tmp_path / "tmp"
    for name, age in (("hyformer-registry-old", 2), ("hyformer-model-old", 3), ("hyformer-registry-new", 0.1)):
        (temp / name / "champion").mkdir(parents=True)
        t = now - age * DAY
        os.utime(temp / name, (t, t))
    (temp / "someone-elses").mkdir()
    os.utime(temp / "someone-elses", (now - 9 * DAY, now - 9 * DAY))

    assert clean_leftovers(data_dir, now, str(temp)) == {"train_runs": 3, "downloads": 2}
    left = storage.list_dirs(storage.join(data_dir, "train"))
    assert left == sorted([*runs[-KEEP_RUNS:], "other-folder"])
    assert sorted(p.name for p in temp.iterdir()) == ["hyformer-registry-new", "someone-elses"]
    assert clean_leftovers(data_dir, now, str(temp)) == {"train_runs": 0, "downloads": 0}  # idempotent
    # the newest KEEP_RUNS stay even when they are all past the retention
    later = now + 2 * RUN_RETENTION_S
    assert clean_leftovers(data_dir, later, str(temp))["train_runs"] == 0

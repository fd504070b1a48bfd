"""The storage layer (features/storage.py, jobs/lease.py) on a local folder and on an S3 server (moto's, on
127.0.0.1): whole-file writes, versioned partitions committed by a pointer (a killed commit leaves the old version
readable), garbage collection, change detection by content, and the data directory's lock."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from features import storage
from jobs.common import Locked

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A folder to work in: a local one, or a prefix in a new bucket of the S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("s3"), "prefix")


def test_files_round_trip_and_list(root, tmp_path):
    df = pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    storage.write_parquet(df, storage.join(root, "t", "day=2026-11-21", "part-0.parquet"))
    storage.write_parquet(df.head(1), storage.join(root, "t", "day=2026-11-22", "part-0.parquet"))
    storage.write_json(storage.join(root, "t", "_doc.json"), {"k": 1})
    assert storage.list_dirs(storage.join(root, "t"), "day=") == ["day=2026-11-21", "day=2026-11-22"]
    files = storage.list_files(storage.join(root, "t", "day=2026-11-21"))
    assert files == [storage.join(root, "t", "day=2026-11-21", "part-0.parquet")]
    assert_frame_equal(storage.read_parquet(files), df)
    assert_frame_equal(storage.scan_parquet(files).filter(pl.col("a") > 1).collect(), df.tail(2))
    assert storage.num_rows(files) == 3
    assert storage.glob(storage.join(root, "t", "day=*", "*.parquet")) == [
        storage.join(root, "t", f"day=2026-11-2{d}", "part-0.parquet") for d in (1, 2)
    ]
    assert storage.glob(storage.join(root, "t", "day=2026-11-2?")) == []  # folders are not files
    assert storage.read_json(storage.join(root, "t", "_doc.json")) == {"k": 1}
    assert storage.read_json_or_none(storage.join(root, "t", "nope.json")) is None
    assert storage.list_files(storage.join(root, "t")) == []  # _doc.json is hidden, day=* are folders
    local = Path(storage.download(storage.join(root, "t"), str(tmp_path / "copy")))
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "_doc.json",
        "day=2026-11-21/part-0.parquet",
        "day=2026-11-22/part-0.parquet",
    ]
    storage.remove(storage.join(root, "t"))
    assert not storage.exists(storage.join(root, "t")) and storage.list_dirs(root) == []


def commit_version(partition: str, df: pl.DataFrame, pause_before_commit: float = 0.0) -> str:
    version = storage.new_version()
    storage.write_parquet(df, storage.join(partition, version, "part-0.parquet"))
    time.sleep(pause_before_commit)
    storage.publish(partition, {"version": version, "files": ["part-0.parquet"], "rows": df.height})
    return version


def test_a_killed_commit_leaves_the_old_version_readable_and_garbage_goes_after_the_retention(root):
    part = storage.join(root, "clean", "day=2026-11-22")
    old = pl.DataFrame({"x": list(range(10))})
    v1 = commit_version(part, old)
    # another process writes a new version and is killed (SIGKILL) before it writes the pointer
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import polars as pl
        from tests.test_storage import commit_version
        print("writing", flush=True)
        commit_version({part!r}, pl.DataFrame({{"x": [-1]}}), pause_before_commit=600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 60
    while len(storage.list_dirs(part, "v")) < 2:  # its version's file is written
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert storage.current(part)["version"] == v1
    assert_frame_equal(storage.read_parquet(storage.current_files(part)), old)
    # the orphan is kept while young (a reader could still be on it), then collected; the committed one never
    assert storage.collect_garbage(part) == [] and len(storage.list_dirs(part, "v")) == 2
    orphan = [v for v in storage.list_dirs(part, "v") if v != v1]
    assert storage.collect_garbage(part, retention_s=-1) == orphan
    assert storage.list_dirs(part, "v") == [v1]
    # a new commit moves the pointer; the replaced version stays until the retention has passed
    v2 = commit_version(part, old.head(3))
    assert storage.read_parquet(storage.current_files(part)).height == 3
    assert storage.list_dirs(part, "v") == sorted([v1, v2])
    assert storage.collect_garbage(part, retention_s=-1) == [v1]


def test_a_version_name_carries_its_age():
    v = storage.new_version()
    assert 0 <= storage.version_age_s(v) < 60
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=25)
    assert storage.version_age_s(v, later) > storage.RETENTION_S
    assert storage.version_age_s("vacation-photos") is None  # not a version: never collected


def test_publish_needs_a_version_and_its_files(root):
    with pytest.raises(ValueError, match="'version' and 'files'"):
        storage.publish(root, {"files": []})
    with pytest.raises(FileNotFoundError, match="no committed version"):
        storage.current_files(storage.join(root, "never"))


# --- change detection by content, on a real ingest ------------------------------------------------------------------


def same_size_rewrite(path: str, change) -> None:
    """Rewrite a raw Parquet file with ``change`` applied, uncompressed and without statistics, so that a value
    change keeps the file's size byte for byte."""
    t = storage.read_parquet([path]).to_arrow()
    fs, inner = storage.resolve(path)
    with fs.open_output_stream(inner) as f:
        pq.write_table(change(t), f, compression="none", use_dictionary=False, write_statistics=False)


def flip_first_label(t):
    import pyarrow as pa

    labels = t.column("label").to_pylist()
    labels[0] = 1 - labels[0]
    return t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, t.schema.field("label").type))


@pytest.mark.usefixtures("ray_local")
def test_a_same_size_rewrite_with_the_mtime_kept_is_revalidated_and_a_failed_run_commits_nothing(root):
    from features.schema import table_dir
    from features.synth import SynthConfig, generate
    from jobs.ingest import ContractError, clean_files, ingest
    from tests.conftest import END, TINY_SYNTH

    generate(SynthConfig(**TINY_SYNTH | {"days": 2}), root, END)
    raw = storage.join(table_dir(f"{root}/logs/v1", "impressions", END), "part-0.parquet")
    same_size_rewrite(raw, lambda t: t)  # the uncompressed layout, before the first ingest
    first = ingest(root, END, 2)
    clean = storage.read_parquet(clean_files(root, "impressions", str(END)))
    size = storage.listing(storage.parent(raw))[0].size
    mtime = os.stat(raw).st_mtime_ns if storage.is_local(raw) else None
    same_size_rewrite(raw, flip_first_label)
    assert storage.listing(storage.parent(raw))[0].size == size  # the test's premise: same size
    if mtime is not None:
        os.utime(raw, ns=(mtime, mtime))  # and the same mtime
    again = ingest(root, END, 2)
    assert first["impressions"].skipped_days == 0 and again["impressions"].skipped_days == 1  # END re-validated
    changed = storage.read_parquet(clean_files(root, "impressions", str(END)))
    assert changed.height == clean.height and (changed["label"] != clean["label"]).sum() == 1
    # a run that fails in a task (a corrupt data page of the other day, whose raw content changed too) moves no pointer
    pointers = {p: storage.current(storage.join(root, "clean/v1", p)) for p in ("impressions/day=2026-11-21", "users")}
    other = storage.join(table_dir(f"{root}/logs/v1", "impressions", END - dt.timedelta(days=1)), "part-0.parquet")
    data = bytearray(storage.read_bytes(other))
    data[4:200] = b"\xde\xad\xbe\xef" * 49  # the footer stays readable: only reading the data fails
    storage.write_bytes(other, bytes(data))
    with pytest.raises(ContractError, match="impressions/day=2026-11-21/part-0.parquet"):
        ingest(root, END, 2)
    assert {p: storage.current(storage.join(root, "clean/v1", p)) for p in pointers} == pointers
    assert storage.read_parquet(clean_files(root, "impressions", str(END))).height == clean.height
    assert not storage.exists(storage.join(root, "tmp"))


# --- the data directory's lock --------------------------------------------------------------------------------------


def test_the_data_directory_lock_is_exclusive_and_names_its_holder(root):
    from jobs.lease import data_dir_lock

    with data_dir_lock(root):
        with pytest.raises(Locked, match=f"pid.*{os.getpid()}"):
            with data_dir_lock(root, timeout=0.5):
                pass
    with data_dir_lock(root):  # released: free again
        pass


def test_an_expired_s3_lease_is_taken_over_and_a_live_one_is_renewed(s3):
    import boto3

    from jobs.lease import S3Lease, data_dir_lock

    uri = storage.join(s3, "data", "locks", "daily.lease.json")
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    dead = {"pid": 1, "host": "gone", "since": "2026-11-30T00:00:00+00:00", "expires": time.time() - 1}
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(dead).encode())

    def lease() -> dict:  # one GET, as the lease reads it: the object is rewritten while held (a ranged read of the
        return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())  # old size could cut the new)

    with data_dir_lock(storage.join(s3, "data"), lease_s=0.6):  # the dead holder's lease has expired
        first = lease()
        assert first["pid"] == os.getpid()
        time.sleep(1.0)  # renewed every lease_s / 3: still held, with a later expiry
        renewed = lease()
        assert renewed["expires"] > first["expires"]
        assert S3Lease(uri).try_take()["pid"] == os.getpid()  # another run finds it held
    assert not storage.exists(uri)  # given back


def test_other_object_stores_are_refused_rather_than_run_unlocked():
    from jobs.lease import data_dir_lock

    with pytest.raises(ValueError, match="no lock for gs://"):
        with data_dir_lock("gs://bucket/data"):
            pass

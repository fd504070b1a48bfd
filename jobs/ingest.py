"""Ingest: validate the raw log partitions of a window, one Ray Data task per (table, day); swap them in atomically.

    python -m jobs.ingest --data-dir /abs/data --date 2026-11-22 --days 70 [--force]

Unit of work: one partition, i.e. one day of a daily table (``logs/v1/<table>/day=D/*.parquet``) or one dimension
snapshot (``logs/v1/<table>/*.parquet``). The job

1. lists every partition of the window and reads every file's footer: a missing partition
   (``MissingPartitionError``), an unreadable file or a file without a required column (``ContractError``) or a
   partition of 0 rows (``EmptyPartitionError``) fails the job before anything is written, naming it;
2. validates the dimension snapshots (users, items, queries: re-ingested on every run) into a staging folder;
3. validates every daily partition that is not up to date (its ``_manifest.json`` differs: raw files' names, sizes or
   mtimes, ``features.validate.RULES_VERSION``; or ``force``) in a Ray Data task that
   reads its files with pyarrow, checks them with ``features.validate.validate_partition`` (contract types, nulls,
   bounds, non-finite floats, partition day, ids unknown to the clean dimensions, duplicate keys) and writes its clean
   and quarantined rows to the staging folder;
4. only if every task succeeded, swaps each staged partition into place (rename the old one away, rename the new one
   in, delete the old one): ``clean/v1/<table>/day=D/`` (+ ``_manifest.json``) and ``quarantine/v1/<table>/day=D/``.
   A failure anywhere leaves the clean and quarantine data exactly as they were.

Per partition and per table, read = clean + quarantined is checked; counts over the whole window (days skipped as up
to date are counted from their manifests) and schema drift (extra columns) go to ``clean/v1/_ingest.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import glob
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import ray

from features.schema import (
    DAILY_TABLES,
    DAY_FORMAT,
    DIM_TABLES,
    PART_FILE,
    TABLES,
    logs_root,
    parse_day,
    table_dir,
    window,
)
from features.validate import (
    DIM_KEY,
    FILE,
    RAW,
    REASON,
    REFERENCES,
    ROW,
    RULES_VERSION,
    ContractError,
    check_schema,
    read_log_file,
    validate_partition,
)
from jobs.common import (
    ReconcileError,
    absolute,
    atomic_write_json,
    clean_root,
    init_ray,
    log,
    quarantine_root,
    replace_dir,
    setup_logging,
)

MANIFEST = "_manifest.json"


class MissingPartitionError(FileNotFoundError):
    """A partition of the window is absent or has no Parquet file."""


class EmptyPartitionError(ValueError):
    """A partition exists but holds 0 rows: a logging outage, not data."""


ERRORS = {e.__name__: e for e in (ContractError, EmptyPartitionError, MissingPartitionError, ReconcileError)}


@dataclass
class TableCounts:
    table: str
    read: int  # rows of the window's partitions (days skipped as up to date: from their manifests)
    clean: int
    quarantined: int
    files: int  # raw Parquet files of the window
    days: int = 0  # partitions of the window (1 for a dimension snapshot)
    skipped_days: int = 0  # partitions up to date, not re-validated by this run
    extra_columns: list[str] = field(default_factory=list)  # schema drift: columns not in the contract (dropped)

    def reconciles(self) -> bool:
        return self.read == self.clean + self.quarantined


@dataclass(frozen=True)
class Partition:
    table: str
    day: str | None  # YYYY-MM-DD; None for a dimension snapshot
    raw_dir: str
    files: tuple[tuple[str, int, int], ...]  # (name, size, mtime_ns) of every raw Parquet file, sorted by name

    @property
    def rel(self) -> str:  # path below clean/v1 and quarantine/v1
        return self.table if self.day is None else f"{self.table}/day={self.day}"

    def paths(self) -> list[str]:
        return [f"{self.raw_dir}/{name}" for name, _, _ in self.files]

    @property
    def file_stats(self) -> list[dict]:
        return [{"name": n, "size": s, "mtime_ns": m} for n, s, m in self.files]


def plan_partition(data_dir: str, table: str, day: dt.date | None) -> Partition:
    """The raw files of one partition and their sizes and mtimes; raise naming a missing partition."""
    d = table_dir(logs_root(data_dir), table, day)
    found = sorted(glob.glob(f"{d}/*.parquet"))
    if not found:
        raise MissingPartitionError(f"missing partition: {d} has no Parquet file (table {table!r})")
    stats = tuple((os.path.basename(f), (st := os.stat(f)).st_size, st.st_mtime_ns) for f in found)
    return Partition(table, day.strftime(DAY_FORMAT) if day else None, d, stats)


def check_footers(p: Partition) -> None:
    """Fail fast, before any work: every file has a readable footer and the required columns; the partition has rows."""
    rows = 0
    for f in p.paths():
        try:
            pf = pq.ParquetFile(f)
            rows += pf.metadata.num_rows
            check_schema(pf.schema_arrow, TABLES[p.table], f)
        except ContractError:
            raise
        except Exception as e:  # pyarrow raises several types for truncated/corrupt/non-Parquet files
            raise ContractError(f"unreadable Parquet file {f}: {e}") from e
    if rows == 0:
        raise EmptyPartitionError(
            f"empty partition: {p.raw_dir} has {len(p.files)} Parquet file(s) and 0 rows (table {p.table!r}); "
            "an empty day is a logging outage, not data"
        )


@functools.lru_cache(maxsize=2)
def known_ids(clean_dims: str) -> dict[str, pl.Series]:
    """Ids of the clean dimension tables under ``clean_dims`` (cached per worker process: read once per run)."""
    return {t: pl.read_parquet(f"{clean_dims}/{t}/*.parquet", columns=[k])[k] for t, k in DIM_KEY.items()}


def dims_fingerprint(clean_dims: str) -> str:
    """Hash of the clean dimension ids: a change re-validates every day (their unknown-id verdicts may change)."""
    h = hashlib.sha256()
    for t, ids in known_ids(clean_dims).items():
        h.update(t.encode())
        h.update(ids.sort().to_numpy().tobytes())
    return h.hexdigest()[:16]


def ingest_partition(p: Partition, staging: str, dims_fp: str | None) -> dict:
    """Validate one partition; write its clean rows, quarantined rows and manifest under ``staging``; return the
    manifest."""
    spec = TABLES[p.table]
    known = known_ids(f"{staging}/clean") if p.table in REFERENCES else None
    frames, extra = [], set()
    for path in p.paths():
        df, cols = read_log_file(path, spec)
        frames.append((path, df))
        extra.update(cols)
    read = sum(df.height for _, df in frames)
    if read == 0:
        raise EmptyPartitionError(f"empty partition: {p.raw_dir} has 0 rows (table {p.table!r})")
    v = validate_partition(frames, spec, parse_day(p.day) if p.day else None, known)
    ok = pl.col(REASON).is_null()
    clean = v.filter(ok).select(spec.schema.names)
    bad = v.filter(~ok).select(FILE, ROW, REASON, RAW, *([pl.lit(p.day).alias("day")] if p.day else []))
    if read != v.height or v.height != clean.height + bad.height:
        raise ReconcileError(f"{p.raw_dir}: read {read} != clean {clean.height} + quarantined {bad.height}")
    out, qout = f"{staging}/clean/{p.rel}", f"{staging}/quarantine/{p.rel}"
    for d in (out, qout):  # a retried task starts over
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(out)
    clean.write_parquet(f"{out}/{PART_FILE}")  # even when empty: the partition exists, with its schema
    if bad.height:
        os.makedirs(qout)
        bad.write_parquet(f"{qout}/{PART_FILE}")
    manifest = {
        "table": p.table,
        "day": p.day,
        "rules_version": RULES_VERSION,
        "dims_fingerprint": dims_fp,
        "files": p.file_stats,
        "counts": {"read": read, "clean": clean.height, "quarantined": bad.height},
        "extra_columns": sorted(extra),
        "ingested_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(f"{out}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def ingest_partition_udf(batch: dict[str, np.ndarray], staging: str, dims_fp: str | None) -> dict[str, np.ndarray]:
    """Ray Data UDF: one partition per call. Errors come back as data, so the driver re-raises them with their type."""
    out = []
    for text in batch["partition"]:
        d = json.loads(text)
        p = Partition(d["table"], d["day"], d["raw_dir"], tuple(tuple(f) for f in d["files"]))
        try:
            res = {"manifest": ingest_partition(p, staging, dims_fp)}
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - also Polars' PanicException (a BaseException)
            res = {"error": type(e).__name__, "message": str(e), "table": p.table, "day": p.day, "raw_dir": p.raw_dir}
        out.append(json.dumps(res))
    return {"result": np.array(out, dtype=object)}


def run_partitions(parts: list[Partition], staging: str, dims_fp: str | None) -> dict[str, dict]:
    """Validate ``parts`` with Ray Data (one task per partition); manifests by ``Partition.rel``; raise the first
    error."""
    if not parts:
        return {}
    items = [{"partition": json.dumps(asdict(p))} for p in parts]
    # A few blocks per CPU: each UDF call still handles one partition (batch_size=1), but a task per partition costs
    # more in scheduling than a small day takes to validate (~2x slower on 2 cores for the 70-day demo).
    blocks = min(len(items), 4 * max(1, int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    rows = ds.map_batches(
        ingest_partition_udf, batch_size=1, fn_kwargs={"staging": staging, "dims_fp": dims_fp}
    ).take_all()
    results = [json.loads(r["result"]) for r in rows]
    errors = sorted(
        (r for r in results if "error" in r), key=lambda r: (list(TABLES).index(r["table"]), r["day"] or "")
    )
    if errors:
        e = errors[0]
        more = f" (and {len(errors) - 1} more failed partition(s))" if len(errors) > 1 else ""
        if e["error"] in ERRORS:
            raise ERRORS[e["error"]](e["message"] + more)
        raise RuntimeError(f"ingest of {e['raw_dir']} failed: {e['error']}: {e['message']}{more}")
    manifests = {
        f"{m['table']}" + (f"/day={m['day']}" if m["day"] else ""): m for m in (r["manifest"] for r in results)
    }
    if len(manifests) != len(parts):
        raise ReconcileError(f"ingest: {len(parts)} partitions submitted, {len(manifests)} came back")
    return manifests


def up_to_date(data_dir: str, p: Partition, dims_fp: str) -> dict | None:
    """The manifest of ``p``'s clean partition if it was ingested from the same raw files and rules.

    Dimension changes do not re-validate a day (point in time: a row is judged against the dimensions of its ingest,
    as features are built from the snapshot of their day); ``force`` does. ``dims_fp`` is recorded, not compared.
    """
    try:
        with open(f"{clean_root(data_dir)}/{p.rel}/{MANIFEST}") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    same = m.get("rules_version") == RULES_VERSION and m.get("files") == p.file_stats
    has_quarantine = m.get("counts", {}).get("quarantined", 0) == 0 or os.path.isdir(
        f"{quarantine_root(data_dir)}/{p.rel}"
    )
    return m if same and has_quarantine else None


def swap_in(data_dir: str, p: Partition, staging: str) -> None:
    """Quarantine first, clean (with its manifest, the mark of a finished partition) last."""
    q = f"{staging}/quarantine/{p.rel}"
    replace_dir(q if os.path.isdir(q) else None, f"{quarantine_root(data_dir)}/{p.rel}", f"{staging}/old")
    replace_dir(f"{staging}/clean/{p.rel}", f"{clean_root(data_dir)}/{p.rel}", f"{staging}/old")


def table_counts(table: str, parts: list[Partition], manifests: dict[str, dict], skipped: set[str]) -> TableCounts:
    ms = [manifests[p.rel] for p in parts]
    c = TableCounts(
        table,
        read=sum(m["counts"]["read"] for m in ms),
        clean=sum(m["counts"]["clean"] for m in ms),
        quarantined=sum(m["counts"]["quarantined"] for m in ms),
        files=sum(len(p.files) for p in parts),
        days=len(parts),
        skipped_days=sum(p.rel in skipped for p in parts),
        extra_columns=sorted({c for m in ms for c in m["extra_columns"]}),
    )
    if not c.reconciles():
        raise ReconcileError(f"ingest {table}: row counts do not reconcile: {c}")
    return c


def ingest(data_dir: str, end: dt.date, days: int = 70, force: bool = False) -> dict[str, TableCounts]:
    """Validate the ``days`` days ending at ``end`` (inclusive) of every table; returns per-table counts of the window.

    Days whose clean partition is up to date are skipped unless ``force``. Dimension snapshots are always re-ingested.
    """
    data_dir = absolute(data_dir)
    init_ray()  # no-op when Ray is up (a job on a cluster, the workflow, tests)
    win = window(end, days)
    dims = [plan_partition(data_dir, t, None) for t in DIM_TABLES]
    daily = [plan_partition(data_dir, t, d) for t in DAILY_TABLES for d in win]
    for p in dims + daily:  # fail fast: nothing is validated or written while any input is unreadable
        check_footers(p)
    staging = f"{data_dir}/tmp/ingest-{uuid.uuid4().hex[:12]}"
    try:
        manifests = run_partitions(dims, staging, None)
        dims_fp = dims_fingerprint(f"{staging}/clean")
        previous = {p.rel: m for p in daily if not force and (m := up_to_date(data_dir, p, dims_fp))}
        todo = [p for p in daily if p.rel not in previous]
        log.info(
            "ingest: %d dimension snapshots, %d day partitions to validate, %d up to date",
            len(dims),
            len(todo),
            len(previous),
        )
        manifests |= run_partitions(todo, staging, dims_fp)
        for p in dims + todo:  # every partition validated: only now does anything replace the previous data
            swap_in(data_dir, p, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifests |= previous
    by_table = {t: [p for p in dims + daily if p.table == t] for t in TABLES}
    counts = {t: table_counts(t, parts, manifests, set(previous)) for t, parts in by_table.items()}
    for c in counts.values():
        log.info(
            "ingest %s: read %d = clean %d + quarantined %d (%d files, %d partitions, %d up to date)",
            c.table,
            c.read,
            c.clean,
            c.quarantined,
            c.files,
            c.days,
            c.skipped_days,
        )
        if c.extra_columns:
            log.warning(
                "ingest %s: schema drift: column(s) %s not in the contract were dropped", c.table, c.extra_columns
            )
    partitions = {
        t: {(p.day or "snapshot"): partition_summary(p, manifests[p.rel], p.rel in previous) for p in parts}
        for t, parts in by_table.items()
    }
    summary = {
        "end": end.strftime(DAY_FORMAT),
        "days": days,
        "force": force,
        "rules_version": RULES_VERSION,
        "dims_fingerprint": dims_fp,
        "counts": {t: asdict(c) for t, c in counts.items()},
        "partitions": partitions,
    }
    atomic_write_json(f"{clean_root(data_dir)}/_ingest.json", summary)
    return counts


def partition_summary(p: Partition, manifest: dict, skipped: bool) -> dict:
    return {**manifest["counts"], "files": len(p.files), "extra_columns": manifest["extra_columns"], "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Validate a window of raw log partitions into clean + quarantine datasets (Ray Data, one task per "
        "table and day); days already ingested from the same raw files and dimensions are skipped."
    )
    p.add_argument("--data-dir", default="data", help="project data directory (holds logs/, clean/, quarantine/)")
    p.add_argument("--date", required=True, type=parse_day, help="last day of the window, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=70, help="window length in days (default 70)")
    p.add_argument("--force", action="store_true", help="re-validate every day of the window, even those up to date")
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    for c in ingest(a.data_dir, a.date, a.days, force=a.force).values():
        print(json.dumps(asdict(c)))


if __name__ == "__main__":
    # Run the importable module's main, not __main__'s: Ray then ships the UDF by reference (jobs.ingest.…), with its
    # per-worker cache of dimension ids, instead of pickling __main__'s functions by value.
    from jobs.ingest import main as module_main

    module_main()

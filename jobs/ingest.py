"""Ingest: read the raw log partitions of a window with Ray Data, validate them, write clean and quarantined rows.

    python -m jobs.ingest --data-dir /abs/data --date 2026-11-22 --days 70

For each table of the contract (features/schema.py): every day partition of the window must exist and be readable
Parquet, else the job fails naming it. Rows are validated by ``features.validate``: valid rows are written typed to
``<data>/clean/v1/<table>/day=…/``, invalid ones to ``<data>/quarantine/v1/<table>/day=…/`` with their reason, source
file and raw values. Per table, read = clean + quarantined is checked and logged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from features.schema import DAY_FORMAT, TABLES, logs_root, parse_day, table_dir, window
from features.validate import FILE, RAW, REASON, ContractError, validate
from jobs.common import absolute, clean_root, init_ray, log, quarantine_root, setup_logging

DAY_IN_PATH = re.compile(r"day=(\d{4}-\d{2}-\d{2})")


class MissingPartitionError(FileNotFoundError):
    """A partition of the window is absent or has no Parquet file."""


@dataclass
class TableCounts:
    table: str
    read: int
    clean: int
    quarantined: int
    files: int

    def reconciles(self) -> bool:
        return self.read == self.clean + self.quarantined


def partition_files(data_dir: str, table: str, days: list[dt.date] | None) -> list[str]:
    """Parquet files of a table's partitions; raise naming the first partition that is missing or unreadable."""
    root = logs_root(data_dir)
    dirs = [table_dir(root, table, d) for d in days] if days else [table_dir(root, table)]
    files = []
    for d in dirs:
        found = sorted(glob.glob(f"{d}/*.parquet"))
        if not found:
            raise MissingPartitionError(f"missing partition: {d} has no Parquet file (table {table!r})")
        for f in found:
            try:
                pq.read_metadata(f)
            except Exception as e:  # pyarrow raises several types for truncated/corrupt files
                raise ContractError(f"unreadable Parquet file {f}: {e}") from e
        files += found
    return files


def validate_block(batch: pa.Table, table: str) -> pa.Table:
    """Ray Data UDF: validate every source file's rows of this block (the day comes from the file's path)."""
    spec = TABLES[table]
    df = pl.from_arrow(batch)
    parts = []
    for (path,), rows in df.group_by("path", maintain_order=True):
        m = DAY_IN_PATH.search(path)
        day = parse_day(m.group(1)) if (spec.daily and m) else None
        v = validate(rows.drop("path"), spec, day, source=path).with_columns(pl.lit(path).alias(FILE))
        parts.append(v.with_columns(pl.lit(m.group(1) if m else None, pl.String).alias("day")) if spec.daily else v)
    if not parts:  # empty block: keep the output schema
        empty = validate(pl.DataFrame(schema={c: pl.Null for c in spec.required}), spec, None, source="")
        parts = [empty.with_columns(pl.lit(None, pl.String).alias(FILE), *( [pl.lit(None, pl.String).alias("day")] if spec.daily else []))]
    return pl.concat(parts).to_arrow()


def only_valid(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[REASON])).drop_columns([REASON, RAW, FILE])


def only_invalid(batch: pa.Table) -> pa.Table:
    keep = [FILE, REASON, RAW] + (["day"] if "day" in batch.column_names else [])
    return batch.filter(pc.is_valid(batch[REASON])).select(keep)


def ingest_table(data_dir: str, table: str, files: list[str]) -> TableCounts:
    spec = TABLES[table]
    ds = ray.data.read_parquet(files, include_paths=True, partitioning=None)
    checked = ds.map_batches(validate_block, batch_format="pyarrow", batch_size=None, fn_kwargs={"table": table}).materialize()
    clean = checked.map_batches(only_valid, batch_format="pyarrow", batch_size=None)
    bad = checked.map_batches(only_invalid, batch_format="pyarrow", batch_size=None)
    parts = ["day"] if spec.daily else None
    clean.write_parquet(f"{clean_root(data_dir)}/{table}", partition_cols=parts, mode=ray.data.SaveMode.OVERWRITE)
    bad.write_parquet(f"{quarantine_root(data_dir)}/{table}", partition_cols=parts, mode=ray.data.SaveMode.OVERWRITE)
    counts = TableCounts(table, checked.count(), clean.count(), bad.count(), len(files))
    if not counts.reconciles():  # cannot happen unless a UDF above drops rows; never let it pass silently
        raise RuntimeError(f"ingest {table}: row counts do not reconcile: {counts}")
    log.info("ingest %s: read %d = clean %d + quarantined %d (%d files)", table, counts.read, counts.clean, counts.quarantined, counts.files)
    return counts


def ingest(data_dir: str, end: dt.date, days: int = 70) -> dict[str, TableCounts]:
    """Validate the ``days`` days ending at ``end`` (inclusive) of every table; returns per-table counts."""
    data_dir = absolute(data_dir)
    win = window(end, days)
    # Every partition of every table is checked before any work starts: a bad window fails fast, writing nothing.
    files = {t: partition_files(data_dir, t, win if spec.daily else None) for t, spec in TABLES.items()}
    with ThreadPoolExecutor(max_workers=3) as pool:  # the tables are independent Ray Data pipelines
        futures = {t: pool.submit(ingest_table, data_dir, t, files[t]) for t in TABLES}
        counts = {t: f.result() for t, f in futures.items()}
    with open(f"{clean_root(data_dir)}/_ingest.json", "w") as f:
        json.dump({"end": end.strftime(DAY_FORMAT), "days": days, "counts": {t: asdict(c) for t, c in counts.items()}}, f, indent=1)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Validate a window of raw log partitions into clean + quarantine datasets (Ray Data).")
    p.add_argument("--data-dir", default="data", help="project data directory (holds logs/, clean/, quarantine/)")
    p.add_argument("--date", required=True, type=parse_day, help="last day of the window, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=70, help="window length in days (default 70)")
    a = p.parse_args(argv)
    setup_logging()
    init_ray()
    for c in ingest(a.data_dir, a.date, a.days).values():
        print(json.dumps(asdict(c)))


if __name__ == "__main__":
    main()

"""Row validation against the log contract (features/schema.py), in Polars.

``validate`` returns the rows cast to the contract's types with two extra columns: ``_reason`` (null for a valid row,
else every problem found, ``"; "``-separated, each naming its field) and ``_raw`` (the original row as JSON, only for
invalid rows, so a quarantined value that failed its cast is still visible). File-level problems — a required column
missing — raise ``ContractError`` naming the file and the column.
"""

from __future__ import annotations

import datetime as dt

import polars as pl
import pyarrow as pa

from features.schema import DAY_FORMAT, MS_PER_DAY, Table, day_start_ms

REASON, RAW, FILE = "_reason", "_raw", "_file"


class ContractError(ValueError):
    """Input that cannot be read as the contract at all (a file-level problem)."""


def polars_type(t: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.table({"x": pa.array([], t)})).schema["x"]


def field_checks(col: str, table: Table) -> list[pl.Expr]:
    """Reasons (or nulls) for one column: failed cast, null in a required field, value out of bounds."""
    c = table.column(col)
    raw, typed = pl.col(f"{col}__raw"), pl.col(col)
    checks = [pl.when(raw.is_not_null() & typed.is_null()).then(pl.format(f"{col}: cannot read {{}} as {c.type}", raw.cast(pl.String)))]
    if c.required:
        checks.append(pl.when(raw.is_null()).then(pl.lit(f"{col}: null in required field")))
    if c.min is not None or c.max is not None:
        lo = typed < c.min if c.min is not None else pl.lit(False)
        hi = typed > c.max if c.max is not None else pl.lit(False)
        checks.append(pl.when(lo | hi).then(pl.format(f"{col}: {{}} outside [{c.min}, {c.max}]", typed)))
    return checks


def day_check(day: dt.date) -> pl.Expr:
    start = day_start_ms(day)
    out = (pl.col("ts") < start) | (pl.col("ts") >= start + MS_PER_DAY)
    return pl.when(out).then(pl.format(f"ts: {{}} outside partition day={day.strftime(DAY_FORMAT)}", pl.col("ts")))


def validate(df: pl.DataFrame, table: Table, day: dt.date | None, source: str) -> pl.DataFrame:
    """Cast ``df`` to ``table``'s contract and explain every invalid row (see module doc)."""
    missing = [c for c in table.required if c not in df.columns]
    if missing:
        raise ContractError(f"{source}: table {table.name!r} is missing required column(s) {missing}")
    present = [c.name for c in table.columns if c.name in df.columns]
    raw_cols = [pl.col(c).alias(f"{c}__raw") for c in present]
    typed = [
        (pl.col(c.name).cast(polars_type(c.type), strict=False) if c.name in df.columns else pl.lit(None, polars_type(c.type))).alias(c.name)
        for c in table.columns
    ]
    checks = [e for c in present for e in field_checks(c, table)]
    if day is not None:
        checks.append(day_check(day))
    reason = pl.concat_str(checks, separator="; ", ignore_nulls=True) if checks else pl.lit(None, pl.String)
    out = df.select(*raw_cols, *typed).with_columns(pl.when(reason != "").then(reason).alias(REASON))
    raw_json = pl.struct([pl.col(f"{c}__raw").alias(c) for c in present]).struct.json_encode()
    return out.select(*(c.name for c in table.columns), REASON, pl.when(pl.col(REASON).is_not_null()).then(raw_json).alias(RAW))

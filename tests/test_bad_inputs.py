"""Bad-input corpus for jobs/ingest.py: each case corrupts a tiny valid window in one way and checks the verdict.

The window is hand-written (2 days of impressions, search_events and feed_events + users/items/queries snapshots, a
handful of rows each), so that every expected quarantine row, reason and ``_row`` can be read off the case. A case
either raises a named error whose message names the file/partition and field, or quarantines exactly the listed rows;
in both, read = clean + quarantined. Then: re-runs are idempotent, a changed day is the only one re-validated, and a
failing run leaves the previously ingested data untouched.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.schema import DAILY_TABLES, TABLES, day_start_ms
from features.validate import ContractError
from jobs.ingest import EmptyPartitionError, MissingPartitionError, QuarantineLimitError, ingest

pytestmark = pytest.mark.usefixtures("ray_local")

END = dt.date(2026, 3, 2)
D1, D2 = END - dt.timedelta(days=1), END
H = 3_600_000  # ms per hour


def day_rows(table: str, day: dt.date) -> dict[str, list]:
    """A handful of valid rows of one day; ids within the dimension tables below (users 0-4, items 0-9, queries 0-2)."""
    t0 = day_start_ms(day)
    r0 = 100 * day.day  # request ids unique across days
    if table == "impressions":
        return dict(
            request_id=[r0, r0, r0 + 1, r0 + 1, r0 + 2, r0 + 2],
            user_id=[0, 0, 1, 1, 2, 2],
            query_id=[0, 0, 1, 1, 2, 2],
            item_id=[1, 2, 3, 4, 5, 6],
            position=[0, 1, 0, 1, 0, 1],
            ts=[t0 + H, t0 + H, t0 + 2 * H, t0 + 2 * H, t0 + 3 * H, t0 + 3 * H],
            device_type=[1, 1, 2, 2, 3, 3],
            network_type=[1, 1, 2, 2, 0, 0],
            label=[1, 0, 0, 1, 0, 0],
            watch_time_s=[12.5, 0.0, 0.0, 30.0, 0.0, 0.0],
            p_click=[0.3, 0.1, 0.1, 0.4, 0.05, 0.05],
            p_click_ns=[0.2, 0.1, 0.1, 0.3, 0.05, 0.05],
            p_click_seq=[0.1, 0.05, 0.05, 0.1, 0.02, 0.02],
        )
    if table == "search_events":
        return dict(
            user_id=[0, 0, 1, 3, 4],
            ts=[t0 + H + 5000, t0 + 4 * H, t0 + 2 * H + 7000, t0 + 5 * H, t0 + 6 * H],
            query_id=[0, 0, 1, 2, 2],
            item_id=[1, 7, 4, 8, 9],
            author_id=[1, 2, 1, 3, 3],
            category_id=[0, 1, 0, 2, 2],
            watch_time_s=[12.5, 40.0, 30.0, 3.0, 8.0],
            like=[1, 0, 0, 0, 1],
        )
    if table == "feed_events":
        return dict(
            user_id=[0, 1, 2, 3, 4],
            ts=[t0 + 7 * H, t0 + 8 * H, t0 + 9 * H, t0 + 10 * H, t0 + 11 * H],
            item_id=[0, 2, 4, 6, 8],
            author_id=[0, 1, 2, 3, 0],
            category_id=[0, 1, 2, 0, 1],
            watch_time_s=[5.0, 6.0, 7.0, 8.0, 9.0],
            finish=[1, 0, 1, 0, 1],
            like=[0, 0, 1, 0, 0],
        )
    raise KeyError(table)


DIMS = {
    "users": dict(user_id=[0, 1, 2, 3, 4], age_bucket=[1, 2, 3, 0, 5], gender=[1, 2, 0, 1, 2], city_id=[7, 8, 9, 7, 8]),
    "items": dict(
        item_id=list(range(10)),
        author_id=[0, 1, 1, 3, 1, 2, 3, 2, 3, 3],
        category_id=[0, 1, 0, 2, 0, 1, 0, 1, 2, 2],
        duration_s=[30.0] * 10,
        upload_ts=[day_start_ms(D1) - 10 * 86_400_000] * 10,
    ),
    "queries": dict(query_id=[0, 1, 2], category_id=[0, 0, 2], n_terms=[1, 2, 3]),
}


def path(d: str, table: str, day: dt.date | None = None, name: str = "part-0.parquet") -> str:
    return f"{d}/logs/v1/{table}" + (f"/day={day}" if day else "") + f"/{name}"


def write(p: str, data: dict[str, list] | pa.Table, schema: pa.Schema | None = None) -> None:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    pq.write_table(data if isinstance(data, pa.Table) else pa.table(data, schema=schema), p)


def make_window(d: str) -> str:
    """The valid window: contract-typed files, one per partition."""
    for t, rows in DIMS.items():
        write(path(d, t), rows, TABLES[t].schema)
    for t in DAILY_TABLES:
        for day in (D1, D2):
            write(path(d, t, day), day_rows(t, day), TABLES[t].schema)
    return d


def loose(table: str, day: dt.date, **changes: list) -> dict[str, list]:
    """The day's rows with whole columns replaced (written with inferred, nullable types)."""
    return day_rows(table, day) | changes


def with_row(values: list, i: int, v) -> list:
    return [v if j == i else x for j, x in enumerate(values)]


def committed_files(d: str, root: str, table: str) -> list[str]:
    """The files the committed pointers (_manifest.json) of a table's partitions name (features.storage)."""
    out = []
    for m in sorted(glob.glob(f"{d}/{root}/v1/{table}/**/_manifest.json", recursive=True)):
        man = json.load(open(m))
        out += [f"{os.path.dirname(m)}/{man['version']}/{f}" for f in man["files"]]
    return out


def read_clean(d: str, table: str) -> pl.DataFrame:
    files = committed_files(d, "clean", table)
    if not TABLES[table].daily:
        return pl.read_parquet(files)
    return pl.concat(pl.read_parquet(f).with_columns(day=pl.lit(f.split("day=")[1][:10])) for f in files)


def read_quarantine(d: str, table: str) -> pl.DataFrame:
    files = committed_files(d, "quarantine", table)
    return (
        pl.read_parquet(files)
        if files
        else pl.DataFrame(schema={"_file": pl.String, "_row": pl.Int64, "_reason": pl.String, "_raw": pl.String})
    )


def file_digests(d: str, root: str = "clean", json_too: bool = False) -> dict[str, str]:
    """Content hash of every committed file under <root>/v1, by partition and name (not by version); the pointers
    and _ingest.json only if ``json_too`` (they hold versions and times)."""

    def digest(f: str) -> str:
        return hashlib.sha256(open(f, "rb").read()).hexdigest()

    out = {}
    for m in sorted(glob.glob(f"{d}/{root}/v1/**/_manifest.json", recursive=True)):
        part, man = os.path.dirname(m), json.load(open(m))
        out |= {os.path.relpath(f"{part}/{f}", d): digest(f"{part}/{man['version']}/{f}") for f in man["files"]}
    if json_too:
        out |= {os.path.relpath(f, d): digest(f) for f in glob.glob(f"{d}/{root}/v1/**/*.json", recursive=True)}
    return out


# --- the corpus ------------------------------------------------------------------------------------------------------


def corrupt_pages(p: str) -> None:
    """Keep the footer, overwrite the data pages: only reading the data fails."""
    size, footer = os.path.getsize(p), pq.read_metadata(p).serialized_size + 8
    with open(p, "r+b") as f:
        f.seek(4)
        f.write(b"\xde\xad\xbe\xef" * ((size - footer - 4) // 4))
    pq.read_metadata(p)  # the footer is still fine
    with pytest.raises(OSError):  # pyarrow: "Couldn't deserialize thrift ... Deserializing page header failed."
        pq.read_table(p)


def huge_user(d: str) -> None:
    n, t0 = 20_000, day_start_ms(D1)
    rows = dict(
        user_id=[0] * n,
        ts=[t0 + i for i in range(n)],
        item_id=[i % 10 for i in range(n)],
        author_id=[0] * n,
        category_id=[0] * n,
        watch_time_s=[1.0] * n,
        finish=[0] * n,
        like=[0] * n,
    )
    write(path(d, "feed_events", D1), rows, TABLES["feed_events"].schema)


@dataclass
class Case:
    name: str
    corrupt: Callable[[str], None]
    error: type[Exception] | None = None  # the run must fail with this type ...
    match: tuple[str, ...] = ()  # ... whose message contains these (use "{dir}" for the data dir)
    table: str = ""  # else: the quarantine of this table holds exactly these rows
    rows: tuple[tuple[str, int, str], ...] = ()  # (file name, _row, reason substring)
    limit: float = 1.0  # ingest's max_quarantine_share (the corpus checks per-row verdicts; the limit has its cases)
    check: Callable[[str, dict], None] | None = None  # extra checks on (data_dir, counts)


def check_drift(d: str, counts: dict) -> None:
    assert counts["impressions"].extra_columns == ["experiment"]
    assert "experiment" not in read_clean(d, "impressions").columns
    with open(f"{d}/clean/v1/_ingest.json") as f:
        summary = json.load(f)
    assert summary["counts"]["impressions"]["extra_columns"] == ["experiment"]
    assert summary["partitions"]["impressions"][str(D1)]["extra_columns"] == ["experiment"]
    assert summary["partitions"]["impressions"][str(D2)]["extra_columns"] == []


def check_first_user_kept(d: str, counts: dict) -> None:
    users = read_clean(d, "users")
    assert users.filter(pl.col("user_id") == 3)["age_bucket"].to_list() == [0]  # the first occurrence


def check_huge_user(d: str, counts: dict) -> None:
    assert counts["feed_events"].read == 20_000 + 5 and counts["feed_events"].clean == 20_005


def repeat_request(d: str) -> None:
    """D2's first request reuses D1's first request id (the candidates differ: no within-day duplicate)."""
    rows = day_rows("impressions", D2)
    rows["request_id"] = [100 * D1.day] * 2 + rows["request_id"][2:]
    write(path(d, "impressions", D2), rows, TABLES["impressions"].schema)


CASES = [
    # --- limits: a partition that is mostly bad fails the run (issue #18) -----------------------------------------
    Case(
        "whole_day_ts_in_seconds",
        lambda d: write(
            path(d, "impressions", D2),
            loose("impressions", D2, ts=[t // 1000 for t in day_rows("impressions", D2)["ts"]]),
        ),
        QuarantineLimitError,
        (
            "{dir}/logs/v1/impressions/day=2026-03-02: 6 of 6 rows quarantined (100.0% > 1.0%): 6 x ts",
            "nothing was committed",
        ),
        limit=0.01,
    ),
    Case(
        "one_bad_row_over_a_strict_limit",
        lambda d: write(
            path(d, "feed_events", D1), loose("feed_events", D1, ts=with_row(day_rows("feed_events", D1)["ts"], 0, -5))
        ),
        QuarantineLimitError,
        ("{dir}/logs/v1/feed_events/day=2026-03-01: 1 of 5 rows quarantined (20.0% > 10.0%): 1 x ts",),
        limit=0.1,
    ),
    # --- keys beyond one day (issue #18) ---------------------------------------------------------------------------
    Case(
        "request_shared_by_two_users",
        lambda d: write(
            path(d, "impressions", D2),
            loose("impressions", D2, user_id=with_row(day_rows("impressions", D2)["user_id"], 1, 3)),
        ),
        table="impressions",
        rows=(
            ("part-0.parquet", 0, "request_id: shared by users [0, 3]"),
            ("part-0.parquet", 1, "request_id: shared by users [0, 3]"),
        ),
    ),
    Case(
        "request_id_reused_on_a_later_day",
        repeat_request,
        table="impressions",
        rows=(
            ("part-0.parquet", 0, "request_id: already used on day 2026-03-01"),
            ("part-0.parquet", 1, "request_id: already used on day 2026-03-01"),
        ),
    ),
    # --- the job fails, naming the file or partition (and the column) --------------------------------------------
    Case(
        "missing_required_column",
        lambda d: write(
            path(d, "feed_events", D2), {k: v for k, v in day_rows("feed_events", D2).items() if k != "item_id"}
        ),
        ContractError,
        ("{dir}/logs/v1/feed_events/day=2026-03-02/part-0.parquet", "missing required column(s) ['item_id']"),
    ),
    Case(
        "empty_day",
        lambda d: write(path(d, "impressions", D1), TABLES["impressions"].schema.empty_table()),
        EmptyPartitionError,
        ("{dir}/logs/v1/impressions/day=2026-03-01", "0 rows"),
    ),
    Case(
        "missing_partition",
        lambda d: shutil.rmtree(f"{d}/logs/v1/search_events/day={D1}"),
        MissingPartitionError,
        ("{dir}/logs/v1/search_events/day=2026-03-01",),
    ),
    Case(
        "truncated_parquet",
        lambda d: os.truncate(path(d, "feed_events", D2), 100),
        ContractError,
        ("unreadable Parquet file {dir}/logs/v1/feed_events/day=2026-03-02/part-0.parquet",),
    ),
    Case(
        "non_parquet_bytes",
        lambda d: open(path(d, "impressions", D1, "part-1.parquet"), "wb").write(b"request_id,user_id\n1,2\n" * 10),
        ContractError,
        ("unreadable Parquet file {dir}/logs/v1/impressions/day=2026-03-01/part-1.parquet",),
    ),
    Case(
        "corrupt_data_pages",
        lambda d: corrupt_pages(path(d, "search_events", D2)),
        ContractError,
        ("unreadable Parquet file {dir}/logs/v1/search_events/day=2026-03-02/part-0.parquet",),
    ),
    Case(
        "timestamp_typed_ts",
        lambda d: write(
            path(d, "feed_events", D1),
            pa.table(loose("feed_events", D1)).set_column(
                1, "ts", pa.array(day_rows("feed_events", D1)["ts"], pa.timestamp("ms", "UTC"))
            ),
        ),
        ContractError,
        ("{dir}/logs/v1/feed_events/day=2026-03-01/part-0.parquet", "column 'ts' has type timestamp[ms, tz=UTC]"),
    ),
    Case(
        "dimension_missing_required_column",
        lambda d: write(path(d, "items"), {k: v for k, v in DIMS["items"].items() if k != "category_id"}),
        ContractError,
        ("{dir}/logs/v1/items/part-0.parquet", "'category_id'"),
    ),
    # --- rows are quarantined with their file, row and reason -----------------------------------------------------
    Case(
        "string_in_int_column",
        lambda d: write(
            path(d, "impressions", D2), loose("impressions", D2, position=["0", "1", "0", "first", "0", "1"])
        ),
        table="impressions",
        rows=(("part-0.parquet", 3, "position: cannot read first as int32"),),
    ),
    Case(
        "ts_written_as_string",  # digits read fine; a non-number is quarantined
        lambda d: write(
            path(d, "search_events", D1),
            loose(
                "search_events", D1, ts=with_row([str(t) for t in day_rows("search_events", D1)["ts"]], 2, "yesterday")
            ),
        ),
        table="search_events",
        rows=(("part-0.parquet", 2, "ts: cannot read yesterday as int64"),),
    ),
    Case(
        "float_in_int_column",
        lambda d: write(path(d, "feed_events", D2), loose("feed_events", D2, item_id=[0.0, 2.0, 4.5, 6.0, 8.0])),
        table="feed_events",
        rows=(("part-0.parquet", 2, "item_id: cannot read 4.5 as int64"),),
    ),
    Case(
        "nulls_in_required_fields",
        lambda d: write(
            path(d, "search_events", D2),
            loose(
                "search_events",
                D2,
                user_id=with_row(day_rows("search_events", D2)["user_id"], 1, None),
                category_id=with_row(day_rows("search_events", D2)["category_id"], 4, None),
            ),
        ),
        table="search_events",
        rows=(
            ("part-0.parquet", 1, "user_id: null in required field"),
            ("part-0.parquet", 4, "category_id: null in required field"),
        ),
    ),
    Case(
        "negative_ts",
        lambda d: write(
            path(d, "feed_events", D1), loose("feed_events", D1, ts=with_row(day_rows("feed_events", D1)["ts"], 0, -5))
        ),
        table="feed_events",
        rows=(("part-0.parquet", 0, "ts: -5 outside [0, None]"),),
    ),
    Case(
        "future_ts",
        lambda d: write(
            path(d, "impressions", D2),
            loose(
                "impressions", D2, ts=with_row(day_rows("impressions", D2)["ts"], 5, day_start_ms(D2) + 3 * 86_400_000)
            ),
        ),
        table="impressions",
        rows=(("part-0.parquet", 5, "outside partition day=2026-03-02"),),
    ),
    Case(
        "rows_of_another_day",  # yesterday's file written again into today's partition, as a second file
        lambda d: write(
            path(d, "feed_events", D2, "part-1.parquet"), day_rows("feed_events", D1), TABLES["feed_events"].schema
        ),
        table="feed_events",
        rows=tuple(("part-1.parquet", i, "outside partition day=2026-03-02") for i in range(5)),
    ),
    Case(
        "duplicate_events_across_files",
        lambda d: write(
            path(d, "search_events", D1, "part-1.parquet"),
            {k: v[3:4] for k, v in day_rows("search_events", D1).items()},
            TABLES["search_events"].schema,
        ),
        table="search_events",
        rows=(("part-1.parquet", 0, "duplicate: same (user_id, ts, item_id) as part-0.parquet row 3"),),
    ),
    Case(
        "duplicate_impressions",
        lambda d: write(
            path(d, "impressions", D1),
            {k: v + v[1:2] for k, v in day_rows("impressions", D1).items()},
            TABLES["impressions"].schema,
        ),
        table="impressions",
        rows=(("part-0.parquet", 6, "duplicate: same (request_id, item_id) as part-0.parquet row 1"),),
    ),
    Case(
        "unknown_item_id",
        lambda d: write(
            path(d, "feed_events", D2),
            loose("feed_events", D2, item_id=with_row(day_rows("feed_events", D2)["item_id"], 3, 123)),
        ),
        table="feed_events",
        rows=(("part-0.parquet", 3, "item_id: 123 not in items"),),
    ),
    Case(
        "unknown_user_id",
        lambda d: write(
            path(d, "impressions", D1),
            loose("impressions", D1, user_id=with_row(day_rows("impressions", D1)["user_id"], 4, 777)),
        ),
        table="impressions",
        rows=(("part-0.parquet", 4, "user_id: 777 not in users"),),
    ),
    Case(
        "unknown_query_id",
        lambda d: write(
            path(d, "search_events", D2),
            loose("search_events", D2, query_id=with_row(day_rows("search_events", D2)["query_id"], 0, 55)),
        ),
        table="search_events",
        rows=(("part-0.parquet", 0, "query_id: 55 not in queries"),),
    ),
    Case(
        "schema_drift_extra_column",  # reported, dropped, rows clean
        lambda d: write(
            path(d, "impressions", D1), loose("impressions", D1, experiment=["a", "b", "a", "b", "a", "b"])
        ),
        table="impressions",
        rows=(),
        check=check_drift,
    ),
    Case(
        "non_utf8_bytes_in_id",
        lambda d: write(
            path(d, "search_events", D2),
            pa.table(loose("search_events", D2)).set_column(
                0, "user_id", pa.array([b"0", b"0", b"\xff\xfe", b"3", b"4"], pa.binary())
            ),
        ),
        table="search_events",
        rows=(("part-0.parquet", 2, r"user_id: cannot read b'\xff\xfe' as int64"),),
    ),
    Case(
        "label_outside_0_1",
        lambda d: write(
            path(d, "impressions", D2),
            loose("impressions", D2, label=with_row(day_rows("impressions", D2)["label"], 2, 2)),
        ),
        table="impressions",
        rows=(("part-0.parquet", 2, "label: 2 outside [0, 1]"),),
    ),
    Case(
        "nan_and_inf_floats",
        lambda d: write(
            path(d, "feed_events", D1),
            loose("feed_events", D1, watch_time_s=[5.0, float("nan"), 7.0, float("inf"), 9.0]),
        ),
        table="feed_events",
        rows=(
            ("part-0.parquet", 1, "watch_time_s: non-finite value NaN"),
            ("part-0.parquet", 3, "watch_time_s: non-finite value inf"),
        ),
    ),
    Case(
        "duplicate_dimension_keys",
        lambda d: write(
            path(d, "users"),
            {k: v + v[3:4] for k, v in DIMS["users"].items()} | {"age_bucket": [1, 2, 3, 0, 5, 8]},
            TABLES["users"].schema,
        ),
        table="users",
        rows=(("part-0.parquet", 5, "duplicate: same (user_id) as part-0.parquet row 3"),),
        check=check_first_user_kept,
    ),
    Case(
        "huge_user",  # 20k events of one user in a day: nothing special, all clean and counted
        huge_user,
        table="feed_events",
        rows=(),
        check=check_huge_user,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path):
    d = make_window(str(tmp_path))
    case.corrupt(d)
    if case.error is not None:
        with pytest.raises(case.error) as e:
            ingest(d, END, 2, max_quarantine_share=case.limit)
        for text in case.match:
            assert text.format(dir=d) in str(e.value), str(e.value)
        assert not glob.glob(f"{d}/clean/v1/**/_manifest.json", recursive=True), "nothing is committed by a failure"
        assert not os.path.exists(f"{d}/tmp"), "no staging folder"
        return
    counts = ingest(d, END, 2, max_quarantine_share=case.limit)
    for t, c in counts.items():
        assert c.reconciles() and c.read == c.clean + c.quarantined, t
        assert read_clean(d, t).height == c.clean, t
        assert read_quarantine(d, t).height == c.quarantined, t
        if t != case.table:
            assert c.quarantined == 0, (t, read_quarantine(d, t)["_reason"].to_list())
    q = read_quarantine(d, case.table)
    got = sorted((os.path.basename(f), r) for f, r in q.select("_file", "_row").iter_rows())
    assert got == sorted((f, r) for f, r, _ in case.rows), q.to_dicts()
    for name, row, reason in case.rows:
        hit = q.filter(pl.col("_file").str.ends_with(f"/{name}") & (pl.col("_row") == row))
        assert reason in hit["_reason"].item(), hit["_reason"].item()
        assert hit["_raw"].item().startswith("{")
    if TABLES[case.table].daily and q.height:
        assert q["day"].is_not_null().all()
    if case.check:
        case.check(d, counts)


# --- incremental runs ------------------------------------------------------------------------------------------------


def test_rerun_is_idempotent_and_skips_days(tmp_path):
    d = make_window(str(tmp_path))
    first = ingest(d, END, 2)
    before = file_digests(d)
    second = ingest(d, END, 2)
    assert file_digests(d) == before  # byte-identical clean files (dimension snapshots are rewritten identically)
    for t in TABLES:
        assert {k: v for k, v in vars(second[t]).items() if k != "skipped_days"} == {
            k: v for k, v in vars(first[t]).items() if k != "skipped_days"
        }
        assert (first[t].skipped_days, second[t].skipped_days) == ((0, 2) if TABLES[t].daily else (0, 0)), t
    imps = read_clean(d, "impressions")
    assert imps.height == 12 and imps.select("request_id", "item_id").is_unique().all()
    forced = ingest(d, END, 2, force=True)
    assert file_digests(d) == before and all(c.skipped_days == 0 for c in forced.values())


def test_changed_day_is_the_only_one_reingested(tmp_path):
    d = make_window(str(tmp_path))
    ingest(d, END, 2)
    manifest = f"{d}/clean/v1/impressions/day={D2}/_manifest.json"
    untouched = open(manifest).read()
    write(
        path(d, "impressions", D1), loose("impressions", D1, label=with_row(day_rows("impressions", D1)["label"], 0, 5))
    )
    counts = ingest(d, END, 2, max_quarantine_share=0.5)
    assert counts["impressions"].skipped_days == 1 and counts["search_events"].skipped_days == 2
    assert counts["impressions"].quarantined == 1 and counts["impressions"].clean == 11
    assert open(manifest).read() == untouched
    assert read_clean(d, "impressions").height == 11
    # A grown dimension does not re-validate ingested days (point in time, or every daily run would redo the window);
    # force does.
    write(
        path(d, "items"),
        {k: v + v[:1] for k, v in DIMS["items"].items()} | {"item_id": list(range(11))},
        TABLES["items"].schema,
    )
    counts = ingest(d, END, 2)  # the default limit: D1's accepted share is not checked again while it is up to date
    assert all(counts[t].skipped_days == 2 for t in DAILY_TABLES)
    assert open(manifest).read() == untouched
    with pytest.raises(QuarantineLimitError, match="day=2026-03-01: 1 of 6 rows quarantined"):  # re-validated: it is
        ingest(d, END, 2, force=True)
    counts = ingest(d, END, 2, force=True, max_quarantine_share=0.5)
    assert all(counts[t].skipped_days == 0 for t in DAILY_TABLES)


def test_failed_run_leaves_previous_clean_data_untouched(tmp_path):
    d = make_window(str(tmp_path))
    ingest(d, END, 2)
    before, q_before = file_digests(d, json_too=True), file_digests(d, "quarantine", json_too=True)
    # D1 changed (would be re-ingested) while a data page of D2 is corrupt: the run fails in a task, swaps nothing.
    write(path(d, "feed_events", D1), loose("feed_events", D1, like=[1, 1, 1, 1, 1]))
    write(path(d, "search_events", D1), loose("search_events", D1, like=[1, 1, 1, 1, 2]))
    corrupt_pages(path(d, "search_events", D2))
    with pytest.raises(ContractError, match="search_events/day=2026-03-02/part-0.parquet"):
        ingest(d, END, 2)
    assert file_digests(d, json_too=True) == before and file_digests(d, "quarantine", json_too=True) == q_before
    assert not glob.glob(f"{d}/tmp/*")


# --- dates (issue #18) -----------------------------------------------------------------------------------------------


def test_a_window_that_ends_in_the_future_is_refused(tmp_path):
    d = make_window(str(tmp_path))
    future = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)
    with pytest.raises(ValueError, match=f"ends on {future}, after today"):
        ingest(d, future, 2)
    assert not glob.glob(f"{d}/clean/v1/**/_manifest.json", recursive=True)


def test_a_stray_day_folder_is_named_by_the_workflow(tmp_path, capsys):
    from workflows.daily_train import main

    d = make_window(str(tmp_path))
    os.makedirs(f"{d}/logs/v1/impressions/day=2026-03-02.bak")
    assert main(["--data-dir", d]) == 1  # the newest day is looked up before any stage: a clear error, not a traceback
    err = capsys.readouterr().err
    assert f"{d}/logs/v1/impressions/day=2026-03-02.bak: not a day partition (day=YYYY-MM-DD)" in err

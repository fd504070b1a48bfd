"""jobs/import_logs.py with features/mapping.py and features/movielens.py: user logs (CSV/Parquet) mapped onto the
contract pass ingest; mapping errors name what is wrong.

Hand-written inputs small enough to read the right answer off them: a MovieLens-100K-format folder (u.data, u.item,
u.user) imported with the ``movielens`` profile and ingested (the one Ray test), and a generic mapping of a Parquet
file with string ids and ISO timestamps.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os

import polars as pl
import pytest

from features.mapping import MappingError, ValueParseError, parse_mapping, ts_ms
from features.movielens import movielens_mapping
from features.schema import DAILY_TABLES, TABLES, day_start_ms
from jobs.import_logs import import_logs, main, read_idmap
from tests.conftest import committed_files

END = dt.date(1998, 4, 22)
DAYS = [END - dt.timedelta(days=2), END - dt.timedelta(days=1), END]
H = 3600  # seconds


def unix_s(day: dt.date, hour: float) -> int:
    return day_start_ms(day) // 1000 + int(hour * H)


# user, item, rating, hour of the day: 3 days, 3 users, every day with a positive rating (both classes held out)
RATINGS = [
    (1, 10, 5, 0, 1.0),
    (1, 20, 2, 0, 1.5),
    (2, 30, 4, 0, 9.0),
    (2, 10, 1, 0, 9.2),
    (1, 30, 3, 1, 23.9),
    (3, 40, 4, 1, 0.1),
    (3, 10, 5, 1, 0.2),
    (2, 40, 2, 2, 12.0),
    (2, 20, 5, 2, 12.5),
    (3, 50, 1, 2, 18.0),
    (1, 50, 4, 2, 6.0),
]
# movie id | title | release date | video release date | IMDb URL | 19 genre flags (unknown, Action, Adventure, ...)
ITEMS = [
    "10|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "20|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
    "30|Caf\xe9 Society (1995)|||http://x|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "40|Gone with the Wind (1939)|01-Jan-1939||http://x|0|1|0|0|0|0|1|0|0|0|0|0|0|0|0|0|1|0|0",  # before 1970
    "50|Fargo (1996)|14-Feb-1997||http://x|0|0|0|0|0|0|1|0|1|0|0|0|0|0|0|0|1|0|0",
]
USERS = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|17|M|student|T8H1N"]


def movielens_dir(path) -> str:
    """The three files of ml-100k/ in their own format: tab-separated ratings, '|'-separated latin-1 items, users."""
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/u.data", "w") as f:
        f.writelines(f"{u}\t{i}\t{r}\t{unix_s(DAYS[d], h)}\n" for u, i, r, d, h in RATINGS)
    with open(f"{path}/u.item", "wb") as f:
        f.write("".join(line + "\n" for line in ITEMS).encode("latin-1"))
    with open(f"{path}/u.user", "w") as f:
        f.writelines(line + "\n" for line in USERS)
    return str(path)


def read_table(data_dir: str, table: str) -> pl.DataFrame:
    pattern = "day=*/*.parquet" if TABLES[table].daily else "*.parquet"
    return pl.read_parquet(sorted(glob.glob(f"{data_dir}/logs/v1/{table}/{pattern}")), hive_partitioning=False)


@pytest.mark.usefixtures("ray_local")
def test_movielens_profile_passes_ingest(tmp_path):
    from jobs.ingest import ingest

    data_dir = str(tmp_path / "data")
    report = import_logs(data_dir, parse_mapping(movielens_mapping(movielens_dir(tmp_path / "ml-100k"))))
    n, positives = len(RATINGS), sum(r >= 4 for _, _, r, _, _ in RATINGS)
    # feed-only: no queries, no search events (configs/movielens.yaml trains on it)
    written = {t: r.written for t, r in report.tables.items()}
    assert written == {"impressions": n, "feed_events": n, "users": 3, "items": 5}
    assert all(r.reconciles() and r.read == r.written + sum(r.dropped.values()) for r in report.tables.values())
    assert all(r.invalid == 0 and r.warnings == [] for r in report.tables.values())  # the preview of ingest's checks
    assert report.window == {"first": str(DAYS[0]), "end": str(END), "days": 3}
    assert all(r.days == 3 for t, r in report.tables.items() if t in DAILY_TABLES)

    imp = read_table(data_dir, "impressions")
    assert imp["label"].to_list() == [int(r >= 4) for _, _, r, _, _ in RATINGS]  # input order kept
    # one request per (user, UTC day): 2 + 2 + 3, at the day's first rating (user 1 on day 0: 01:00 and 01:30)
    assert imp["request_id"].n_unique() == 7 and "query_id" not in imp.columns
    assert imp["ts"][:2].to_list() == [unix_s(DAYS[0], 1.0) * 1000] * 2
    feed = read_table(data_dir, "feed_events")
    assert feed["ts"][1] == unix_s(DAYS[0], 1.5) * 1000 and feed["like"].sum() == positives
    items = read_table(data_dir, "items").sort("item_id")
    assert items["category_id"].to_list() == [4, 2, 1, 2, 7]  # first genre: Animation, Action, unknown, Action, Crime
    assert "upload_ts" not in items.columns  # release dates before 1970 do not fit the contract (ms >= 0)
    assert dict(zip(feed["item_id"], feed["category_id"])) == {10: 4, 30: 1, 40: 2, 20: 2, 50: 7}  # looked up
    assert not os.path.exists(f"{data_dir}/logs/v1/search_events") and not os.path.exists(f"{data_dir}/logs/v1/queries")
    users = read_table(data_dir, "users").sort("user_id")
    assert users["age_bucket"].to_list() == [2, 6, 1] and users["gender"].to_list() == [1, 2, 1]
    assert read_idmap(data_dir, "zip").height == 3

    counts = ingest(data_dir, END, 3, tables=("impressions", "feed_events", "users", "items"))
    assert set(counts) == set(report.tables)
    for t, c in counts.items():
        assert c.quarantined == 0 and c.read == c.clean == report.tables[t].written, (t, c)
    clean = pl.read_parquet(committed_files(f"{data_dir}/clean/v1/impressions"))
    assert clean["query_id"].null_count() == clean.height  # a request without a query: null, not a placeholder


def impressions_parquet(path, rows: list[tuple]) -> str:
    """Request, user, item, query as text ids; the time as ISO 8601 text with an offset; a boolean click."""
    df = pl.DataFrame(rows, schema=["req", "uid", "video", "q", "shown_at", "clicked", "rank"], orient="row")
    df.write_parquet(path)
    return str(path)


ROWS = [
    ("r-1", "bob", "v-9", "cats", "2026-03-02T00:30:00+01:00", True, 0),  # 23:30 UTC on March 1st
    ("r-1", "bob", "v-3", "cats", "2026-03-02T00:30:00+01:00", False, 1),
    ("r-2", "alice", "v-9", "dogs", "2026-03-02T08:00:00Z", False, 0),
    ("r-3", "alice", "v-3", "dogs", "2026-03-02 09:15:00.250", True, 0),  # no offset: UTC
    ("r-4", "carol", "v-3", None, None, False, 0),  # no time: no day partition (dropped, counted)
]


def generic_mapping(files: list[str]) -> dict:
    source = {"files": files}
    return {
        "tables": {
            "impressions": {
                **source,
                "columns": {
                    "request_id": {"col": "req", "ids": "request"},
                    "user_id": {"col": "uid", "ids": "user"},
                    "item_id": {"col": "video", "ids": "item"},
                    "query_id": {"col": "q", "ids": "query"},
                    "position": "rank",
                    "ts": {"col": "shown_at", "ts": "iso"},
                    "label": {"sql": "CAST(clicked AS INTEGER)"},
                },
            },
            "users": {**source, "distinct": True, "columns": {"user_id": {"col": "uid", "ids": "user"}}},
        }
    }


def test_generic_mapping_of_string_ids_and_iso_times(tmp_path):
    data_dir = str(tmp_path / "data")
    f = impressions_parquet(tmp_path / "imp.parquet", ROWS)
    report = import_logs(data_dir, parse_mapping(generic_mapping([f]), tables=("impressions", "users")))
    imp = report.tables["impressions"]
    assert (imp.read, imp.written, imp.dropped) == (5, 4, {"ts: null, so no day partition": 1})
    assert (imp.days, imp.first_day, imp.last_day) == (2, "2026-03-01", "2026-03-02")
    assert report.tables["users"].dropped == {"distinct: repeated user_id": 2}
    assert read_idmap(data_dir, "user").rows() == [("alice", 0), ("bob", 1), ("carol", 2)]  # new keys in sorted order
    day1 = pl.read_parquet(f"{data_dir}/logs/v1/impressions/day=2026-03-01/part-0.parquet")
    assert day1["ts"].to_list() == [day_start_ms(dt.date(2026, 3, 2)) - 1_800_000] * 2
    assert (
        day1["user_id"].to_list() == [1, 1]
        and day1["item_id"].to_list() == [1, 0]
        and day1["label"].to_list() == [1, 0]
    )
    day2 = pl.read_parquet(f"{data_dir}/logs/v1/impressions/day=2026-03-02/part-0.parquet")
    t0 = day_start_ms(dt.date(2026, 3, 2))
    assert day2["ts"].to_list() == [t0 + 8 * 3_600_000, t0 + 9 * 3_600_000 + 15 * 60_000 + 250]
    assert day2.schema == pl.Schema(
        {c: t for c, t in pl.from_arrow(TABLES["impressions"].schema.empty_table()).schema.items() if c in day2.columns}
    )
    assert read_table(data_dir, "users")["user_id"].to_list() == [1, 0, 2]  # first occurrence order


def test_rows_that_ingest_will_quarantine_are_previewed(tmp_path):
    m = generic_mapping([impressions_parquet(tmp_path / "imp.parquet", ROWS)])
    m["tables"]["impressions"]["columns"]["position"] = {"value": -1}
    report = import_logs(str(tmp_path / "data"), parse_mapping(m, tables=("impressions", "users")))
    imp = report.tables["impressions"]
    assert imp.invalid == imp.written == 4  # written all the same: ingest quarantines them, with their reasons
    assert imp.warnings == [
        "impressions: ingest will quarantine 4 of the 4 rows written: "
        "4 x position (e.g. position: -1 outside [0, 1000])"
    ]


@pytest.mark.parametrize(
    ("values", "dtype", "how", "want"),
    [
        ([881250949, None], pl.Int64, "s", [881250949000, None]),
        ([881250949.5], pl.Float64, "s", [881250949500]),
        (["881250949", "x"], pl.String, "s", [881250949000, None]),
        ([1795341600123], pl.Int64, "ms", [1795341600123]),
        ([1795341600123456], pl.Int64, "us", [1795341600123]),
        ([1795341600123456789], pl.Int64, "ns", [1795341600123]),  # exact: no float rounding
        (
            ["2026-11-22T10:00:00+01:00", "2026-11-22T09:00:00.5Z", "2026-11-22", "22/11/2026"],
            pl.String,
            "iso",
            [1795338000000, 1795338000500, 1795305600000, None],
        ),
        (["01-Jan-1995", "31-Feb-1995"], pl.String, "%d-%b-%Y", [788918400000, None]),
        ([dt.date(2026, 11, 22)], pl.Date, "ms", [1795305600000]),
        ([dt.datetime(2026, 11, 22, 9, tzinfo=dt.timezone.utc)], pl.Datetime("us", "UTC"), "ms", [1795338000000]),
    ],
)
def test_ts_ms(values, dtype, how, want):
    df = pl.DataFrame({"x": pl.Series(values, dtype=dtype)})
    assert df.select(ts_ms(pl.col("x"), dtype, how))["x"].to_list() == want


def snapshot(data_dir: str) -> dict[str, pl.DataFrame]:
    files = sorted(glob.glob(f"{data_dir}/logs/v1/**/*.parquet", recursive=True))
    return {os.path.relpath(p, data_dir): pl.read_parquet(p) for p in files}


def test_reimport_is_idempotent_and_id_maps_are_stable(tmp_path):
    data_dir = str(tmp_path / "data")
    f = impressions_parquet(tmp_path / "imp.parquet", ROWS)
    specs = parse_mapping(generic_mapping([f]), tables=("impressions", "users"))
    import_logs(data_dir, specs)
    first = snapshot(data_dir)
    import_logs(data_dir, specs)
    again = snapshot(data_dir)
    assert first.keys() == again.keys()
    for k in first:
        assert first[k].equals(again[k]), k
    # a later import with a new user and a new day: known keys keep their ids, the earlier day is left alone
    later = impressions_parquet(
        tmp_path / "later.parquet",
        [
            ("r-9", "aaron", "v-3", "cats", "2026-03-03T10:00:00Z", True, 0),
            ("r-9", "bob", "v-1", "cats", "2026-03-03T10:00:00Z", False, 1),
        ],
    )
    import_logs(data_dir, parse_mapping(generic_mapping([later]), tables=("impressions",)))
    assert read_idmap(data_dir, "user").rows() == [("alice", 0), ("bob", 1), ("carol", 2), ("aaron", 3)]
    assert read_idmap(data_dir, "item").rows() == [("v-3", 0), ("v-9", 1), ("v-1", 2)]
    day3 = pl.read_parquet(f"{data_dir}/logs/v1/impressions/day=2026-03-03/part-0.parquet")
    assert day3["user_id"].to_list() == [3, 1]
    assert pl.read_parquet(f"{data_dir}/logs/v1/impressions/day=2026-03-01/part-0.parquet").equals(
        first["logs/v1/impressions/day=2026-03-01/part-0.parquet"]
    )


def test_required_column_without_mapping_is_named(tmp_path):
    f = impressions_parquet(tmp_path / "imp.parquet", ROWS)
    m = generic_mapping([f])
    del m["tables"]["impressions"]["columns"]["label"]
    with pytest.raises(MappingError, match=r"impressions\.label: required contract column has no mapping") as e:
        import_logs(str(tmp_path / "data"), parse_mapping(m, tables=("impressions",)))
    assert "source columns: ['req', 'uid', 'video', 'q', 'shown_at', 'clicked', 'rank']" in str(e.value)
    assert not os.path.exists(tmp_path / "data")  # nothing written


def test_missing_source_column_names_the_file_and_its_columns(tmp_path):
    f = impressions_parquet(tmp_path / "imp.parquet", ROWS)
    m = generic_mapping([f])
    m["tables"]["impressions"]["columns"]["position"] = "slot"
    with pytest.raises(
        MappingError, match=r"imp\.parquet: impressions\.position reads source column\(s\) \['slot'\], not in this file"
    ) as e:
        import_logs(str(tmp_path / "data"), parse_mapping(m, tables=("impressions",)))
    assert "'rank'" in str(e.value)


def test_unparseable_timestamps_name_file_row_and_value(tmp_path):
    bad = [
        *ROWS[:3],
        ("r-5", "dan", "v-9", "dogs", "yesterday", False, 0),
        ("r-6", "dan", "v-9", "dogs", "2026-02-30T01:00:00Z", False, 0),
    ]
    f = impressions_parquet(tmp_path / "imp.parquet", bad)
    with pytest.raises(ValueParseError, match=r"impressions: 2 row\(s\) have values that cannot be mapped") as e:
        import_logs(str(tmp_path / "data"), parse_mapping(generic_mapping([f]), tables=("impressions",)))
    assert f"{f} row 3: ts: cannot parse yesterday as ts 'iso'" in str(e.value)
    assert f"{f} row 4: ts: cannot parse 2026-02-30T01:00:00Z" in str(e.value)
    assert not os.path.exists(tmp_path / "data")


def test_mapping_mistakes_are_named(tmp_path):
    f = impressions_parquet(tmp_path / "imp.parquet", ROWS)
    cases = [
        (
            {"tables": {"impressions": {"files": [f], "columns": {"clicks": "clicked"}}}},
            r"impressions\.clicks: not a column of the contract",
        ),
        (
            {"tables": {"impressions": {"files": [f], "columns": {"ts": {"col": "shown_at", "ts": "minutes"}}}}},
            r"ts 'minutes' is none of",
        ),
        ({"tables": {"impressions": {"files": [str(tmp_path / "nope-*.csv")]}}}, r"impressions: no file matches"),
        ({"tables": {"impressions": {"files": [f]}}}, r"no source for table 'users'"),
    ]
    for mapping, message in cases:
        with pytest.raises(MappingError, match=message):
            parse_mapping(mapping, tables=("impressions", "users") if "users" in message else ("impressions",))


def test_cli_prints_the_profile_and_imports(tmp_path, capsys):
    src = movielens_dir(tmp_path / "ml-100k")
    assert main(["--profile", "movielens", "--source", src, "--print-mapping"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["tables"]) == {"impressions", "feed_events", "users", "items"}
    mapping = tmp_path / "mine.json"  # the printed profile is a mapping file of its own
    printed["tables"]["feed_events"]["where"] = "rating >= 5"
    mapping.write_text(json.dumps(printed))
    assert main(["--data-dir", str(tmp_path / "data"), "--mapping", str(mapping)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["tables"]["feed_events"]["written"] == sum(
        r >= 5 for _, _, r, _, _ in RATINGS
    )
    assert f"--date {END} --days 3" in out
    assert main(["--data-dir", str(tmp_path / "data"), "--profile", "movielens", "--source", str(tmp_path)]) == 1
    assert "holds neither ['u.data', 'u.item', 'u.user']" in capsys.readouterr().err


def test_a_value_the_mapping_sql_cannot_evaluate_is_named_with_table_column_file_and_rows(tmp_path):
    """``CAST(clicked AS INTEGER)`` on text: a ValueParseError naming impressions.label, the file, the first failing
    rows and their source values (not Polars' bare error); nothing is written."""
    rows = [(*r[:5], c, r[6]) for r, c in zip(ROWS[:4], ["1", "yes", "0", "no"], strict=True)]
    f = impressions_parquet(tmp_path / "imp.parquet", rows)
    data_dir = tmp_path / "data"
    with pytest.raises(ValueParseError) as e:
        import_logs(str(data_dir), parse_mapping(generic_mapping([f]), tables=("impressions", "users")))
    msg = str(e.value)
    assert msg.startswith("impressions.label: SQL 'CAST(clicked AS INT)' cannot be evaluated on " + f)
    assert "row 1: {'clicked': 'yes'}; row 3: {'clicked': 'no'} (" in msg
    assert not data_dir.exists() or not any(data_dir.rglob("*.parquet"))


def test_a_timestamp_before_1970_is_dropped_with_a_counted_reason(tmp_path):
    """The contract's ts is ms since 1970 (>= 0): such a row would make a day=1969-12-31 partition and ~20,000 gap
    days; it is dropped and counted instead."""
    rows = [*ROWS[:4], ("r-5", "dave", "v-3", "dogs", "1969-12-31T23:00:00Z", True, 0)]
    data_dir = str(tmp_path / "data")
    f = impressions_parquet(tmp_path / "imp.parquet", rows)
    report = import_logs(data_dir, parse_mapping(generic_mapping([f]), tables=("impressions", "users")))
    imp = report.tables["impressions"]
    assert (imp.read, imp.written) == (5, 4)
    assert imp.dropped == {"ts: before 1970-01-01 (the contract: ms since 1970)": 1}
    assert (imp.first_day, imp.days) == ("2026-03-01", 2)
    assert not glob.glob(f"{data_dir}/logs/v1/impressions/day=1969-*")

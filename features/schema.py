"""The log contract: every table the workflow reads, as versioned pyarrow schemas.

Layout on disk (``docs/data.md`` is the prose version of this module)::

    <data_dir>/logs/v1/<table>/day=YYYY-MM-DD/*.parquet     daily tables (impressions, search_events, feed_events)
    <data_dir>/logs/v1/<table>/*.parquet                    dimension snapshots (users, items, queries)

Conventions:
- ``ts`` columns are int64 milliseconds since the Unix epoch, UTC. A row belongs to the day partition of its
  ``ts`` (UTC calendar day); a row of another day in a partition is invalid.
- Ids are int64, non-negative. 0 is a valid id in the logs; features bucketise ids and reserve bucket 0 for padding.
- ``Column.required=False`` columns may be absent from a file or null; required columns must be present and non-null.
- The synthetic generator writes ``p_click`` (ground-truth click probability) on impressions, and ``p_click_ns`` /
  ``p_click_seq`` (the same click model without / with only its history-only terms, see ``features.synth``):
  evaluation reads them for the oracle AUCs, training never does. Real logs have none of them (null, NaN downstream).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1
DAY_FORMAT = "%Y-%m-%d"
PART_FILE = "part-0.parquet"  # the one file of a partition that this project writes (logs, clean, quarantine)
MS_PER_DAY = 86_400_000


@dataclass(frozen=True)
class Column:
    name: str  # column name in the Parquet file
    type: pa.DataType  # arrow type of the clean table (inputs are cast to it; a failed cast is a quarantine)
    required: bool  # must be present and non-null
    doc: str  # meaning and unit
    min: float | None = None  # inclusive lower bound, checked by ingest
    max: float | None = None  # inclusive upper bound, checked by ingest
    pattern: str | None = None  # strings only: a regular expression every value must match whole, checked by ingest


@dataclass(frozen=True)
class Table:
    name: str  # folder name under logs/v<version>/
    daily: bool  # partitioned by day=YYYY-MM-DD (else: one dimension snapshot)
    columns: tuple[Column, ...]  # in file order
    doc: str

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=not c.required) for c in self.columns])

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


ID = pa.int64()
TS = pa.int64()

IMPRESSIONS = Table(
    "impressions",
    daily=True,
    doc="One row per (request, shown item): the samples to predict (search requests; feed requests have no query).",
    columns=(
        Column("request_id", ID, True, "search request; groups the candidates of one query (query-level AUC)", 0),
        Column("user_id", ID, True, "user who searched", 0),
        Column("query_id", ID, False, "normalised query; null: a request without a query (a feed impression)", 0),
        Column("item_id", ID, True, "shown item (video)", 0),
        Column("position", pa.int32(), True, "0-based rank at which the item was shown", 0, 1000),
        Column("ts", TS, True, "request time, ms since epoch UTC", 0),
        Column("device_type", pa.int32(), False, "context: 0 unknown, 1 android, 2 ios, 3 web", 0, 255),
        Column("network_type", pa.int32(), False, "context: 0 unknown, 1 wifi, 2 cellular", 0, 255),
        Column("label", pa.int8(), True, "1 if clicked, else 0", 0, 1),
        Column("watch_time_s", pa.float32(), False, "seconds watched after the click (0 if no click)", 0),
        Column("p_click", pa.float32(), False, "synthetic logs only: true click probability; never a feature", 0, 1),
        Column(
            "p_click_ns",
            pa.float32(),
            False,
            "synthetic logs only: click probability without its history-only terms; never a feature",
            0,
            1,
        ),
        Column(
            "p_click_seq",
            pa.float32(),
            False,
            "synthetic logs only: click probability from bias, history-only terms and noise; never a feature",
            0,
            1,
        ),
    ),
)

# The synthetic click model's columns of impressions (features.synth): evaluation reads them, training never does.
GROUND_TRUTH = ("p_click", "p_click_ns", "p_click_seq")

SEARCH_EVENTS = Table(
    "search_events",
    daily=True,
    doc="The user's search-click events: the source of the long-term and the search sequences.",
    columns=(
        Column("user_id", ID, True, "user", 0),
        Column("ts", TS, True, "click time, ms since epoch UTC", 0),
        Column("query_id", ID, True, "query under which the click happened", 0),
        Column("item_id", ID, True, "clicked item", 0),
        Column("author_id", ID, True, "author of the item", 0),
        Column("category_id", ID, True, "category of the item", 0),
        Column("watch_time_s", pa.float32(), False, "seconds watched", 0),
        Column("like", pa.int8(), False, "1 if liked", 0, 1),
    ),
)

FEED_EVENTS = Table(
    "feed_events",
    daily=True,
    doc="The user's feed (recommendation) consumption events: the source of the feed sequence.",
    columns=(
        Column("user_id", ID, True, "user", 0),
        Column("ts", TS, True, "event time, ms since epoch UTC", 0),
        Column("item_id", ID, True, "consumed item", 0),
        Column("author_id", ID, True, "author of the item", 0),
        Column("category_id", ID, True, "category of the item", 0),
        Column("watch_time_s", pa.float32(), True, "seconds watched", 0),
        Column("finish", pa.int8(), False, "1 if watched to the end", 0, 1),
        Column("like", pa.int8(), False, "1 if liked", 0, 1),
    ),
)

USERS = Table(
    "users",
    daily=False,
    doc="User dimension snapshot (latest attributes).",
    columns=(
        Column("user_id", ID, True, "user", 0),
        Column("age_bucket", pa.int32(), False, "0 unknown, 1..8 age bands", 0, 255),
        Column("gender", pa.int32(), False, "0 unknown, 1, 2", 0, 255),
        Column("city_id", ID, False, "home city", 0),
    ),
)

ITEMS = Table(
    "items",
    daily=False,
    doc="Item dimension snapshot.",
    columns=(
        Column("item_id", ID, True, "item", 0),
        Column("author_id", ID, True, "author", 0),
        Column("category_id", ID, True, "category", 0),
        Column("duration_s", pa.float32(), False, "video length, seconds", 0),
        Column("upload_ts", TS, False, "upload time, ms since epoch UTC", 0),
    ),
)

QUERIES = Table(
    "queries",
    daily=False,
    doc="Query dimension snapshot.",
    columns=(
        Column("query_id", ID, True, "normalised query", 0),
        Column("category_id", ID, True, "intent category of the query (same id space as item categories)", 0),
        Column("n_terms", pa.int32(), False, "number of terms", 0, 1000),
    ),
)

TABLES: dict[str, Table] = {t.name: t for t in (IMPRESSIONS, SEARCH_EVENTS, FEED_EVENTS, USERS, ITEMS, QUERIES)}
DAILY_TABLES = tuple(n for n, t in TABLES.items() if t.daily)
DIM_TABLES = tuple(n for n, t in TABLES.items() if not t.daily)


def logs_root(data_dir: str) -> str:
    """Root folder of the versioned raw logs."""
    return f"{data_dir}/logs/v{SCHEMA_VERSION}"


def table_dir(root: str, table: str, day: dt.date | None = None) -> str:
    """Folder of one table (dimension) or of one day partition of a daily table."""
    return f"{root}/{table}" if day is None else f"{root}/{table}/day={day.strftime(DAY_FORMAT)}"


def parse_day(text: str) -> dt.date:
    """``YYYY-MM-DD`` → date, with an error that names the bad value."""
    try:
        return dt.datetime.strptime(text, DAY_FORMAT).date()
    except ValueError as e:
        raise ValueError(f"bad day {text!r}: expected YYYY-MM-DD") from e


def day_folders(root: str, names: list[str]) -> list[str]:
    """The days of partition folders ``names`` (``day=YYYY-MM-DD``) under ``root``, sorted; a ValueError naming the
    folder for anything else there that starts with ``day=`` (e.g. ``day=2026-03-02.bak``)."""
    days = []
    for name in names:
        try:
            days.append(parse_day(name.removeprefix("day=")).strftime(DAY_FORMAT))
        except ValueError:
            raise ValueError(
                f"{root}/{name}: not a day partition (day=YYYY-MM-DD): move it out of the logs folder"
            ) from None
    return sorted(days)


def utc_today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


def previous_day(day: str) -> str:
    """The ``YYYY-MM-DD`` day before ``day``."""
    return (parse_day(day) - dt.timedelta(days=1)).strftime(DAY_FORMAT)


def window(end: dt.date, days: int) -> list[dt.date]:
    """The ``days`` calendar days ending at ``end`` (inclusive), oldest first."""
    return [end - dt.timedelta(days=days - 1 - i) for i in range(days)]


def day_start_ms(day: dt.date) -> int:
    """Midnight UTC of ``day`` in ms since epoch."""
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp() * 1000)

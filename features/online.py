"""Online features: a ranking request -> the model's inputs, with the code that builds the training features.

A request is one user at one time (``ts``), optionally with a query and context, and its candidate items; it arrives
as rows of the impressions contract without the outcomes (``request_columns``: one row per candidate, the request's
columns repeated). ``featurize`` turns such rows into the batch a model reads, through the two functions training
uses: ``features.build.samples_of`` (the joins with the profiles, the bucketised ids, the declared features, the
relevance keys and the point-in-time ordinals, ``event.ts < ts`` strictly) and ``features.materialize.Materializer``
(the sequences, most recent first, with their age bucket at ``ts``). Nothing is re-implemented for serving, so a
request at the time of a logged impression gets the features that impression was trained or evaluated with
(tests/test_online.py checks it field by field, tests/test_serve.py score by score).

The history comes from an ``OnlineSource``: for each event stream, every user's latest events, kept so that any
request within its last day (``exact_from_ts`` to ``end_ts``) sees exactly the events the feature store would give it:

* every event of the last day, and
* of the events before it, each user's last ``n_all`` (the longest sequence of the stream read without relevance)
  and, per (user, relevance key), the last ``n_key`` (the longest relevance-filtered sequence).

The last L events before any time of the last day are among those, whatever the relevance key. A request after the
last day misses the events since (flagged ``after_source``): the daily workflow republishes the source each day;
streaming the current day's events into it is what a fresher source needs. The source also
holds the profiles (users, items, queries: the clean dimension snapshots) and the relevance keys of items and
queries. ``jobs.online`` writes it after each daily build, as a versioned folder (``features.storage``) whose
``_manifest.json`` says what it holds and the time of its data; a model serves from the version it loaded until a
newer one is committed.

A request for a user the source does not know gets empty sequences (and null profile features, as training gives a
user missing from the profiles): ``Featurized.fallbacks`` counts each such case by reason (``FALLBACKS``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from features import storage
from features.build import (
    EVENT_COLUMNS,
    EVENT_FIELDS,
    KEY_COLUMN,
    FeatureConfig,
    empty_state,
    samples_of,
)
from features.materialize import Materializer, Stream, Timelines, find_sorted
from features.schema import DAY_FORMAT, GROUND_TRUTH
from features.spec import OUTCOMES

SOURCE_VERSION = 1  # bump when the source's layout changes
REQUIRED = ("request_id", "user_id", "ts", "item_id")  # a request row's own columns; the others may be absent
DEFAULTS = {"position": 0}  # a candidate's position is not known before it is ranked: served as the first slot
FALLBACKS = {
    "unknown_user": "the user is not in the users snapshot: profile features are missing (bucket 0)",
    "no_history": "the user has no event in the source: every sequence is empty",
    "unknown_item": "the candidate is not in the items snapshot: its item features are missing",
    "unknown_query": "the query is not in the queries snapshot: its query features are missing",
    "before_source": "the request is older than the source's last day: its sequences may miss events",
    "after_source": "the request is after the source's newest day: the events since are missing until the next publish",
}
DIM_KEYS = {"users": "user_id", "items": "item_id", "queries": "query_id"}
EVENT_SCHEMA = {"user_id": pl.Int64, "ts": pl.Int64, "key": pl.Int64} | {f: pl.Int32 for f in EVENT_FIELDS}


def request_columns(cfg: FeatureConfig) -> dict[str, tuple[pl.DataType, bool]]:
    """The columns of a request row: the impressions contract (with ``cfg``'s extension columns) without its
    outcomes; name -> (Polars type, required)."""
    table = cfg.contract()["impressions"]
    return {
        c.name: (
            pl.from_arrow(pa.array([], c.type)).dtype,
            c.name in REQUIRED or (c.required and c.name not in DEFAULTS),
        )
        for c in table.columns
        if c.name not in OUTCOMES["impressions"]
    }


def _negative_is_missing(cfg: FeatureConfig) -> list[str]:
    """Optional integer columns that cannot be negative: there -1 means missing (MLflow's schema, like numpy, has no
    missing integers)."""
    cols = request_columns(cfg)
    return [
        c.name
        for c in cfg.contract()["impressions"].columns
        if c.name in cols and not cols[c.name][1] and cols[c.name][0].is_integer() and c.min is not None and c.min >= 0
    ]


def retention(cfg: FeatureConfig) -> dict[str, tuple[int, int]]:
    """Stream -> (events kept per user, events kept per (user, relevance key)) before the source's last day."""
    out: dict[str, tuple[int, int]] = {s: (0, 0) for s in cfg.streams()}
    for name, spec in cfg.sequence_specs().items():
        s = spec.stream(name)
        n_all, n_key = out[s]
        if KEY_COLUMN[spec.relevance] is None:
            out[s] = (max(n_all, spec.length), n_key)
        else:
            out[s] = (n_all, max(n_key, spec.length))
    return out


def retain(events: pl.LazyFrame, since_ts: int, n_all: int, n_key: int) -> pl.LazyFrame:
    """The events an online source keeps (module doc): all from ``since_ts`` on, and before it each user's last
    ``n_all`` and each (user, key)'s last ``n_key``; sorted by ``EVENT_COLUMNS`` (the feature store's order)."""
    ev = events.select(EVENT_COLUMNS).sort(EVENT_COLUMNS)
    old, new = ev.filter(pl.col("ts") < since_ts), ev.filter(pl.col("ts") >= since_ts)

    def from_end(*by: str) -> pl.Expr:  # 0 for the user's (or group's) latest event
        return (pl.len() - 1 - pl.int_range(pl.len())).over(*by)

    kept = old.filter((from_end("user_id") < n_all) | (from_end("user_id", "key") < n_key))
    return pl.concat([kept, new]).sort(EVENT_COLUMNS)


@dataclass
class OnlineSource:
    """What ``featurize`` reads (module doc); ``load`` reads a committed version, ``meta`` is its manifest."""

    meta: dict
    events: dict[str, pl.DataFrame]  # stream -> kept events, sorted by EVENT_COLUMNS
    dims: dict[str, pl.DataFrame]  # users / items / queries, sorted by their id
    keys: dict[str, pl.DataFrame]  # "items": (item_id, key), "queries": (query_id, key), sorted by id
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for s, ev in self.events.items():  # per stream: the rows of each user (CSR)
            users, start, count = np.unique(ev["user_id"].to_numpy(), return_index=True, return_counts=True)
            self._index[s] = (users, start, count)
        for name, df in (*self.dims.items(), *(("keys_" + t, k) for t, k in self.keys.items())):
            col = DIM_KEYS[name.removeprefix("keys_")]
            self._index[name] = df[col].to_numpy() if df.height else np.zeros(0, np.int64)

    @property
    def version(self) -> str:
        return self.meta["version"]

    @staticmethod
    def load(root: str) -> OnlineSource:
        """The committed version of the source at ``root`` (FileNotFoundError naming it when there is none)."""
        meta = storage.current(root)
        if meta is None:
            raise FileNotFoundError(
                f"no online feature source at {root} (no _manifest.json): the daily workflow writes it "
                "(workflows/daily_train.py), or python -m jobs.online"
            )
        if meta.get("source_version") != SOURCE_VERSION:
            raise ValueError(f"{root}: source version {meta.get('source_version')}, this code reads {SOURCE_VERSION}")
        files = dict(zip(meta["files"], storage.files_of(root, meta)))
        read = lambda rel: storage.read_parquet([files[rel]])  # noqa: E731
        events = {s: read(f"events/{s}.parquet") for s in meta["streams"]}
        dims = {t: read(f"{t}.parquet") for t in DIM_KEYS}
        keys = {t: read(f"keys/{t}.parquet") for t in ("items", "queries")}
        return OnlineSource(meta, events, dims, keys)

    def user_events(self, stream: str, users: np.ndarray) -> pl.DataFrame:
        """The kept events of ``users`` in ``stream``, in the source's order."""
        ev = self.events[stream]
        index, start, count = self._index[stream]
        pos, found = find_sorted(index, users)
        rows = [np.arange(start[p], start[p] + count[p]) for p, f in zip(pos, found) if f]
        return ev[np.concatenate(rows)] if rows else ev.clear()

    def rows(self, name: str, ids: np.ndarray) -> tuple[pl.DataFrame, np.ndarray]:
        """The rows of dimension ``name`` (or ``keys_<table>``) with these ids, and which ids were found."""
        df = self.keys[name.removeprefix("keys_")] if name.startswith("keys_") else self.dims[name]
        pos, found = find_sorted(self._index[name], ids)
        return df[pos[found]], found

    def check(self, cfg: FeatureConfig) -> None:
        """Can a model of feature config ``cfg`` read this source? Same store and vocabularies, and enough events
        kept for its sequence lengths."""
        if self.meta["store_id"] != cfg.store_id() or self.meta["vocab"] != cfg.vocab:
            raise ValueError(
                f"online source {self.meta.get('root', '')} (store {self.meta['store_id']}) is not the feature store "
                f"of this model ({cfg.store_id()}, or other vocabularies): publish its store's source (jobs.online)"
            )
        kept = self.meta["retention"]
        for s, (n_all, n_key) in retention(cfg).items():
            if s not in kept or n_all > kept[s][0] or n_key > kept[s][1]:
                raise ValueError(
                    f"online source keeps {kept.get(s)} events of stream {s!r} per user / per key, the model's "
                    f"sequences read ({n_all}, {n_key}): publish it again with this model's feature config"
                )


class RequestError(ValueError):
    """A request row that cannot be scored (a missing column, a null or negative id); names the column and row."""


@dataclass(frozen=True)
class RequestSpec:
    """What ``check_requests`` reads of a feature config, worked out once (``request_spec``)."""

    columns: dict[str, tuple[pl.DataType, bool]]  # request_columns
    negative_is_missing: tuple[str, ...]  # optional integer columns where -1 means missing


def request_spec(cfg: FeatureConfig) -> RequestSpec:
    return RequestSpec(request_columns(cfg), tuple(_negative_is_missing(cfg)))


def check_requests(requests: pl.DataFrame, spec: RequestSpec) -> pl.DataFrame:
    """Request rows with every request column, typed (absent optional columns null, a negative value of an optional
    id or context column null, ``DEFAULTS`` filled); a RequestError names the first missing column, or the column and
    row of a bad value."""
    cols = spec.columns
    if missing := [c for c, (_, req) in cols.items() if req and c not in requests.columns]:
        raise RequestError(f"request rows lack the column(s) {missing} (need {list(REQUIRED)})")
    out = []
    for c, (dtype, _) in cols.items():
        if c not in requests.columns:
            out.append(pl.lit(DEFAULTS.get(c), dtype).alias(c))
            continue
        col = requests[c]
        if col.dtype.is_nested() or (dtype.is_numeric() and col.dtype == pl.String):
            raise RequestError(f"request column {c!r}: {col.dtype} values, not {dtype}")
        if dtype.is_integer() and col.dtype.is_float() and ((col.drop_nulls() % 1) != 0).any():
            row = int(np.argmax(((col % 1) != 0).fill_null(False).to_numpy()))
            raise RequestError(f"request row {row}: {c}={col[row]} is not an integer")
        try:
            out.append(col.cast(dtype, strict=True).alias(c))
        except (pl.exceptions.PolarsError, NotImplementedError) as e:
            raise RequestError(f"request column {c!r}: not {dtype} ({e})") from None
    missing = [pl.when(pl.col(c) >= 0).then(pl.col(c)).alias(c) for c in spec.negative_is_missing]
    df = requests.select(out).with_columns(missing).with_columns(pl.col(c).fill_null(v) for c, v in DEFAULTS.items())
    for c in REQUIRED:
        bad = df[c].is_null() | (df[c] < 0)
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise RequestError(f"request row {row}: {c}={df[c][row]} (must be a non-negative integer)")
    return df


@dataclass(frozen=True)
class Featurized:
    batch: dict[str, np.ndarray]  # the model's inputs (naive sequences: seq_<s>, len_<s>), rows as requested
    fallbacks: dict[str, int]  # FALLBACKS reason -> requests (user and time reasons) or rows (item, query)
    flagged: dict[str, np.ndarray]  # FALLBACKS reason -> the ids of the requests it concerns


def featurize(
    source: OnlineSource, cfg: FeatureConfig, requests: pl.DataFrame, spec: RequestSpec | None = None
) -> Featurized:
    """Request rows (one per candidate, ``request_columns``) -> the model's batch, rows in the input order.
    ``cfg``: the feature config the model was trained with (``source.check(cfg)`` first); ``spec``: its
    ``request_spec`` (worked out here when not given)."""
    reqs = check_requests(requests, spec or request_spec(cfg)).with_row_index("_row")
    users = np.unique(reqs["user_id"].to_numpy())
    tokens = {s: source.user_events(s, users) for s in cfg.streams()}
    fallbacks: Counter = Counter()
    flagged: dict[str, np.ndarray] = {}

    def flag(reason: str, where: pl.Expr, rows: bool = False) -> None:
        hit = reqs.filter(where)
        if hit.height:
            flagged[reason] = hit["request_id"].unique().sort().to_numpy()
            fallbacks[reason] += hit.height if rows else len(flagged[reason])

    dims = {}
    for t, col in DIM_KEYS.items():
        ids = reqs[col].drop_nulls().unique().to_numpy()
        dims[t], found = source.rows(t, ids)
        missing = set(ids[~found].tolist())
        if missing and t == "users":
            flag("unknown_user", pl.col("user_id").is_in(missing))
        elif missing:
            flag({"items": "unknown_item", "queries": "unknown_query"}[t], pl.col(col).is_in(missing), rows=True)
    item_keys, query_keys = (
        source.rows(f"keys_{t}", reqs[DIM_KEYS[t]].drop_nulls().unique().to_numpy())[0] for t in ("items", "queries")
    )
    seen = set().union(*(set(ev["user_id"].unique().to_list()) for ev in tokens.values()))
    flag("no_history", ~pl.col("user_id").is_in(seen))
    exact, end = int(source.meta["exact_from_ts"]), int(source.meta["end_ts"])
    flag("before_source", pl.col("ts") < exact)
    flag("after_source", pl.col("ts") >= end)
    impressions = reqs.with_columns(
        pl.lit(None, pl.Int8).alias("label"),
        *(pl.lit(None, pl.Float32).alias(c) for c in GROUND_TRUTH),
        pl.from_epoch("ts", "ms").dt.strftime(DAY_FORMAT).alias("day"),
    )
    state = {s: empty_state() for s in tokens}  # the kept events are the whole history the ordinals count
    samples = (
        samples_of(
            impressions.lazy(),
            {s: t.lazy() for s, t in tokens.items()},
            state,
            {t: d.lazy() for t, d in dims.items()},
            cfg,
            (item_keys.lazy(), query_keys.lazy()),
            keep=("_row",),
        )
        .collect()
        .sort("_row")
    )
    no_state = empty_state().collect()
    timelines = Timelines({s: Stream.build(t, no_state) for s, t in tokens.items()})
    batch = Materializer(timelines, cfg, dedup=False)({c: samples[c].to_numpy() for c in samples.columns})
    return Featurized(batch, dict(fallbacks), flagged)

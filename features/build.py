"""Point-in-time features, built one day at a time with Polars (one user shard per Ray task).

The stored format (``docs/data.md`` has it in full) does not grow with the sequence lengths::

    events/<stream>   the day's events of every user, sorted by (user, ts), bucketised side info (7 types)
    samples           one row per impression: bucketised non-sequential ids + three *ordinals* into the user's history
    state/<stream>    cumulative event counts per (user, relevance key) after the day

Ordinals: ``long_hi`` = how many of the user's search events precede the impression (since the store's first day),
``search_hi`` / ``feed_hi`` = how many of the user's search / feed events *with the query's relevance key* precede it.
The sequences are then "the last L_long events before ordinal long_hi" and "the last k events of key ``rel_key``
before ordinal search_hi": two integers per sequence, whatever L is. Ordinals only ever grow when days are appended,
so day D is built from day D-1's state and day D's events alone (incremental), and ``features.materialize`` rebuilds
fixed (B, L, F) arrays — or deduplicated ID tables — from the events of the training window.

Point-in-time rule: an event counts for an impression only if ``event.ts < impression.ts`` (strictly), via
``join_asof(..., allow_exact_matches=False)``.

Relevance (search and feed sequences, ``FeatureConfig.relevance``): ``"category"`` (default; the event's item category
equals the query's intent category), ``"none"`` (the k most recent events), or ``"keys"`` (a user-supplied bucketing,
e.g. k-means clusters of item and query embeddings: ``relevance_keys`` names a folder with ``items.parquet``
(item_id, key) and ``queries.parquet`` (query_id, key); an event is relevant when its item's key equals the query's).

Ids are bucketised: ``1 + id mod (vocab - 1)`` (identity + 1 while vocab exceeds the largest id); 0 is padding.
Vocabularies are planned once, when a store is created, and frozen: later ids beyond them share buckets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import polars as pl

from features.scalar_sql import scalar_sql
from features.schema import GROUND_TRUTH, Table
from features.spec import (
    BUILTIN,
    CORE_TABLES,
    DEFAULT_TOKENS,
    EVENT_TABLES,
    SEQ_FIELDS,
    ExtraColumn,
    Feature,
    SequenceSpec,
    as_specs,
    candidate_feature,
    check_spec,
    contract,
    needs_queries,
)

# Side information per sequence event (paper Table 3: 3 types / 64-dim vs 7 types / 224-dim). Every field is also
# the name of its id space (embedding table). "dt" (age of the event at the impression, log2 minutes) is computed
# at materialisation; the others are stored per event.
EVENT_FIELDS: tuple[str, ...] = tuple(f for f in SEQ_FIELDS if f != "dt")  # stored per event
SIDE_INFO: dict[int, tuple[str, ...]] = {
    3: ("item", "category", "action"),
    5: ("item", "author", "category", "dt", "action"),
    7: SEQ_FIELDS,
}
STREAMS: dict[str, str] = {s: t for t, s in EVENT_TABLES.items()}  # a table's stream of all events -> the table
RELEVANCE = ("category", "none", "keys")
BUILD_VERSION = 3  # bump when build_day's output changes for the same input: stored days then re-check as stale
N_DT_BUCKETS = 24  # time-delta buckets: 1 + floor(log2(1 + minutes)), capped
N_ACTION_BUCKETS = 64  # action id: watch-time bucket (0..15) * 4 + finish * 2 + like, + 1


@dataclass(frozen=True)
class FeatureConfig:
    # read side (materialisation): free to change without rebuilding the store
    long_len: int = 3000  # L_long: last <= long_len search-click events (paper preset 3000)
    search_len: int = 50  # top-k query-relevant search events (paper: 50)
    feed_len: int = 50  # top-k query-relevant feed events (paper: 50)
    side_info: int = 7  # side-info types per event: 3 (paper's base) / 5 / 7 (paper's scaled setting); SIDE_INFO
    # write side (the store): changing any of these selects another store (see store_id)
    relevance: str = "category"  # "category" | "none" | "keys" (see module doc)
    relevance_keys: str | None = None  # folder with items.parquet / queries.parquet (item_id|query_id, key)
    max_vocab: int = 1 << 20  # cap on the bucket count of any id space
    cross_vocab: int = 1 << 15  # buckets of hashed cross ids (query x item)
    n_shards: int = 4  # user shards (user_id mod n_shards), one Ray task each
    vocab: dict[str, int] = field(default_factory=dict)  # id space -> bucket count incl. padding (frozen per store)
    # the feature spec (features.spec): None = the paper's (DEFAULT_TOKENS; long/search/feed of the lengths above).
    # tokens are read side (samples store every feature); declared features and sequences (but their lengths) write
    tokens: dict[str, tuple[str, ...]] | None = None  # NS token -> its features (built-in or declared)
    features: dict[str, Feature] = field(default_factory=dict)  # declared features
    sequences: dict[str, SequenceSpec] | None = None  # sequence -> its spec, in model order
    # extension columns of the logs: table -> {column: its type and bounds}; ingest validates and keeps them
    columns: dict[str, dict[str, ExtraColumn]] = field(default_factory=dict)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "features", as_specs(self.features, Feature))
        set_(self, "sequences", as_specs(self.sequences, SequenceSpec))
        set_(self, "columns", {t: as_specs(cols, ExtraColumn) for t, cols in (self.columns or {}).items()})
        if self.tokens is not None:
            set_(self, "tokens", {g: tuple(names) for g, names in self.tokens.items()})
        check_spec(self.token_groups(), self.features, self.sequence_specs(), self.contract())
        if self.side_info not in SIDE_INFO:
            raise ValueError(f"FeatureConfig.side_info must be one of {sorted(SIDE_INFO)}, got {self.side_info}")
        if self.relevance not in RELEVANCE:
            raise ValueError(f"FeatureConfig.relevance must be one of {RELEVANCE}, got {self.relevance!r}")
        if (self.relevance == "keys") != (self.relevance_keys is not None):
            raise ValueError("FeatureConfig.relevance_keys is required with relevance='keys' and only then")

    @staticmethod
    def tiny() -> FeatureConfig:
        return FeatureConfig(long_len=32, search_len=8, feed_len=8, n_shards=2)

    def sequence_specs(self) -> dict[str, SequenceSpec]:
        """Every sequence, in model order: the declared ones, or the paper's long / search / feed."""
        if self.sequences is not None:
            return self.sequences
        return {
            "long": SequenceSpec("search_events", self.long_len, "none"),
            "search": SequenceSpec("search_events", self.search_len, "query"),
            "feed": SequenceSpec("feed_events", self.feed_len, "query"),
        }

    def seq_len(self, name: str) -> int:
        return self.sequence_specs()[name].length

    def seq_fields_of(self, name: str) -> tuple[str, ...]:
        """The side-info fields of sequence ``name``: its own, or the store-wide ``side_info`` set."""
        return self.sequence_specs()[name].fields or self.seq_fields

    def seq_tables(self) -> dict[str, str]:
        """Sequence -> its dedup ID table: the stream it reads, suffixed by its side-info fields when they are not
        the store-wide set (sequences of one stream with the same fields share a table)."""
        out = {}
        for n, s in self.sequence_specs().items():
            fields = self.seq_fields_of(n)
            out[n] = s.stream(n) if fields == self.seq_fields else f"{s.stream(n)}_{'_'.join(fields)}"
        return out

    def streams(self) -> dict[str, tuple[str, str | None]]:
        """Stream -> (its table, its filter): what the store holds per day (events/<stream>, state/<stream>)."""
        out: dict[str, tuple[str, str | None]] = {}
        for n, s in self.sequence_specs().items():
            out.setdefault(s.stream(n), (s.table, s.filter))
        return out

    def contract(self) -> dict[str, Table]:
        """The log contract with this spec's extension columns (what ingest validates and keeps)."""
        return contract(self.columns)

    def tables(self) -> tuple[str, ...]:
        """The contract tables this spec reads: impressions, users, items, the sequences' event tables, and queries
        when a feature or a relevance rule needs them (a feed-only spec does not)."""
        events = dict.fromkeys(t for t, _ in self.streams().values())
        queries = ("queries",) if needs_queries(self.token_groups(), self.features, self.sequence_specs()) else ()
        return (*CORE_TABLES, *events, *queries)

    def token_groups(self) -> dict[str, tuple[str, ...]]:
        """NS token -> its features (DEFAULT_TOKENS without a spec)."""
        return self.tokens if self.tokens is not None else DEFAULT_TOKENS

    def feature_kind(self, name: str) -> str:
        return "id" if name in BUILTIN else self.features[name].kind

    def id_space(self, name: str) -> str:
        """The embedding table of an id feature."""
        return BUILTIN[name][0] if name in BUILTIN else self.features[name].space(name)

    def id_spaces(self) -> set[str]:
        """The embedding tables the spec's tokens and sequences use."""
        used = {n for names in self.token_groups().values() for n in names if self.feature_kind(n) != "dense"}
        return {self.id_space(n) for n in used} | {f for s in self.sequence_specs() for f in self.seq_fields_of(s)}

    def candidate_tokens(self) -> tuple[str, ...]:
        """Tokens whose every feature describes the candidate item (the model's target_groups)."""
        groups = self.token_groups().items()
        return tuple(g for g, names in groups if all(candidate_feature(n, self.features) for n in names))

    @property
    def seq_fields(self) -> tuple[str, ...]:
        return SIDE_INFO[self.side_info]

    def store_id(self) -> str:
        """Name of the store this config writes: what changes stored bytes (relevance, vocab caps, shards)."""
        keys = {k: getattr(self, k) for k in ("relevance", "relevance_keys", "max_vocab", "cross_vocab", "n_shards")}
        if self.features:  # declared features become sample columns
            keys["features"] = {n: asdict(f) for n, f in self.features.items()}
        stored = {n: [s.table, s.relevance, s.filter] for n, s in self.sequence_specs().items()}
        if stored != {n: [s.table, s.relevance, s.filter] for n, s in FeatureConfig().sequence_specs().items()}:
            keys["sequences"] = stored  # which events and which ordinals are stored (not how many are read)
        digest = hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.relevance}-s{self.n_shards}-{digest}"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def bucket(col: str | pl.Expr, vocab: int) -> pl.Expr:
    """``1 + id mod (vocab - 1)`` as Int32; null -> 0 (padding / missing)."""
    e = pl.col(col) if isinstance(col, str) else col
    return (e.cast(pl.Int64) % (vocab - 1) + 1).fill_null(0).cast(pl.Int32)  # keeps the input column name


def log2_bucket(col: str | pl.Expr, cap: int) -> pl.Expr:
    """``1 + floor(log2(1 + x))`` capped at ``cap - 1``; null -> 0."""
    e = pl.col(col) if isinstance(col, str) else col
    return (
        ((e.cast(pl.Float64).clip(lower_bound=0) + 1).log(2).floor() + 1)
        .clip(upper_bound=cap - 1)
        .fill_null(0)
        .cast(pl.Int32)
    )


def action_id(watch_s: str, finish: str | None, like: str) -> pl.Expr:
    """One action id per event from watch time, finish and like."""
    fin = pl.col(finish).fill_null(0) if finish else pl.lit(0)
    w = log2_bucket(watch_s, 16)
    return (w * 4 + fin.cast(pl.Int32) * 2 + pl.col(like).fill_null(0).cast(pl.Int32) + 1).cast(pl.Int32)


def hour_of_day(ts: str | pl.Expr) -> pl.Expr:
    """UTC hour of a ms timestamp, 1..24 (0 = padding)."""
    e = pl.col(ts) if isinstance(ts, str) else ts
    return ((e // 3_600_000) % 24 + 1).cast(pl.Int32)


def plan_vocab(dims: dict[str, pl.DataFrame], cfg: FeatureConfig) -> dict[str, int]:
    """Bucket count per id space, from the dimension tables (largest id + 2, capped at ``max_vocab``)."""

    def size(n: int) -> int:
        return int(min(max(n, 0) + 2, cfg.max_vocab))

    n_cat = int(dims["items"]["category_id"].max() or 0)
    n_cat = max(n_cat, int(dims["queries"]["category_id"].max() or 0))
    vocab = {
        "user": size(dims["users"]["user_id"].max() or 0),
        "age": size(dims["users"]["age_bucket"].max() or 0),
        "gender": size(dims["users"]["gender"].max() or 0),
        "city": size(dims["users"]["city_id"].max() or 0),
        "query": size(dims["queries"]["query_id"].max() or 0),
        "category": size(n_cat),
        "n_terms": 34,
        "item": size(dims["items"]["item_id"].max() or 0),
        "author": size(dims["items"]["author_id"].max()),
        "duration": 18,
        "position": 66,
        "hour": 26,
        "device": 258,
        "network": 258,
        "cat_pair": size((n_cat + 1) * (n_cat + 1)),
        "cat_match": 3,
        "query_item": cfg.cross_vocab,
        "dt": N_DT_BUCKETS,
        "action": N_ACTION_BUCKETS,
    }
    for name, f in cfg.features.items():  # declared ids: a new space's vocabulary (a built-in's is planned above)
        space = f.space(name)
        if f.kind != "dense" and space not in vocab:
            vocab[space] = f.vocab or size(dims[f.table][f.column].max() or 0)
    return vocab


# --- relevance --------------------------------------------------------------------------------------------------


def relevance_tables(cfg: FeatureConfig, dims: dict[str, pl.LazyFrame]) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """(item_id, key) and (query_id, key) frames: an event is relevant to an impression when the keys are equal."""
    if cfg.relevance == "category":
        return (
            dims["items"].select("item_id", pl.col("category_id").cast(pl.Int64).alias("key")),
            dims["queries"].select("query_id", pl.col("category_id").cast(pl.Int64).alias("key")),
        )
    if cfg.relevance == "none":
        return (
            dims["items"].select("item_id", pl.lit(0, pl.Int64).alias("key")),
            dims["queries"].select("query_id", pl.lit(0, pl.Int64).alias("key")),
        )
    root = cfg.relevance_keys
    return (
        pl.scan_parquet(f"{root}/items.parquet").select(pl.col("item_id").cast(pl.Int64), pl.col("key").cast(pl.Int64)),
        pl.scan_parquet(f"{root}/queries.parquet").select(
            pl.col("query_id").cast(pl.Int64), pl.col("key").cast(pl.Int64)
        ),
    )


# --- one day of one shard -----------------------------------------------------------------------------------------

EVENT_COLUMNS = ("user_id", "ts", "key", *EVENT_FIELDS)
NO_KEY = -1  # relevance key of an event whose item has none (never equal to a query's key)


def event_tokens(
    events: pl.LazyFrame, items: pl.LazyFrame, item_keys: pl.LazyFrame, vocab: dict[str, int], finish: str | None
) -> pl.LazyFrame:
    """Raw events -> EVENT_COLUMNS, sorted by (user, ts) with a total tie-break (deterministic ordinals)."""
    return (
        events.join(items.select("item_id", "duration_s"), on="item_id", how="left")
        .join(item_keys, on="item_id", how="left")
        .select(
            "user_id",
            "ts",
            pl.col("key").fill_null(NO_KEY),
            bucket("item_id", vocab["item"]).alias("item"),
            bucket("author_id", vocab["author"]).alias("author"),
            bucket("category_id", vocab["category"]).alias("category"),
            action_id("watch_time_s", finish, "like").alias("action"),
            hour_of_day("ts").alias("hour"),
            log2_bucket("duration_s", vocab["duration"]).alias("duration"),
        )
        .sort(*EVENT_COLUMNS)
    )


def ns_columns(vocab: dict[str, int]) -> list[pl.Expr]:
    """The built-in non-sequential feature columns (features.spec.BUILTIN), bucketised."""
    hour = ((pl.col("ts") // 3_600_000) % 24).cast(pl.Int32)
    exprs = [
        bucket("user_id", vocab["user"]),
        bucket("age_bucket", vocab["age"]),
        bucket("gender", vocab["gender"]),
        bucket("city_id", vocab["city"]),
        bucket("query_id", vocab["query"]),
        bucket("query_category", vocab["category"]),
        bucket(pl.col("n_terms").clip(0, 32), vocab["n_terms"]).alias("n_terms"),
        bucket("item_id", vocab["item"]),
        bucket("author_id", vocab["author"]),
        bucket("item_category", vocab["category"]),
        log2_bucket("duration_s", vocab["duration"]).alias("duration_b"),
        bucket(pl.col("position").clip(0, 64), vocab["position"]).alias("position_b"),
        bucket(hour, vocab["hour"]).alias("hour_b"),
        bucket("device_type", vocab["device"]).alias("device_b"),
        bucket("network_type", vocab["network"]).alias("network_b"),
        bucket(pl.col("query_category") * (vocab["category"] + 1) + pl.col("item_category"), vocab["cat_pair"]).alias(
            "cat_pair"
        ),
        (1 + (pl.col("query_category") == pl.col("item_category")).cast(pl.Int32)).fill_null(0).alias("cat_match"),
        bucket(pl.col("query_id") * 1_000_003 + pl.col("item_id"), vocab["query_item"]).alias("query_item"),
    ]
    return [e.name.prefix("ns_") for e in exprs]


def declared_columns(cfg: FeatureConfig) -> list[pl.Expr]:
    """The declared features (``cfg.features``), read from ``_f_<name>``: ids bucketised as ``ns_<name>`` (an id
    list: a list of buckets), floats normalised as ``dense_<name>`` (Float32; missing -> 0)."""
    out = []
    for name, f in cfg.features.items():
        x = pl.col(f"_f_{name}")
        if f.kind == "id":
            out.append(bucket(x, cfg.vocab[f.space(name)]).alias(f"ns_{name}"))
            continue
        if f.kind == "ids":  # "3|17|4" -> [4, 18, 5] (bucketised, the first max_len); "" -> [0]
            each = bucket(pl.element().cast(pl.Int64, strict=False), cfg.vocab[f.space(name)])
            out.append(x.cast(pl.String).str.split("|").list.eval(each).list.head(f.max_len).alias(f"ns_{name}"))
            continue
        x = x.cast(pl.Float64)
        if f.norm == "log1p":
            x = x.clip(lower_bound=0).log1p()
        elif f.norm == "zscore":
            x = (x - f.mean) / f.std
        out.append(x.fill_null(0.0).fill_nan(0.0).cast(pl.Float32).alias(f"dense_{name}"))
    return out


def ordinal_before(
    samples: pl.LazyFrame, tokens: pl.LazyFrame, state: pl.LazyFrame, key: str | None, name: str
) -> pl.LazyFrame:
    """Attach ``name`` = number of the user's events (whose relevance key equals the sample's column ``key``, if
    given) strictly before ``ts``.

    = the count in ``state`` (all earlier days) + the within-day rank of the latest earlier event of this day.
    """
    by = ["user_id", "key"] if key else ["user_id"]
    day = tokens.select("ts", *by, (pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(by)).alias("_day_n"))
    day = day.sort("ts", "_day_n")  # ties in ts: the later rank last, so "latest earlier event" has the largest rank
    base = state if key else state.group_by("user_id").agg(pl.col("n").sum())
    left = samples.with_columns(pl.col(key).alias("key")) if key else samples
    out = (
        left.join_asof(day, on="ts", by=by, strategy="backward", allow_exact_matches=False, check_sortedness=False)
        .join(base.rename({"n": "_base_n"}), on=by, how="left", maintain_order="left")
        .with_columns((pl.col("_base_n").fill_null(0) + pl.col("_day_n").fill_null(0)).alias(name))
        .drop("_base_n", "_day_n")
    )
    return out.drop("key") if key else out


def next_state(state: pl.LazyFrame, tokens: pl.LazyFrame) -> pl.LazyFrame:
    """Cumulative (user, key) event counts after this day."""
    day = tokens.group_by("user_id", "key").agg(pl.len().cast(pl.Int64).alias("n"))
    return pl.concat([state, day]).group_by("user_id", "key").agg(pl.col("n").sum()).sort("user_id", "key")


SAMPLE_KEYS = ("request_id", "user_id", "ts", "label", *GROUND_TRUTH)
KEY_COLUMN = {"none": None, "query": "rel_key", "candidate": "cand_key"}  # a sequence's relevance -> sample column


def pointer_columns(cfg: FeatureConfig) -> list[str]:
    """The samples' relevance keys and one ordinal ``<sequence>_hi`` per sequence (features.materialize reads them)."""
    rules = {s.relevance for s in cfg.sequence_specs().values()}
    keys = [c for r, c in KEY_COLUMN.items() if c and (r in rules or c == "rel_key")]
    return [*keys, *(f"{n}_hi" for n in cfg.sequence_specs())]


def empty_state() -> pl.LazyFrame:
    return pl.LazyFrame(schema={"user_id": pl.Int64, "key": pl.Int64, "n": pl.Int64})


def stream_events(events: dict[str, pl.LazyFrame], cfg: FeatureConfig) -> dict[str, pl.LazyFrame]:
    """Each stream's raw events (``cfg.streams()``) from the tables' events, keyed by the tables' streams
    (``search``, ``feed``): a filtered stream keeps its filter's rows."""
    out = {}
    for stream, (table, where) in cfg.streams().items():
        ev = events[EVENT_TABLES[table]]
        out[stream] = ev if where is None else ev.filter(pl.sql_expr(scalar_sql(where, f"sequence {stream!r} filter")))
    return out


def samples_of(
    impressions: pl.LazyFrame,
    tokens: dict[str, pl.LazyFrame],
    state: dict[str, pl.LazyFrame],
    dims: dict[str, pl.LazyFrame],
    cfg: FeatureConfig,
    keys: tuple[pl.LazyFrame, pl.LazyFrame],
    keep: tuple[str, ...] = (),
) -> pl.LazyFrame:
    """Impressions -> samples (unsorted): the bucketised non-sequential features, the declared ones, the relevance
    keys and one ordinal per sequence. ``tokens``: each stream's event tokens (``event_tokens``) after ``state`` (the
    counts of the events before them); ``keys``: ``relevance_tables``; ``keep``: impression columns passed through.

    The one definition of a sample's features: ``build_day`` (training, a day at a time) and ``features.online``
    (serving, a request at a time) both call it."""
    item_keys, query_keys = keys
    declared = {t: [pl.col(f.column).alias(f"_f_{n}") for n, f in cfg.features.items() if f.table == t] for t in dims}
    items = dims["items"].select(
        "item_id", "author_id", pl.col("category_id").alias("item_category"), "duration_s", *declared["items"]
    )
    queries = dims["queries"].select(
        "query_id", pl.col("category_id").alias("query_category"), "n_terms", *declared["queries"]
    )
    users = dims["users"].select("user_id", "age_bucket", "gender", "city_id", *declared["users"])
    own = [pl.col(f.column).alias(f"_f_{n}") for n, f in cfg.features.items() if f.table == "impressions"]
    imps = (
        impressions.with_columns(own)
        .join(items, on="item_id", how="left")
        .join(queries, on="query_id", how="left")
        .join(users, on="user_id", how="left")
        .join(query_keys.rename({"key": "rel_key"}), on="query_id", how="left")
        .join(item_keys.rename({"key": "cand_key"}), on="item_id", how="left")
        .with_columns(pl.col("rel_key", "cand_key").fill_null(NO_KEY - 1))  # a query / item without key matches none
        .sort("ts")
    )
    for name, seq in cfg.sequence_specs().items():
        s = seq.stream(name)
        imps = ordinal_before(imps, tokens[s], state[s], KEY_COLUMN[seq.relevance], f"{name}_hi")
    return imps.select(
        *SAMPLE_KEYS, "day", *ns_columns(cfg.vocab), *declared_columns(cfg), *pointer_columns(cfg), *keep
    )


def build_day(
    impressions: pl.LazyFrame,
    events: dict[str, pl.LazyFrame],
    state: dict[str, pl.LazyFrame],
    dims: dict[str, pl.LazyFrame],
    cfg: FeatureConfig,
) -> dict[str, pl.DataFrame]:
    """One day of one user shard: samples, the day's event tokens per stream and the new state; one ``collect_all``.

    ``events`` are keyed by the event tables' streams (``search``, ``feed``: the tables the spec's sequences read),
    ``state`` by ``cfg.streams()`` and holds the cumulative counts of all earlier days (``empty_state()`` for the
    store's first day). Returns ``samples``, ``events/<stream>``, ``state/<stream>``.
    """
    # a clean day ingested before the contract had p_click_ns / p_click_seq lacks them: null, as in real logs
    have = impressions.collect_schema().names()
    impressions = impressions.with_columns(pl.lit(None, pl.Float32).alias(c) for c in GROUND_TRUTH if c not in have)
    keys = relevance_tables(cfg, dims)
    streams = cfg.streams()
    raw = stream_events(events, cfg)
    tokens = {
        s: event_tokens(raw[s], dims["items"], keys[0], cfg.vocab, finish="finish" if t == "feed_events" else None)
        for s, (t, _) in streams.items()
    }
    samples = samples_of(impressions, tokens, state, dims, cfg, keys).sort(
        "request_id", "ns_position_b", "ns_item_id"
    )  # deterministic: candidates in shown order
    frames = {"samples": samples}
    for s in streams:
        frames[f"events/{s}"] = tokens[s]
        frames[f"state/{s}"] = next_state(state[s], tokens[s])
    out = pl.collect_all(list(frames.values()))
    return dict(zip(frames, out))

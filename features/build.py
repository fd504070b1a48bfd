"""Point-in-time features for every impression, built with Polars (one user shard at a time).

Output, per shard (``docs/data.md`` has the full format)::

    samples      one row per impression: bucketised non-sequential ids + *pointers* into the user's timelines
    search_by_ts the user's search-click events ordered by time           (long-term sequence = a suffix of it)
    search_by_cat the same events ordered by (category, time)              (search sequence = a contiguous range)
    feed_by_cat  the user's feed events ordered by (category, time)        (feed sequence = a contiguous range)

Every sequence a sample needs is a contiguous slice ``[lo, hi)`` of one of the user's timelines, so a sample stores
two integers per sequence whatever L is; ``features.materialize`` expands slices into fixed (B, L, F) arrays.

Point-in-time rule: an event enters an impression's sequences only if ``event.ts < impression.ts`` (strictly), via
``join_asof(..., allow_exact_matches=False)``.

Relevance (search and feed sequences): an event is relevant to the current query when its item category equals the
query's intent category; the sequence is the ``k`` most recent relevant events (k = 50 in the paper). Issue #3 makes
the filter configurable.

Ids are bucketised: ``1 + id mod (vocab - 1)`` (identity + 1 while vocab exceeds the largest id); 0 is padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import polars as pl

# Non-sequential feature groups (paper §3.3.1, semantic grouping): group -> ((column, id space), ...).
# The id space names the embedding table: columns that share one (candidate item and sequence items) share it.
NS_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "user": (("user_id", "user"), ("age_bucket", "age"), ("gender", "gender"), ("city_id", "city")),
    "query": (("query_id", "query"), ("query_category", "category"), ("n_terms", "n_terms")),
    "item": (("item_id", "item"), ("author_id", "author"), ("item_category", "category"), ("duration_b", "duration")),
    "context": (("position_b", "position"), ("hour_b", "hour"), ("device_b", "device"), ("network_b", "network")),
    "cross": (("cat_pair", "cat_pair"), ("cat_match", "cat_match"), ("query_item", "query_item")),
}
# Side information of every sequence event (paper: ids, category, author, time delta, action).
SEQ_FIELDS: tuple[str, ...] = ("item", "author", "category", "dt", "action")
SEQUENCES: tuple[str, ...] = ("long", "search", "feed")
N_DT_BUCKETS = 24  # time-delta buckets: 1 + floor(log2(1 + minutes)), capped
N_ACTION_BUCKETS = 64  # action id: watch-time bucket (0..15) * 4 + finish * 2 + like, + 1


@dataclass(frozen=True)
class FeatureConfig:
    long_len: int = 3000  # L_long: last <= long_len search-click events (paper preset 3000)
    search_len: int = 50  # top-k query-relevant search events (paper: 50)
    feed_len: int = 50  # top-k query-relevant feed events (paper: 50)
    max_vocab: int = 1 << 20  # cap on the bucket count of any id space
    cross_vocab: int = 1 << 15  # buckets of hashed cross ids (query x item)
    n_shards: int = 4  # user shards (user_id mod n_shards), one Ray task each
    vocab: dict[str, int] = field(default_factory=dict)  # id space -> bucket count incl. padding (set by plan_vocab)

    @staticmethod
    def tiny() -> "FeatureConfig":
        return FeatureConfig(long_len=32, search_len=8, feed_len=8, n_shards=2)

    def seq_len(self, name: str) -> int:
        return {"long": self.long_len, "search": self.search_len, "feed": self.feed_len}[name]

    def to_dict(self) -> dict:
        return asdict(self)


def bucket(col: str | pl.Expr, vocab: int) -> pl.Expr:
    """``1 + id mod (vocab - 1)`` as Int32; null -> 0 (padding / missing)."""
    e = pl.col(col) if isinstance(col, str) else col
    return (e.cast(pl.Int64) % (vocab - 1) + 1).fill_null(0).cast(pl.Int32)  # keeps the input column name


def log2_bucket(col: str | pl.Expr, cap: int) -> pl.Expr:
    """``1 + floor(log2(1 + x))`` capped at ``cap - 1``; null -> 0."""
    e = pl.col(col) if isinstance(col, str) else col
    return ((e.cast(pl.Float64).clip(lower_bound=0) + 1).log(2).floor() + 1).clip(upper_bound=cap - 1).fill_null(0).cast(pl.Int32)


def action_id(watch_s: str, finish: str | None, like: str) -> pl.Expr:
    """One action id per event from watch time, finish and like."""
    fin = pl.col(finish).fill_null(0) if finish else pl.lit(0)
    w = log2_bucket(watch_s, 16)
    return (w * 4 + fin.cast(pl.Int32) * 2 + pl.col(like).fill_null(0).cast(pl.Int32) + 1).cast(pl.Int32)


def plan_vocab(dims: dict[str, pl.DataFrame], cfg: FeatureConfig) -> dict[str, int]:
    """Bucket count per id space, from the dimension tables (largest id + 2, capped at ``max_vocab``)."""

    def size(n: int) -> int:
        return int(min(max(n, 0) + 2, cfg.max_vocab))

    n_cat = int(dims["items"]["category_id"].max() or 0)
    n_cat = max(n_cat, int(dims["queries"]["category_id"].max() or 0))
    vocab = {
        "user": size(dims["users"]["user_id"].max()),
        "age": size(dims["users"]["age_bucket"].max() or 0),
        "gender": size(dims["users"]["gender"].max() or 0),
        "city": size(dims["users"]["city_id"].max() or 0),
        "query": size(dims["queries"]["query_id"].max()),
        "category": size(n_cat),
        "n_terms": 34,
        "item": size(dims["items"]["item_id"].max()),
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
    return vocab


# --- timelines --------------------------------------------------------------------------------------------------

TIMELINE_COLUMNS = ("user_id", "ts", "item", "author", "category", "action")


def event_tokens(events: pl.LazyFrame, vocab: dict[str, int], finish: str | None) -> pl.LazyFrame:
    """Raw events -> (user_id, ts, item, author, category, action) with bucketised side info."""
    return events.select(
        "user_id",
        "ts",
        bucket("item_id", vocab["item"]).alias("item"),
        bucket("author_id", vocab["author"]).alias("author"),
        bucket("category_id", vocab["category"]).alias("category"),
        action_id("watch_time_s", finish, "like").alias("action"),
        pl.col("category_id").alias("raw_category"),
    )


def by_time(tokens: pl.LazyFrame) -> pl.LazyFrame:
    """Timeline ordered by time; ``idx`` = position within the user's timeline."""
    return tokens.sort("user_id", "ts", "item").with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("user_id").alias("idx"))


def by_category(tokens: pl.LazyFrame) -> pl.LazyFrame:
    """Timeline ordered by (category, time); ``idx`` as above, ``cat_lo`` = first idx of the event's category."""
    return (
        tokens.sort("user_id", "raw_category", "ts", "item")
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("user_id").alias("idx"))
        .with_columns(pl.col("idx").min().over("user_id", "raw_category").alias("cat_lo"))
    )


# --- samples ----------------------------------------------------------------------------------------------------


def ns_columns(vocab: dict[str, int]) -> list[pl.Expr]:
    """The non-sequential feature columns, bucketised (see NS_GROUPS)."""
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
        bucket(pl.col("query_category") * (vocab["category"] + 1) + pl.col("item_category"), vocab["cat_pair"]).alias("cat_pair"),
        (1 + (pl.col("query_category") == pl.col("item_category")).cast(pl.Int32)).fill_null(0).alias("cat_match"),
        bucket(pl.col("query_id") * 1_000_003 + pl.col("item_id"), vocab["query_item"]).alias("query_item"),
    ]
    return [e.name.prefix("ns_") for e in exprs]


def last_before(samples: pl.LazyFrame, timeline: pl.LazyFrame, by: list[str], prefix: str) -> pl.LazyFrame:
    """Attach the timeline row of the latest event strictly before each sample (``{prefix}idx``, ``{prefix}cat_lo``)."""
    cols = ["ts", *by, "idx"] + (["cat_lo"] if "cat_lo" in timeline.collect_schema() else [])
    right = timeline.select(cols).rename({c: f"{prefix}{c}" for c in cols if c not in ("ts", *by)})
    # both sides are sorted by ts globally, hence within every `by` group
    return samples.join_asof(
        right.sort("ts"), on="ts", by=by, strategy="backward", allow_exact_matches=False, check_sortedness=False
    )


def top_k_range(prefix: str, k: int) -> list[pl.Expr]:
    """``[lo, hi)`` of the k most recent relevant events: hi = idx + 1, lo = max(cat_lo, hi - k); none -> (0, 0)."""
    hi = (pl.col(f"{prefix}idx") + 1).fill_null(0)
    lo = pl.max_horizontal(pl.col(f"{prefix}cat_lo").fill_null(0), hi - k)
    return [lo.cast(pl.Int32).alias(f"{prefix}lo"), hi.cast(pl.Int32).alias(f"{prefix}hi")]


SAMPLE_KEYS = ("request_id", "user_id", "ts", "label", "p_click")
POINTER_COLUMNS = ("long_hi", "search_lo", "search_hi", "feed_lo", "feed_hi")


def ns_column_names() -> list[str]:
    """Stored names of the non-sequential columns, in NS_GROUPS order."""
    return [f"ns_{col}" for cols in NS_GROUPS.values() for col, _ in cols]


def build_shard(
    impressions: pl.LazyFrame,
    search_events: pl.LazyFrame,
    feed_events: pl.LazyFrame,
    dims: dict[str, pl.LazyFrame],
    cfg: FeatureConfig,
) -> dict[str, pl.DataFrame]:
    """Samples and timelines for the users present in the inputs (one shard); collected once with ``collect_all``."""
    vocab = cfg.vocab
    search = event_tokens(search_events, vocab, finish=None)
    feed = event_tokens(feed_events, vocab, finish="finish")
    search_ts, search_cat, feed_cat = by_time(search), by_category(search), by_category(feed)

    items = dims["items"].select("item_id", "author_id", pl.col("category_id").alias("item_category"), "duration_s")
    queries = dims["queries"].select("query_id", pl.col("category_id").alias("query_category"), "n_terms")
    users = dims["users"].select("user_id", "age_bucket", "gender", "city_id")
    imps = (
        impressions.join(items, on="item_id", how="left")
        .join(queries, on="query_id", how="left")
        .join(users, on="user_id", how="left")
        .with_columns(pl.col("query_category").alias("raw_category"))
        .sort("ts")
    )
    imps = last_before(imps, search_ts, ["user_id"], "long_")
    imps = last_before(imps, search_cat, ["user_id", "raw_category"], "search_")
    imps = last_before(imps, feed_cat, ["user_id", "raw_category"], "feed_")
    samples = imps.select(
        *SAMPLE_KEYS,
        "day",
        *ns_columns(vocab),
        (pl.col("long_idx") + 1).fill_null(0).cast(pl.Int32).alias("long_hi"),
        *top_k_range("search_", cfg.search_len),
        *top_k_range("feed_", cfg.feed_len),
    ).sort("day", "request_id", "ns_position_b", "ns_item_id")  # deterministic: candidates in shown order
    keep = list(TIMELINE_COLUMNS)
    out = pl.collect_all([samples, search_ts.select(keep), search_cat.select(keep), feed_cat.select(keep)])
    return dict(zip(("samples", "search_by_ts", "search_by_cat", "feed_by_cat"), out))

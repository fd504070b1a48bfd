"""Output of the synthetic log generator (``features.synth``): columns to tables in the contract's exact schema
(``features.schema``), the dimension snapshots of the world, and atomic Parquet writes.

Layout: ``<data-dir>/logs/v1/<table>/day=YYYY-MM-DD/part-0.parquet`` for impressions, search_events and feed_events
(one partition per day of the window) and ``<data-dir>/logs/v1/<table>/part-0.parquet`` for users, items and queries.
Impressions are written in request order (time order), search and feed events sorted by ``(ts, user_id, item_id)``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from features import storage
from features.schema import PART_FILE, TABLES
from features.synth_world import World

SORT_BY = {"search_events": ("ts", "user_id", "item_id"), "feed_events": ("ts", "user_id", "item_id")}


def to_table(name: str, cols: dict[str, np.ndarray]) -> pa.Table:
    """Columns → a table with exactly the contract's schema (column order and types), sorted by ``SORT_BY[name]``."""
    schema = TABLES[name].schema
    sort_by = SORT_BY.get(name, ())
    if sort_by:
        order = np.lexsort(tuple(cols[k] for k in reversed(sort_by)))
        cols = {k: v[order] for k, v in cols.items()}
    arrays = [pa.array(np.asarray(cols[f.name]).astype(f.type.to_pandas_dtype()), type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def dimension_tables(world: World) -> dict[str, pa.Table]:
    """The users, items and queries snapshots: every id 0..n-1 of the world."""
    I, Q, U = len(world.item_author), len(world.query_cat), len(world.user_activity)
    return {
        "users": to_table(
            "users",
            {
                "user_id": np.arange(U),
                "age_bucket": world.user_age,
                "gender": world.user_gender,
                "city_id": world.user_city,
            },
        ),
        "items": to_table(
            "items",
            {
                "item_id": np.arange(I),
                "author_id": world.item_author,
                "category_id": world.item_cat,
                "duration_s": world.item_duration,
                "upload_ts": world.item_upload_ts,
            },
        ),
        "queries": to_table(
            "queries",
            {"query_id": np.arange(Q), "category_id": world.query_cat, "n_terms": world.query_n_terms},
        ),
    }


def write_atomic(table: pa.Table, folder: str) -> str:
    """Write ``folder/part-0.parquet`` whole (``features.storage.write_parquet``: a local temporary file renamed into
    place, or one object PUT)."""
    path = storage.join(folder, PART_FILE)
    storage.write_parquet(table, path)
    return path

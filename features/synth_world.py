"""The world of the synthetic logs (``features.synth``), drawn once per seed: categories, authors, items, queries,
users, their initial interests and favourite authors (``World``, ``build_world``).

World (the numbers are the ``SynthConfig`` defaults; the field names are in brackets)
- Categories c = 0..C-1 with Zipf popularity ``pop_c ∝ (c+1)^-1`` [category_zipf].
- Authors: a home category (author a < C gets category a so that every category has one, the rest ~ pop) and an
  author quality ``N(0, 0.3)`` [author_quality_sd]; author popularity ``lognormal(0, 1)`` decides how many items an
  author uploads (author a < A gets item a, so every author has an item).
- Items: an author; the author's home category with probability 0.9 [author_home_prob], else a category ~ pop; quality
  = author quality + ``N(0, 0.5)`` [item_quality_sd]; duration ``lognormal(log 40 s, 0.8)`` rounded, in [3, 1200] s;
  exposure weight ``exp(0.6·quality + N(0, 0.8))`` (how often the engine surfaces it); upload time uniform in the year
  before the window (no item is newer than the window's first day).
- Queries: an intent category (query q < C gets category q, the rest ~ pop), a Zipf popularity within its category
  ``∝ (rank+1)^-1`` [query_zipf] and ``n_terms = 1 + Poisson(1.2)`` (at most 12).
- Users: activity ``lognormal(0, 1.2)`` [activity_sigma] (the share of a day's requests and events a user gets: some
  users have hundreds of search clicks over 70 days, many have a handful); age_bucket, gender (5% unknown each),
  city ~ Zipf over 200 cities; a primary device (android 55%, ios 35%, web 10%). Age, gender and city do not enter the
  click model (realistic noise features).
- Interests: a logit vector over categories, weak topics ``N(0, 0.5)``, 2–4 [topics_min, topics_max] strong topics
  (~ pop, distinct) at ``3 + N(0, 0.5)`` [topic_logit]; the user's interest of the day is ``π_u,t = softmax(z_u,t)``
  (strong topics hold ~75–80% of it).
- Favourite authors: 3 [fav_authors] per user; each is an author of a category drawn from the user's initial interest
  with probability 0.8 [fav_in_topic] (else ~ pop), uniform among the authors whose home is that category. Favourites
  are in no column: they only show as over-represented authors in the user's search clicks and feed events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.schema import MS_PER_DAY
from features.synth_config import SynthConfig
from features.synth_sampling import Grouped, choice, choice_rows, softmax, zipf

DURATION_MEDIAN_S = 40.0
DURATION_LOG_SD = 0.8
N_CITIES = 200


@dataclass
class World:
    cat_pop: np.ndarray  # (C,) category popularity
    author_cat: np.ndarray  # (A,) home category
    item_author: np.ndarray  # (I,)
    item_cat: np.ndarray  # (I,)
    item_quality: np.ndarray  # (I,)
    item_duration: np.ndarray  # (I,) seconds
    item_dur_z: np.ndarray  # (I,) standardised log duration
    item_upload_ts: np.ndarray  # (I,) ms
    query_cat: np.ndarray  # (Q,)
    query_n_terms: np.ndarray  # (Q,)
    user_activity: np.ndarray  # (U,) probabilities
    user_age: np.ndarray  # (U,)
    user_gender: np.ndarray  # (U,)
    user_city: np.ndarray  # (U,)
    user_device: np.ndarray  # (U,) primary device 1..3
    user_favs: np.ndarray  # (U, F) favourite author ids
    interest0: np.ndarray  # (U, C) initial interest logits
    items_by_cat: Grouped  # items of a category, by exposure weight
    items_by_author: Grouped  # items of an author, by exposure weight
    queries_by_cat: Grouped  # queries of a category, by popularity
    items_all_cdf: np.ndarray  # (I,) cdf of exposure weights over all items


def build_world(cfg: SynthConfig, start_ms: int) -> World:
    """Draw the static entities (categories, authors, items, queries, users, initial interests, favourites)."""
    rng = np.random.default_rng([cfg.seed, 0])
    C, A, I, Q, U = cfg.categories, cfg.authors, cfg.items, cfg.queries, cfg.users
    cat_pop = zipf(C, cfg.category_zipf)

    author_cat = np.concatenate([np.arange(C), choice(rng, cat_pop, A - C)])
    author_quality = rng.normal(0.0, cfg.author_quality_sd, A)
    author_pop = rng.lognormal(0.0, 1.0, A)

    item_author = np.concatenate([np.arange(A), choice(rng, author_pop / author_pop.sum(), I - A)])
    home = rng.random(I) < cfg.author_home_prob
    home[:A] = True  # an author's first item is in its home category, so every category has items
    item_cat = np.where(home, author_cat[item_author], choice(rng, cat_pop, I))
    item_quality = author_quality[item_author] + rng.normal(0.0, cfg.item_quality_sd, I)
    duration = np.clip(np.round(rng.lognormal(np.log(DURATION_MEDIAN_S), DURATION_LOG_SD, I)), 3, 1200)
    exposure = np.exp(0.6 * item_quality + rng.normal(0.0, 0.8, I))
    upload_ts = start_ms - 1 - rng.integers(0, 365 * MS_PER_DAY, I)

    query_cat = np.concatenate([np.arange(C), choice(rng, cat_pop, Q - C)])
    # popularity by rank within the category: the earlier a query id in its category, the more popular
    order = np.lexsort((np.arange(Q), query_cat))
    rank = np.empty(Q, dtype=np.int64)
    counts = np.bincount(query_cat, minlength=C)
    rank[order] = np.arange(Q) - np.repeat(np.cumsum(counts) - counts, counts)
    query_pop = 1.0 / (rank + 1.0) ** cfg.query_zipf
    n_terms = np.minimum(1 + rng.poisson(1.2, Q), 12)

    activity = np.minimum(rng.lognormal(0.0, cfg.activity_sigma, U), cfg.activity_cap)  # median 1
    age = np.where(rng.random(U) < 0.05, 0, rng.integers(1, 9, U))
    gender = np.where(rng.random(U) < 0.05, 0, rng.integers(1, 3, U))
    city = choice(rng, zipf(N_CITIES, 1.0), U)
    device = 1 + choice(rng, np.array([0.55, 0.35, 0.10]), U)

    # interests: weak N(0, .5) everywhere, 2-4 distinct strong topics ~ pop (Gumbel top-k per user)
    interest = rng.normal(0.0, 0.5, (U, C))
    n_topics = rng.integers(cfg.topics_min, cfg.topics_max + 1, U)
    gumbel_keys = np.log(cat_pop)[None, :] - np.log(-np.log(rng.random((U, C))))
    topic_rank = np.argsort(np.argsort(-gumbel_keys, axis=1), axis=1)
    strong = topic_rank < n_topics[:, None]
    interest = np.where(strong, cfg.topic_logit + rng.normal(0.0, 0.5, (U, C)), interest)

    authors_by_cat = Grouped(author_cat, np.ones(A), C)
    p0 = softmax(interest)
    fav_cat = np.where(
        rng.random((U, cfg.fav_authors)) < cfg.fav_in_topic,
        np.stack([choice_rows(rng, p0) for _ in range(cfg.fav_authors)], axis=1),
        choice(rng, cat_pop, U * cfg.fav_authors).reshape(U, cfg.fav_authors),
    )
    favs = authors_by_cat.sample(rng, fav_cat)

    return World(
        cat_pop=cat_pop,
        author_cat=author_cat,
        item_author=item_author,
        item_cat=item_cat,
        item_quality=item_quality,
        item_duration=duration,
        item_dur_z=np.log(duration / DURATION_MEDIAN_S) / DURATION_LOG_SD,
        item_upload_ts=upload_ts,
        query_cat=query_cat,
        query_n_terms=n_terms,
        user_activity=activity / activity.sum(),
        user_age=age,
        user_gender=gender,
        user_city=city,
        user_device=device,
        user_favs=favs,
        interest0=interest,
        items_by_cat=Grouped(item_cat, exposure, C),
        items_by_author=Grouped(item_author, exposure, A),
        queries_by_cat=Grouped(query_cat, query_pop, C),
        items_all_cdf=np.cumsum(exposure) / exposure.sum(),
    )


def is_fav(world: World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Whether each item's author is one of its user's favourite authors (pairwise over two equal-length arrays)."""
    return (world.user_favs[users] == world.item_author[items][:, None]).any(axis=1)

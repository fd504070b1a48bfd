"""Synthetic interaction logs in the log contract (``features.schema``), with a click process built so that the
paper's claims can be tested: long user histories, drifting interests, query-relevant history, position and context.

Command (default sizes, about a million rows, a few seconds)::

    python -m features.synth --data-dir data --end 2026-01-31 --days 70 --users 2000 --items 5000 --authors 400 \
        --queries 800 --categories 16 --requests-per-day 400 --candidates 10 --search-events-per-day 4000 \
        --feed-events-per-day 6000 --seed 0

It writes ``<data-dir>/logs/v1/<table>/day=YYYY-MM-DD/part-0.parquet`` for impressions, search_events and feed_events
(one partition per day of the window) and ``<data-dir>/logs/v1/<table>/part-0.parquet`` for users, items and queries,
then prints a JSON summary. It refuses to write over an existing logs root unless ``--overwrite`` is given.

Ids: every id (user, item, author, query, category, city, request) starts at 0 (the contract allows 0); the dimension
tables hold every id 0..n-1, so they cover every id used in the daily tables. Authors have no dimension table.

Generative story (the numbers are the ``SynthConfig`` defaults; the field names are in brackets)
------------------------------------------------------------------------------------------------
World (drawn once per seed)
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

Every day t (the state carries over from day to day, so recent history is more informative than old history)
- Drift (from the second day on): ``z_u,t = clip(z_u,t-1 + N(0, 0.15), -4, 4)`` [drift_sigma]; with probability 0.03
  [topic_switch_prob] a user swaps the logit of a category drawn from ``π_u,t-1`` (usually a strong topic) with that
  of a category ~ pop (a new topic appears, an old one fades).
- Times: hour of day from a diurnal profile (night 0–5 h ×0.3, 6–17 h ×1, evening 18–23 h ×1.8), uniform within
  the hour; impression times are squeezed into the first ``24 h − 3 min`` of the day so that clicks stay in the day.
- Requests (``requests_per_day``, ids consecutive in time order across days): a user ~ activity; a query category ~
  ``π_u,t`` with probability 0.85 [query_from_interest] (else ~ pop) and a query of it ~ query popularity; device =
  the user's primary one with probability 0.85 (else uniform 1..3; 2% unknown 0); network wifi with probability 0.55
  (0.75 in the evening or at night), else cellular (2% unknown 0).
- Candidates: ``candidates`` distinct items, each drawn from the query's category with probability 0.75
  [on_topic_candidates] (else from all items), by exposure weight. The engine ranks them by
  ``0.7·relevant + 0.5·quality + N(0, 1)`` [rank_relevance, rank_quality]: position is informative but noisy.
- Click model: ``p_click = sigmoid(logit)`` written to ``p_click``, ``label ~ Bernoulli(p_click)``, with (the
  history-only terms, the ones the behaviour history reveals, marked ``*``)::

      logit = -3.9                                   bias                     [click_bias]
            + 1.2 · [cat_item == cat_query]          query relevance          [click_relevance]
          * + 2.0 · π_u,t[cat_query]                 user's current interest in the query's category [click_interest]
          * + 2.0 · [fav author and home(author) == cat_query]   history-only affinity, query-relevant [click_fav_match]
          * + 0.3 · [fav author and home(author) != cat_query]   the same affinity elsewhere is weak   [click_fav_other]
            - 0.3 · log(1 + position)                position bias            [click_position]
            + 0.25 · [18 <= hour <= 23] - 0.2 · [hour <= 5]                   [click_evening, click_night]
            + device effect (unknown 0, android 0, ios +0.1, web -0.2)        [click_device]
            - 0.3 · dur_z on android/ios, + 0.3 · dur_z on web      device × duration
                                                     [click_mobile_duration, click_web_duration]
            - 0.2 · dur_z on cellular                network × duration       [click_cellular_duration]
            + 1.0 · item quality                                              [click_quality]
            + N(0, 0.3)                              noise                    [click_noise]

  with ``dur_z = log(duration_s / 40) / 0.8``. Defaults give a CTR of about 9% and an oracle AUC of about 0.76.
- The click model split by what each term needs to be known, both with the same bias and the same noise draw:
  ``p_click_ns`` = sigmoid(logit without the history-only terms: interest, fav_match, fav_other) and ``p_click_seq`` =
  sigmoid(bias + those terms + noise), so ``logit(p_click) = logit(p_click_ns) + logit(p_click_seq) - bias - noise``.
  Their oracle AUCs put "what sequences can add" next to what a model with sequences does add. They are not strict
  ceilings of a model class: a model without sequences still sees user_id and the query, and can learn part of a
  user's interest (the strong topics drift slowly) and even favourite authors from them. Defaults (all 70 days): AUC
  0.76 (p_click), 0.73 (p_click_ns), 0.64 (p_click_seq); query-level AUC 0.74, 0.74, 0.59: within a request the
  interest term is one constant, so of the history-only terms only the favourite authors rank its candidates. Their
  means (generate's summary) are below the CTR: the halves rank, they are not calibrated (no logloss for them).
- Engagement (clicks, extra search clicks and feed events alike): completion propensity
  ``s = sigmoid(-0.3 + 1.2·fav + 1.5·π_u,t[cat_item] + 0.8·quality - 0.6·dur_z)``; ``finish ~ Bernoulli(s)``;
  ``watch_time_s = duration`` if finished else ``duration · Beta(1 + 3s, 2)`` (at least 0.5 s);
  ``like ~ Bernoulli(sigmoid(-3 + 1.5·fav + 0.8·quality + 1.2·finish))``.
- search_events = every clicked impression (``ts`` = impression ts + 2 s + Exponential(20 s), at most 3 min, so
  strictly after the impression and in the same day; same query and item) plus ``search_events_per_day`` extra search
  clicks from traffic outside the impression sample: a user ~ activity; with probability 0.3 [fav_share_search] an
  item of one of the user's favourite authors, else an item of a category ~ ``π_u,t`` (probability 0.9
  [event_from_interest], else ~ pop) by exposure weight; the query is a query of the item's category.
- feed_events (``feed_events_per_day``): the same draw with favourite share 0.25 [fav_share_feed], no query.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.schema import (
    DAY_FORMAT, GROUND_TRUTH, MS_PER_DAY, TABLES, day_start_ms, logs_root, parse_day, table_dir, window,
)

MS_PER_HOUR = 3_600_000
MAX_CLICK_DELAY_MS = 180_000  # a click follows its impression by at most 3 minutes
DIURNAL = np.array([0.3] * 6 + [1.0] * 12 + [1.8] * 6)  # relative traffic per UTC hour of day
DURATION_MEDIAN_S = 40.0
DURATION_LOG_SD = 0.8
N_CITIES = 200
PART_FILE = "part-0.parquet"


@dataclass(frozen=True)
class SynthConfig:
    # sizes (the CLI flags)
    days: int = 70  # days in the window, ending at `end` inclusive
    users: int = 2000  # user ids 0..users-1
    items: int = 5000  # item ids 0..items-1
    authors: int = 400  # author ids 0..authors-1
    queries: int = 800  # query ids 0..queries-1
    categories: int = 16  # category ids 0..categories-1
    requests_per_day: int = 400  # search requests sampled into impressions per day
    candidates: int = 10  # items shown per request (positions 0..candidates-1)
    search_events_per_day: int = 4000  # extra search clicks per day, from traffic outside the impression sample
    feed_events_per_day: int = 6000  # feed events per day
    seed: int = 0  # everything is a function of the seed
    # world
    category_zipf: float = 1.0  # category popularity ∝ (c+1)^-category_zipf
    query_zipf: float = 1.0  # query popularity within its category ∝ (rank+1)^-query_zipf
    author_home_prob: float = 0.9  # probability that an item is in its author's home category
    author_quality_sd: float = 0.3  # sd of the author's quality effect
    item_quality_sd: float = 0.5  # sd of the item's own quality effect (added to its author's)
    activity_sigma: float = 1.0  # lognormal sigma of user activity (heavy-tailed history lengths)
    activity_cap: float = 20.0  # activity weights are capped at this multiple of the median (no single-user flood)
    topics_min: int = 2  # fewest strong topics per user
    topics_max: int = 4  # most strong topics per user
    topic_logit: float = 3.0  # mean interest logit of a strong topic (weak topics ~ N(0, 0.5))
    fav_authors: int = 3  # favourite authors per user (visible only through history)
    fav_in_topic: float = 0.8  # probability that a favourite author is in one of the user's topics
    # daily dynamics
    drift_sigma: float = 0.15  # daily random-walk sd of every interest logit
    topic_switch_prob: float = 0.03  # daily probability that a user swaps a current topic for a new one
    query_from_interest: float = 0.85  # probability that a request's query category is drawn from the user's interest
    on_topic_candidates: float = 0.75  # probability that a candidate is drawn from the query's category
    rank_relevance: float = 0.7  # ranker score weight of query relevance
    rank_quality: float = 0.5  # ranker score weight of item quality (plus N(0, 1) noise)
    event_from_interest: float = 0.9  # probability that a non-favourite event's category is drawn from the interest
    fav_share_search: float = 0.3  # share of extra search clicks on a favourite author's item
    fav_share_feed: float = 0.25  # share of feed events on a favourite author's item
    # click model (logit terms; see the module docstring)
    click_bias: float = -3.9  # intercept
    click_relevance: float = 1.2  # item category == query category
    click_interest: float = 2.0  # × the user's current interest share in the query's category
    click_fav_match: float = 2.0  # favourite author whose home category is the query's category
    click_fav_other: float = 0.3  # favourite author of another category
    click_position: float = 0.3  # × -log(1 + position)
    click_evening: float = 0.25  # hours 18-23 UTC
    click_night: float = -0.2  # hours 0-5 UTC
    click_device: tuple[float, float, float, float] = (0.0, 0.0, 0.1, -0.2)  # unknown, android, ios, web
    click_mobile_duration: float = -0.3  # × dur_z on android/ios (long videos are clicked less on phones)
    click_web_duration: float = 0.3  # × dur_z on web
    click_cellular_duration: float = -0.2  # × dur_z on a cellular network
    click_quality: float = 1.0  # × item quality
    click_noise: float = 0.3  # sd of per-impression logit noise

    def __post_init__(self) -> None:
        checks = {
            "days >= 1": self.days >= 1,
            "users >= 1": self.users >= 1,
            "categories >= 1": self.categories >= 1,
            "authors >= categories": self.authors >= self.categories,
            "items >= authors": self.items >= self.authors,
            "queries >= categories": self.queries >= self.categories,
            "1 <= candidates <= min(items, 1001)": 1 <= self.candidates <= min(self.items, 1001),
            "1 <= topics_min <= topics_max <= categories": 1 <= self.topics_min <= self.topics_max <= self.categories,
            "fav_authors >= 1": self.fav_authors >= 1,
            "per-day counts >= 0": min(self.requests_per_day, self.search_events_per_day, self.feed_events_per_day)
            >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid SynthConfig: {', '.join(bad)}")

    @staticmethod
    def tiny() -> "SynthConfig":
        """A few thousand rows over a week: for tests and smoke runs."""
        return SynthConfig(
            days=7,
            users=60,
            items=200,
            authors=24,
            queries=40,
            categories=6,
            requests_per_day=30,
            candidates=5,
            search_events_per_day=80,
            feed_events_per_day=120,
        )


# ---------------------------------------------------------------------------------------------------------- sampling


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def _choice(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """``n`` draws from one distribution ``p`` (inverse CDF, stable across numpy versions)."""
    cdf = np.cumsum(p)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(p) - 1)


def _choice_rows(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One draw per row of the (n, k) probability matrix ``p``."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(axis=1), p.shape[1] - 1)


class _Grouped:
    """Members (0..n-1) grouped by a key, each group a weighted distribution: draw a member of given groups at once.

    Keys ``group + cdf-within-group`` are sorted, so ``searchsorted(keys, g + u)`` lands in group g for u in [0, 1).
    Every group 0..n_groups-1 must be non-empty.
    """

    def __init__(self, group: np.ndarray, weight: np.ndarray, n_groups: int):
        order = np.lexsort((np.arange(len(group)), group))
        g, w = group[order], weight[order]
        counts = np.bincount(g, minlength=n_groups)
        if (counts == 0).any():
            raise ValueError(f"empty groups: {np.flatnonzero(counts == 0)[:10]}")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        cum = np.cumsum(w)
        base = np.repeat(cum[starts] - w[starts], counts)  # cumulative weight before each group
        total = np.repeat(np.add.reduceat(w, starts), counts)
        within = (cum - base) / total
        self.ends = np.cumsum(counts) - 1  # last position of each group
        within[self.ends] = 1.0
        self.members, self.keys = order, g + within

    def sample(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.keys, groups + rng.random(groups.shape), side="right")
        return self.members[np.minimum(idx, self.ends[groups])]  # g + u may round up to g + 1


def _first_distinct(pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``pool``, the first ``k`` distinct values in column order, and whether the row has ``k`` of them."""
    n, m = pool.shape
    order = np.argsort(pool, axis=1, kind="stable")
    srt = np.take_along_axis(pool, order, axis=1)
    first_sorted = np.ones((n, m), dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    rank = np.cumsum(first, axis=1) - 1
    keep = first & (rank < k)
    out = np.full((n, k), -1, dtype=pool.dtype)
    rows, cols = np.nonzero(keep)
    out[rows, rank[rows, cols]] = pool[rows, cols]
    return out, first.sum(axis=1) >= k


# ------------------------------------------------------------------------------------------------------------- world


@dataclass
class _World:
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
    items_by_cat: _Grouped  # items of a category, by exposure weight
    items_by_author: _Grouped  # items of an author, by exposure weight
    queries_by_cat: _Grouped  # queries of a category, by popularity
    items_all_cdf: np.ndarray  # (I,) cdf of exposure weights over all items


def build_world(cfg: SynthConfig, start_ms: int) -> _World:
    """Draw the static entities (categories, authors, items, queries, users, initial interests, favourites)."""
    rng = np.random.default_rng([cfg.seed, 0])
    C, A, I, Q, U = cfg.categories, cfg.authors, cfg.items, cfg.queries, cfg.users
    cat_pop = _zipf(C, cfg.category_zipf)

    author_cat = np.concatenate([np.arange(C), _choice(rng, cat_pop, A - C)])
    author_quality = rng.normal(0.0, cfg.author_quality_sd, A)
    author_pop = rng.lognormal(0.0, 1.0, A)

    item_author = np.concatenate([np.arange(A), _choice(rng, author_pop / author_pop.sum(), I - A)])
    home = rng.random(I) < cfg.author_home_prob
    home[:A] = True  # an author's first item is in its home category, so every category has items
    item_cat = np.where(home, author_cat[item_author], _choice(rng, cat_pop, I))
    item_quality = author_quality[item_author] + rng.normal(0.0, cfg.item_quality_sd, I)
    duration = np.clip(np.round(rng.lognormal(np.log(DURATION_MEDIAN_S), DURATION_LOG_SD, I)), 3, 1200)
    exposure = np.exp(0.6 * item_quality + rng.normal(0.0, 0.8, I))
    upload_ts = start_ms - 1 - rng.integers(0, 365 * MS_PER_DAY, I)

    query_cat = np.concatenate([np.arange(C), _choice(rng, cat_pop, Q - C)])
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
    city = _choice(rng, _zipf(N_CITIES, 1.0), U)
    device = 1 + _choice(rng, np.array([0.55, 0.35, 0.10]), U)

    # interests: weak N(0, .5) everywhere, 2-4 distinct strong topics ~ pop (Gumbel top-k per user)
    interest = rng.normal(0.0, 0.5, (U, C))
    n_topics = rng.integers(cfg.topics_min, cfg.topics_max + 1, U)
    gumbel_keys = np.log(cat_pop)[None, :] - np.log(-np.log(rng.random((U, C))))
    topic_rank = np.argsort(np.argsort(-gumbel_keys, axis=1), axis=1)
    strong = topic_rank < n_topics[:, None]
    interest = np.where(strong, cfg.topic_logit + rng.normal(0.0, 0.5, (U, C)), interest)

    authors_by_cat = _Grouped(author_cat, np.ones(A), C)
    p0 = _softmax(interest)
    fav_cat = np.where(
        rng.random((U, cfg.fav_authors)) < cfg.fav_in_topic,
        np.stack([_choice_rows(rng, p0) for _ in range(cfg.fav_authors)], axis=1),
        _choice(rng, cat_pop, U * cfg.fav_authors).reshape(U, cfg.fav_authors),
    )
    favs = authors_by_cat.sample(rng, fav_cat)

    return _World(
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
        items_by_cat=_Grouped(item_cat, exposure, C),
        items_by_author=_Grouped(item_author, exposure, A),
        queries_by_cat=_Grouped(query_cat, query_pop, C),
        items_all_cdf=np.cumsum(exposure) / exposure.sum(),
    )


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def drift(cfg: SynthConfig, world: _World, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One day of interest drift: a random walk of every logit plus, for a few users, a topic swap."""
    U, C = z.shape
    switch = np.flatnonzero(rng.random(U) < cfg.topic_switch_prob)
    old = _choice_rows(rng, _softmax(z[switch]))
    new = _choice(rng, world.cat_pop, len(switch))
    z = np.clip(z + rng.normal(0.0, cfg.drift_sigma, (U, C)), -4.0, 4.0)
    z_old, z_new = z[switch, old], z[switch, new]
    z[switch, old], z[switch, new] = z_new, z_old
    return z


# --------------------------------------------------------------------------------------------------------------- day


def _ms_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    hour = _choice(rng, DIURNAL / DIURNAL.sum(), n)
    return hour * MS_PER_HOUR + rng.integers(0, MS_PER_HOUR, n)


def _engagement(
    rng: np.random.Generator, world: _World, items: np.ndarray, fav: np.ndarray, interest: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """watch_time_s, finish, like of consumed ``items`` (see the module docstring)."""
    q, dur = world.item_quality[items], world.item_duration[items]
    s = _sigmoid(-0.3 + 1.2 * fav + 1.5 * interest + 0.8 * q - 0.6 * world.item_dur_z[items])
    finish = rng.random(len(items)) < s
    frac = np.where(finish, 1.0, rng.beta(1.0 + 3.0 * s, 2.0))
    watch = np.maximum(dur * frac, 0.5)
    like = rng.random(len(items)) < _sigmoid(-3.0 + 1.5 * fav + 0.8 * q + 1.2 * finish)
    return watch, finish, like


def _is_fav(world: _World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    return (world.user_favs[users] == world.item_author[items][:, None]).any(axis=1)


def _interest_events(
    cfg: SynthConfig, world: _World, pi: np.ndarray, rng: np.random.Generator, n: int, fav_share: float
) -> dict[str, np.ndarray]:
    """``n`` consumption events (search clicks or feed views) drawn from users' interests and favourite authors."""
    users = _choice(rng, world.user_activity, n)
    from_fav = rng.random(n) < fav_share
    fav_author = world.user_favs[users, rng.integers(0, cfg.fav_authors, n)]
    cat = np.where(
        rng.random(n) < cfg.event_from_interest, _choice_rows(rng, pi[users]), _choice(rng, world.cat_pop, n)
    )
    items = np.where(from_fav, world.items_by_author.sample(rng, fav_author), world.items_by_cat.sample(rng, cat))
    item_cat = world.item_cat[items]
    watch, finish, like = _engagement(rng, world, items, _is_fav(world, users, items), pi[users, item_cat])
    return {
        "user_id": users,
        "ms": _ms_of_day(rng, n),
        "query_id": world.queries_by_cat.sample(rng, item_cat),
        "item_id": items,
        "author_id": world.item_author[items],
        "category_id": item_cat,
        "watch_time_s": watch,
        "finish": finish,
        "like": like,
    }


def _candidates(
    cfg: SynthConfig, world: _World, query_cat: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(R, K) distinct items per request: on-topic with probability on_topic_candidates, by exposure weight."""
    R, K = len(query_cat), cfg.candidates
    out = np.full((R, K), -1, dtype=np.int64)
    todo = np.arange(R)  # rows still short of K distinct items
    pool = np.empty((R, 0), dtype=np.int64)  # draws so far of the rows in `todo`
    for round_ in range(20):
        # rounds 10-14 draw from all items by exposure, rounds 15+ uniformly (certain to finish: items >= K)
        n, m = len(todo), 2 * K
        on = rng.random((n, m)) < (cfg.on_topic_candidates if round_ < 10 else 0.0)
        topical = world.items_by_cat.sample(rng, np.repeat(query_cat[todo][:, None], m, axis=1))
        anywhere = np.minimum(np.searchsorted(world.items_all_cdf, rng.random((n, m)), side="right"), cfg.items - 1)
        if round_ >= 15:
            anywhere = rng.integers(0, cfg.items, (n, m))
        pool = np.concatenate([pool, np.where(on, topical, anywhere)], axis=1)
        picked, done = _first_distinct(pool, K)
        out[todo[done]] = picked[done]
        todo, pool = todo[~done], pool[~done]
        if len(todo) == 0:
            return out
    raise RuntimeError("could not draw distinct candidates")


def simulate_day(
    cfg: SynthConfig, world: _World, z: np.ndarray, day: dt.date, day_index: int, first_request_id: int
) -> dict[str, pa.Table]:
    """The three daily tables of one day, given the users' interest logits ``z`` of that day."""
    rng = np.random.default_rng([cfg.seed, 1, day_index])
    start = day_start_ms(day)
    pi = _softmax(z)
    R, K = cfg.requests_per_day, cfg.candidates

    # requests, in time order; impression times leave room for the click delay inside the day
    ms = _ms_of_day(rng, R)
    ms = np.sort(ms * (MS_PER_DAY - MAX_CLICK_DELAY_MS - 1) // MS_PER_DAY)
    users = _choice(rng, world.user_activity, R)
    from_interest = rng.random(R) < cfg.query_from_interest
    q_cat = np.where(from_interest, _choice_rows(rng, pi[users]), _choice(rng, world.cat_pop, R))
    queries = world.queries_by_cat.sample(rng, q_cat)
    q_cat = world.query_cat[queries]
    device = np.where(rng.random(R) < 0.85, world.user_device[users], rng.integers(1, 4, R))
    device = np.where(rng.random(R) < 0.02, 0, device)
    hour = ms // MS_PER_HOUR
    evening, night = hour >= 18, hour <= 5
    network = np.where(rng.random(R) < np.where(evening | night, 0.75, 0.55), 1, 2)
    network = np.where(rng.random(R) < 0.02, 0, network)

    # candidates, ranked by a noisy relevance score
    items = _candidates(cfg, world, q_cat, rng)  # (R, K)
    relevant = world.item_cat[items] == q_cat[:, None]
    score = cfg.rank_relevance * relevant + cfg.rank_quality * world.item_quality[items] + rng.normal(0, 1, (R, K))
    order = np.argsort(-score, axis=1, kind="stable")
    items, relevant = np.take_along_axis(items, order, axis=1), np.take_along_axis(relevant, order, axis=1)

    # click model (flattened: one row per impression, request-major, position-minor)
    u = np.repeat(users, K)
    it = items.ravel()
    qc = np.repeat(q_cat, K)
    pos = np.tile(np.arange(K), R)
    dev, net = np.repeat(device, K), np.repeat(network, K)
    fav = _is_fav(world, u, it)
    fav_match = fav & (world.author_cat[world.item_author[it]] == qc)
    dur_z = world.item_dur_z[it]
    # the terms, summed below in one fixed order (float addition is not associative: p_click stays bit-identical);
    # interest and favourite authors are the history-only terms (p_click_seq), the rest p_click_ns
    relevance = cfg.click_relevance * relevant.ravel()
    interest = cfg.click_interest * pi[u, qc]
    fav_in = cfg.click_fav_match * fav_match
    fav_out = cfg.click_fav_other * (fav & ~fav_match)
    position = cfg.click_position * np.log1p(pos)
    evening_t, night_t = cfg.click_evening * np.repeat(evening, K), cfg.click_night * np.repeat(night, K)
    device_t = np.asarray(cfg.click_device)[dev]
    mobile_t = np.where((dev == 1) | (dev == 2), cfg.click_mobile_duration, 0.0) * dur_z
    web_t = np.where(dev == 3, cfg.click_web_duration, 0.0) * dur_z
    cellular_t = np.where(net == 2, cfg.click_cellular_duration, 0.0) * dur_z
    quality = cfg.click_quality * world.item_quality[it]
    noise = rng.normal(0.0, cfg.click_noise, R * K)
    logit = (
        cfg.click_bias + relevance + interest + fav_in + fav_out - position + evening_t + night_t + device_t
        + mobile_t + web_t + cellular_t + quality + noise
    )
    logit_ns = (
        cfg.click_bias + relevance - position + evening_t + night_t + device_t + mobile_t + web_t + cellular_t
        + quality + noise
    )
    logit_seq = cfg.click_bias + interest + fav_in + fav_out + noise
    p_click = _sigmoid(logit).astype(np.float32)
    label = rng.random(R * K) < p_click
    watch, _, like = _engagement(rng, world, it, fav, pi[u, world.item_cat[it]])
    imp_ts = start + np.repeat(ms, K)
    impressions = {
        "request_id": first_request_id + np.repeat(np.arange(R), K),
        "user_id": u,
        "query_id": np.repeat(queries, K),
        "item_id": it,
        "position": pos,
        "ts": imp_ts,
        "device_type": dev,
        "network_type": net,
        "label": label,
        "p_click": p_click,
        "p_click_ns": _sigmoid(logit_ns).astype(np.float32),
        "p_click_seq": _sigmoid(logit_seq).astype(np.float32),
        "watch_time_s": np.where(label, watch, 0.0),
    }

    # search events: the clicks of the sample, then the extra search clicks
    c = np.flatnonzero(label)
    delay = np.minimum(2_000 + np.floor(rng.exponential(20_000, len(c))).astype(np.int64), MAX_CLICK_DELAY_MS)
    extra = _interest_events(cfg, world, pi, rng, cfg.search_events_per_day, cfg.fav_share_search)
    search = {
        "user_id": np.concatenate([u[c], extra["user_id"]]),
        "ts": np.concatenate([imp_ts[c] + delay, start + extra["ms"]]),
        "query_id": np.concatenate([impressions["query_id"][c], extra["query_id"]]),
        "item_id": np.concatenate([it[c], extra["item_id"]]),
        "author_id": np.concatenate([world.item_author[it[c]], extra["author_id"]]),
        "category_id": np.concatenate([world.item_cat[it[c]], extra["category_id"]]),
        "watch_time_s": np.concatenate([watch[c], extra["watch_time_s"]]),
        "like": np.concatenate([like[c], extra["like"]]),
    }
    feed = _interest_events(cfg, world, pi, rng, cfg.feed_events_per_day, cfg.fav_share_feed)
    feed["ts"] = start + feed.pop("ms")
    feed.pop("query_id")
    return {
        "impressions": _to_arrow("impressions", impressions),
        "search_events": _to_arrow("search_events", search, sort_by=("ts", "user_id", "item_id")),
        "feed_events": _to_arrow("feed_events", feed, sort_by=("ts", "user_id", "item_id")),
    }


def _to_arrow(name: str, cols: dict[str, np.ndarray], sort_by: tuple[str, ...] = ()) -> pa.Table:
    """Columns → a table with exactly the contract's schema (column order and types), optionally sorted."""
    schema = TABLES[name].schema
    if sort_by:
        order = np.lexsort(tuple(cols[k] for k in reversed(sort_by)))
        cols = {k: v[order] for k, v in cols.items()}
    arrays = [pa.array(np.asarray(cols[f.name]).astype(f.type.to_pandas_dtype()), type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def dimension_tables(world: _World) -> dict[str, pa.Table]:
    I, Q, U = len(world.item_author), len(world.query_cat), len(world.user_activity)
    return {
        "users": _to_arrow(
            "users",
            {
                "user_id": np.arange(U),
                "age_bucket": world.user_age,
                "gender": world.user_gender,
                "city_id": world.user_city,
            },
        ),
        "items": _to_arrow(
            "items",
            {
                "item_id": np.arange(I),
                "author_id": world.item_author,
                "category_id": world.item_cat,
                "duration_s": world.item_duration,
                "upload_ts": world.item_upload_ts,
            },
        ),
        "queries": _to_arrow(
            "queries",
            {"query_id": np.arange(Q), "category_id": world.query_cat, "n_terms": world.query_n_terms},
        ),
    }


# ------------------------------------------------------------------------------------------------------------ output


def _write_atomic(table: pa.Table, folder: str) -> str:
    """Write ``folder/part-0.parquet`` through a temporary file in the same folder and ``os.replace``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PART_FILE)
    tmp = os.path.join(folder, f".{PART_FILE}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def generate(cfg: SynthConfig, data_dir: str, end: dt.date, overwrite: bool = False) -> dict:
    """Write ``cfg.days`` days of logs ending at ``end`` (inclusive) and the dimension snapshots; return a summary.

    Refuses (``FileExistsError``) when the logs root already exists, unless ``overwrite``: then the six table folders
    are removed first, so no partition of an earlier run survives.
    """
    t0 = time.perf_counter()
    root = logs_root(data_dir)
    if os.path.exists(root):
        if not overwrite:
            raise FileExistsError(f"{root} exists; pass overwrite=True (--overwrite) to replace it")
        for name in TABLES:
            shutil.rmtree(table_dir(root, name), ignore_errors=True)
    days = window(end, cfg.days)
    world = build_world(cfg, day_start_ms(days[0]))

    rows_per_day: dict[str, dict[str, int]] = {name: {} for name in TABLES if TABLES[name].daily}
    clicks = impressions = 0
    p_sum = dict.fromkeys(GROUND_TRUTH, 0.0)
    z = world.interest0
    request_id = 0
    for i, day in enumerate(days):
        if i > 0:
            z = drift(cfg, world, z, np.random.default_rng([cfg.seed, 2, i]))
        tables = simulate_day(cfg, world, z, day, i, request_id)
        request_id += cfg.requests_per_day
        for name, table in tables.items():
            _write_atomic(table, table_dir(root, name, day))
            rows_per_day[name][day.strftime(DAY_FORMAT)] = table.num_rows
        imp = tables["impressions"]
        impressions += imp.num_rows
        clicks += int(np.asarray(imp["label"]).sum())
        for k in GROUND_TRUTH:
            p_sum[k] += float(np.asarray(imp[k], dtype=np.float64).sum())
    dims = dimension_tables(world)
    for name, table in dims.items():
        _write_atomic(table, table_dir(root, name))

    rows = {name: sum(per_day.values()) for name, per_day in rows_per_day.items()}
    rows.update({name: t.num_rows for name, t in dims.items()})
    return {
        "data_dir": data_dir,
        "root": root,
        "first_day": days[0].strftime(DAY_FORMAT),
        "end": end.strftime(DAY_FORMAT),
        "days": cfg.days,
        "seed": cfg.seed,
        "rows": rows,
        "rows_per_day": rows_per_day,
        "ctr": clicks / max(impressions, 1),
        **{f"mean_{k}": p_sum[k] / max(impressions, 1) for k in GROUND_TRUTH},
        "paths": {name: table_dir(root, name) for name in TABLES},
        "seconds": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------------------------------------------- CLI

SIZE_FLAGS = (
    "days",
    "users",
    "items",
    "authors",
    "queries",
    "categories",
    "requests_per_day",
    "candidates",
    "search_events_per_day",
    "feed_events_per_day",
    "seed",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m features.synth",
        description=(
            "Generate synthetic HyFormer interaction logs (impressions with true p_click, search and feed events, "
            "users/items/queries snapshots) in the log contract under DATA_DIR/logs/v1, and print a JSON summary. "
            "The click process (drifting interests, history-only author affinity, query relevance, position and "
            "context effects) is described in the module docstring."
        ),
    )
    parser.add_argument("--data-dir", required=True, help="output root; logs go to DATA_DIR/logs/v1/<table>/")
    parser.add_argument("--end", required=True, type=parse_day, help="last day of the window (YYYY-MM-DD, UTC)")
    parser.add_argument("--tiny", action="store_true", help="start from SynthConfig.tiny() instead of the defaults")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing logs root")
    defaults = SynthConfig()
    for name in SIZE_FLAGS:
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {getattr(defaults, name)}"
        )
    args = parser.parse_args(argv)
    base = SynthConfig.tiny() if args.tiny else defaults
    cfg = dataclasses.replace(base, **{k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None})
    try:
        summary = generate(cfg, args.data_dir, args.end, overwrite=args.overwrite)
    except FileExistsError as e:
        parser.exit(2, f"error: {e}\n")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return summary


if __name__ == "__main__":
    main()

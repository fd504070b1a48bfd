"""What the users of the synthetic logs (``features.synth``) do each day: interest drift, search requests and their
ranked candidates, clicks (through ``features.synth_clicks``), engagement, extra search clicks and feed events.

``simulate_day`` returns the columns of the day's impressions, search_events and feed_events; ``drift`` moves the
users' interests from one day to the next.

Every day t (the state carries over from day to day, so recent history is more informative than old history; the
numbers are the ``SynthConfig`` defaults, the field names in brackets)
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
- Clicks: the click model of ``features.synth_clicks`` gives each impression ``p_click`` and its label.
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

Random draws: one generator per day (``[seed, 1, day]``) for everything but drift (``[seed, 2, day]``), drawn in the
order of the code; reordering any draw changes the data of every seed.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from features.schema import MS_PER_DAY, day_start_ms
from features.synth_clicks import Shown, click_model
from features.synth_config import SynthConfig
from features.synth_sampling import choice, choice_rows, first_distinct, sigmoid, softmax
from features.synth_world import World, is_fav

MS_PER_HOUR = 3_600_000
MAX_CLICK_DELAY_MS = 180_000  # a click follows its impression by at most 3 minutes
DIURNAL = np.array([0.3] * 6 + [1.0] * 12 + [1.8] * 6)  # relative traffic per UTC hour of day


def drift(cfg: SynthConfig, world: World, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One day of interest drift: a random walk of every logit plus, for a few users, a topic swap."""
    U, C = z.shape
    switch = np.flatnonzero(rng.random(U) < cfg.topic_switch_prob)
    old = choice_rows(rng, softmax(z[switch]))
    new = choice(rng, world.cat_pop, len(switch))
    z = np.clip(z + rng.normal(0.0, cfg.drift_sigma, (U, C)), -4.0, 4.0)
    z_old, z_new = z[switch, old], z[switch, new]
    z[switch, old], z[switch, new] = z_new, z_old
    return z


def _ms_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    hour = choice(rng, DIURNAL / DIURNAL.sum(), n)
    return hour * MS_PER_HOUR + rng.integers(0, MS_PER_HOUR, n)


def _requests(cfg: SynthConfig, world: World, pi: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The day's search requests in time order: ms of day, user, query and its category, device, network, day part.

    Impression times leave room for the click delay inside the day.
    """
    R = cfg.requests_per_day
    ms = _ms_of_day(rng, R)
    ms = np.sort(ms * (MS_PER_DAY - MAX_CLICK_DELAY_MS - 1) // MS_PER_DAY)
    users = choice(rng, world.user_activity, R)
    from_interest = rng.random(R) < cfg.query_from_interest
    q_cat = np.where(from_interest, choice_rows(rng, pi[users]), choice(rng, world.cat_pop, R))
    queries = world.queries_by_cat.sample(rng, q_cat)
    device = np.where(rng.random(R) < 0.85, world.user_device[users], rng.integers(1, 4, R))
    device = np.where(rng.random(R) < 0.02, 0, device)
    hour = ms // MS_PER_HOUR
    evening, night = hour >= 18, hour <= 5
    network = np.where(rng.random(R) < np.where(evening | night, 0.75, 0.55), 1, 2)
    network = np.where(rng.random(R) < 0.02, 0, network)
    return {
        "ms": ms,
        "user": users,
        "query": queries,
        "query_cat": world.query_cat[queries],
        "device": device,
        "network": network,
        "evening": evening,
        "night": night,
    }


def _candidates(cfg: SynthConfig, world: World, query_cat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
        picked, done = first_distinct(pool, K)
        out[todo[done]] = picked[done]
        todo, pool = todo[~done], pool[~done]
        if len(todo) == 0:
            return out
    raise RuntimeError("could not draw distinct candidates")


def _ranked_candidates(
    cfg: SynthConfig, world: World, query_cat: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(R, K) candidates in the engine's order (a noisy relevance score); whether each is in the query's category."""
    items = _candidates(cfg, world, query_cat, rng)
    relevant = world.item_cat[items] == query_cat[:, None]
    score = cfg.rank_relevance * relevant + cfg.rank_quality * world.item_quality[items] + rng.normal(0, 1, items.shape)
    order = np.argsort(-score, axis=1, kind="stable")
    return np.take_along_axis(items, order, axis=1), np.take_along_axis(relevant, order, axis=1)


def _engagement(
    rng: np.random.Generator, world: World, items: np.ndarray, fav: np.ndarray, interest: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """watch_time_s, finish, like of consumed ``items`` (see the module docstring)."""
    q, dur = world.item_quality[items], world.item_duration[items]
    s = sigmoid(-0.3 + 1.2 * fav + 1.5 * interest + 0.8 * q - 0.6 * world.item_dur_z[items])
    finish = rng.random(len(items)) < s
    frac = np.where(finish, 1.0, rng.beta(1.0 + 3.0 * s, 2.0))
    watch = np.maximum(dur * frac, 0.5)
    like = rng.random(len(items)) < sigmoid(-3.0 + 1.5 * fav + 0.8 * q + 1.2 * finish)
    return watch, finish, like


def _interest_events(
    cfg: SynthConfig, world: World, pi: np.ndarray, rng: np.random.Generator, n: int, fav_share: float
) -> dict[str, np.ndarray]:
    """``n`` consumption events (search clicks or feed views) drawn from users' interests and favourite authors."""
    users = choice(rng, world.user_activity, n)
    from_fav = rng.random(n) < fav_share
    fav_author = world.user_favs[users, rng.integers(0, cfg.fav_authors, n)]
    cat = np.where(rng.random(n) < cfg.event_from_interest, choice_rows(rng, pi[users]), choice(rng, world.cat_pop, n))
    items = np.where(from_fav, world.items_by_author.sample(rng, fav_author), world.items_by_cat.sample(rng, cat))
    item_cat = world.item_cat[items]
    watch, finish, like = _engagement(rng, world, items, is_fav(world, users, items), pi[users, item_cat])
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


def simulate_day(
    cfg: SynthConfig, world: World, z: np.ndarray, day: dt.date, day_index: int, first_request_id: int
) -> dict[str, dict[str, np.ndarray]]:
    """The columns of the three daily tables of one day, given the users' interest logits ``z`` of that day."""
    rng = np.random.default_rng([cfg.seed, 1, day_index])
    start = day_start_ms(day)
    pi = softmax(z)
    R, K = cfg.requests_per_day, cfg.candidates
    req = _requests(cfg, world, pi, rng)
    items, relevant = _ranked_candidates(cfg, world, req["query_cat"], rng)  # (R, K)

    # impressions: one row per candidate, request-major, position-minor
    u, it = np.repeat(req["user"], K), items.ravel()
    fav = is_fav(world, u, it)
    shown = Shown(
        user=u,
        item=it,
        query_cat=np.repeat(req["query_cat"], K),
        relevant=relevant.ravel(),
        position=np.tile(np.arange(K), R),
        evening=np.repeat(req["evening"], K),
        night=np.repeat(req["night"], K),
        device=np.repeat(req["device"], K),
        network=np.repeat(req["network"], K),
        fav=fav,
    )
    clicks = click_model(cfg, world, pi, shown, rng)
    label = clicks["label"]
    watch, _, like = _engagement(rng, world, it, fav, pi[u, world.item_cat[it]])
    imp_ts = start + np.repeat(req["ms"], K)
    impressions = {
        "request_id": first_request_id + np.repeat(np.arange(R), K),
        "user_id": u,
        "query_id": np.repeat(req["query"], K),
        "item_id": it,
        "position": shown.position,
        "ts": imp_ts,
        "device_type": shown.device,
        "network_type": shown.network,
        **clicks,
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
    return {"impressions": impressions, "search_events": search, "feed_events": feed}

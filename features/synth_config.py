"""``SynthConfig``: every knob of the synthetic log generator (``features.synth``), in one frozen dataclass.

The numbers in the generative story (the docstrings of ``features.synth_world``, ``features.synth_behaviour`` and
``features.synth_clicks``) are these defaults; the story names each field in brackets. The sizes are also CLI flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
    # click model (logit terms; see features.synth_clicks)
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

    def scaled(self, scale: float) -> SynthConfig:
        """This config with every per-day count x ``scale`` (at least 1)."""
        per_day = [f.name for f in dataclasses.fields(self) if f.name.endswith("_per_day")]
        return dataclasses.replace(self, **{n: max(1, int(getattr(self, n) * scale)) for n in per_day})

    @staticmethod
    def demo(days: int, scale: float = 1.0, seed: int = 0) -> SynthConfig:
        """The daily workflow's small synthetic default (a few minutes end to end on 2 CPU cores): ``days`` days,
        per-day traffic x ``scale``."""
        world = SynthConfig(days=days, seed=seed, users=1000, items=3000, authors=200, queries=400)
        return dataclasses.replace(
            world, requests_per_day=120, search_events_per_day=1500, feed_events_per_day=2500
        ).scaled(scale)

    @staticmethod
    def tiny() -> SynthConfig:
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

"""The click model of the synthetic logs (``features.synth``): the true probability that an impression is clicked
(``p_click``, what the oracle AUC rests on), its two halves ``p_click_ns`` and ``p_click_seq``, and the label.

- Click model: ``p_click = sigmoid(logit)`` written to ``p_click``, ``label ~ Bernoulli(p_click)``, with (the
  history-only terms, the ones the behaviour history reveals, marked ``*``; the numbers are the ``SynthConfig``
  defaults, the field names in brackets)::

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

Shapes: N impressions, U users, C categories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.synth_config import SynthConfig
from features.synth_sampling import sigmoid
from features.synth_world import World


@dataclass(frozen=True)
class Shown:
    """The impressions of a day as the click model reads them, one row per impression."""

    user: np.ndarray  # (N,) user id
    item: np.ndarray  # (N,) item id
    query_cat: np.ndarray  # (N,) category of the request's query
    relevant: np.ndarray  # (N,) bool: the item's category is the query's
    position: np.ndarray  # (N,) 0..candidates-1, the engine's rank
    evening: np.ndarray  # (N,) bool: the request is at 18-23 h UTC
    night: np.ndarray  # (N,) bool: the request is at 0-5 h UTC
    device: np.ndarray  # (N,) 0 unknown, 1 android, 2 ios, 3 web
    network: np.ndarray  # (N,) 0 unknown, 1 wifi, 2 cellular
    fav: np.ndarray  # (N,) bool: the item's author is one of the user's favourites


def click_model(
    cfg: SynthConfig, world: World, pi: np.ndarray, shown: Shown, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The impressions' ``label`` and float32 ``p_click``, ``p_click_ns``, ``p_click_seq``; ``pi`` (U, C) is the
    users' interest of the day. Draws the logit noise, then the labels."""
    fav_match = shown.fav & (world.author_cat[world.item_author[shown.item]] == shown.query_cat)
    dur_z = world.item_dur_z[shown.item]
    dev = shown.device
    # the terms, summed below in one fixed order (float addition is not associative: p_click stays bit-identical);
    # interest and favourite authors are the history-only terms (p_click_seq), the rest p_click_ns
    relevance = cfg.click_relevance * shown.relevant
    interest = cfg.click_interest * pi[shown.user, shown.query_cat]
    fav_in = cfg.click_fav_match * fav_match
    fav_out = cfg.click_fav_other * (shown.fav & ~fav_match)
    position = cfg.click_position * np.log1p(shown.position)
    evening, night = cfg.click_evening * shown.evening, cfg.click_night * shown.night
    device = np.asarray(cfg.click_device)[dev]
    mobile = np.where((dev == 1) | (dev == 2), cfg.click_mobile_duration, 0.0) * dur_z
    web = np.where(dev == 3, cfg.click_web_duration, 0.0) * dur_z
    cellular = np.where(shown.network == 2, cfg.click_cellular_duration, 0.0) * dur_z
    quality = cfg.click_quality * world.item_quality[shown.item]
    noise = rng.normal(0.0, cfg.click_noise, len(shown.item))
    logit = (
        cfg.click_bias
        + relevance
        + interest
        + fav_in
        + fav_out
        - position
        + evening
        + night
        + device
        + mobile
        + web
        + cellular
        + quality
        + noise
    )
    logit_ns = (
        cfg.click_bias + relevance - position + evening + night + device + mobile + web + cellular + quality + noise
    )
    logit_seq = cfg.click_bias + interest + fav_in + fav_out + noise
    p_click = sigmoid(logit).astype(np.float32)
    label = rng.random(len(p_click)) < p_click
    return {
        "label": label,
        "p_click": p_click,
        "p_click_ns": sigmoid(logit_ns).astype(np.float32),
        "p_click_seq": sigmoid(logit_seq).astype(np.float32),
    }

"""Champion / challenger: score the registered champion on the day the challenger was evaluated on, and decide.

The challenger is the model trained today; its metrics come from the training job's evaluation of the held-out
newest day. The champion (the version the registry alias ``champion`` points to) is scored on the same day's samples
by the batch-scoring job (jobs/score.py), with the feature config it was trained on and the same window of history,
and both get the same metrics (jobs/evaluate.py). ``decide`` promotes the challenger only if its query-level AUC beats
the champion's by more than ``margin``; the reason is a sentence for the logs and MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from features.build import FeatureConfig
from features.schema import parse_day
from jobs.build_features import FeatureSet, build_features
from jobs.common import log
from jobs.evaluate import metrics
from jobs.register import RegisteredModel
from jobs.score import read_scores, score, scoring_window

METRIC = "eval_query_auc"  # the paper's main offline metric (§4.1.3)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None  # None: there is no champion yet
    margin: float

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, margin: float, metric: str = METRIC
) -> Decision:
    """Promote iff there is no champion, or the challenger's ``metric`` exceeds the champion's by more than ``margin``
    (both on the same rows). A challenger whose metric is not finite is never promoted."""
    c = float(challenger.get(metric, math.nan))
    if not math.isfinite(c):
        return Decision(False, f"challenger {metric} is {c}: not comparable, champion kept", metric, c, None, margin)
    if champion is None:
        return Decision(
            True, f"no champion yet: challenger ({metric} {c:.4f}) becomes the champion", metric, c, None, margin
        )
    h = float(champion.get(metric, math.nan))
    if not math.isfinite(h):
        return Decision(
            True, f"champion {metric} is {h} on this day: challenger ({c:.4f}) promoted", metric, c, h, margin
        )
    delta = c - h
    if delta > margin:
        return Decision(
            True,
            f"challenger {metric} {c:.4f} beats champion {h:.4f} by {delta:+.4f} > margin {margin:g}: promoted",
            metric,
            c,
            h,
            margin,
        )
    return Decision(
        False,
        f"challenger {metric} {c:.4f} vs champion {h:.4f}: {delta:+.4f} is not more than margin {margin:g}; "
        "champion kept",
        metric,
        c,
        h,
        margin,
    )


def backfill_guard(
    day: str,
    champion_version: str,
    champion_date: str | None,
    challenger: Mapping[str, float],
    margin: float,
    metric: str = METRIC,
) -> Decision | None:
    """A backfill (or a ``--force``d older date): the champion was trained for a later date, so its training days
    include ``day``. Scoring it on ``day`` would measure what it memorised, and promoting the challenger would move
    the alias to a model of older data: the champion is kept, uncompared, with that reason. None when the champion's
    date is not after ``day`` (or unknown) and the comparison is fair."""
    if champion_date is None or champion_date <= day:
        return None
    c = float(challenger.get(metric, math.nan))
    return Decision(
        False,
        f"backfill: the champion (version {champion_version}, trained for {champion_date}) has trained on {day}: "
        "not compared on it, and a model of older data is not promoted; champion kept",
        metric,
        c,
        None,
        margin,
    )


def evaluate_registered(reg: RegisteredModel, data_dir: str, fs: FeatureSet, out_dir: str) -> dict[str, float]:
    """Score a registered version on the held-out (last) day of ``fs``, with its own feature config over the same
    window of days (built first when it is another feature store than ``fs``'s); returns the metrics of jobs.evaluate
    (``eval_*``) and writes the scores to ``out_dir``."""
    if reg.features and reg.features.get("vocab") != fs.cfg.vocab:  # another store: make sure its days are built too
        own = FeatureConfig(**{k: v for k, v in reg.features.items() if k != "vocab"})
        build_features(data_dir, parse_day(fs.days[-1]), len(fs.days), own)
    window = scoring_window(data_dir, reg.features or fs.cfg.to_dict(), fs.days[-1], len(fs.days))
    res = score(window, reg.model, out_dir)
    m = metrics(read_scores(res.path))
    log.info("champion %s v%s on %s: %s", reg.name, reg.version, fs.days[-1], {k: round(v, 4) for k, v in m.items()})
    return m

"""Shared fixtures: one local Ray cluster and one tiny synthetic data directory per test session."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os

import pytest

END = dt.date(2026, 11, 22)
DAYS = 5
# Tiny but with enough history per user that sequences are non-trivial.
TINY_SYNTH = dict(days=DAYS, users=60, items=300, authors=30, queries=60, requests_per_day=40, search_events_per_day=300, feed_events_per_day=400)


def _start_ray():
    from jobs.common import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster for one test module (shut down after it, so end-to-end tests can start their own)."""
    import ray

    _start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    from features.synth import SynthConfig, generate

    d = str(tmp_path_factory.mktemp("data"))
    generate(dataclasses.replace(SynthConfig(), **TINY_SYNTH), d, END)
    return d


@pytest.fixture(scope="session")
def ingested(synth_dir):
    from jobs.ingest import ingest

    _start_ray()
    return synth_dir, ingest(synth_dir, END, DAYS)


@pytest.fixture(scope="session")
def feature_set(ingested):
    from features.build import FeatureConfig
    from jobs.build_features import build_features

    data_dir, _ = ingested
    _start_ray()
    return build_features(data_dir, END, DAYS, FeatureConfig(long_len=64, search_len=16, feed_len=16, n_shards=2))

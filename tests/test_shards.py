"""features.shards: readers own disjoint slices of the users, read only their own files, and together see every
sample once; their training batches keep the workers in step and restart exactly."""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import polars as pl
import pytest

from features.materialize import Materializer
from features.shards import Samples, UserSlice, prefetched

USERS = np.arange(5_000)


@pytest.mark.parametrize(("n_shards", "world"), list(itertools.product([1, 2, 3, 4, 7], [1, 2, 3, 4, 5, 8])))
def test_slices_partition_the_users_evenly_and_touch_few_shards(n_shards, world):
    slices = [UserSlice(n_shards, r, world) for r in range(world)]
    owned = np.stack([s.owns(USERS) for s in slices])  # (world, users)
    assert (owned.sum(axis=0) == 1).all()  # every user has exactly one reader
    sizes = owned.sum(axis=1)
    assert sizes.max() - sizes.min() <= 2 * n_shards  # the same number of units each: ~1/world of the users
    # the shards a slice reads hold all its users, and its filter keeps exactly them
    frame = pl.DataFrame({"user_id": USERS})
    for s, mine in zip(slices, owned, strict=True):
        assert set(np.unique(USERS[mine] % n_shards)) <= set(s.parts())
        kept = []
        for shard in s.parts():
            rows = frame.filter(pl.col("user_id") % n_shards == shard)
            where = s.where(shard)
            kept.append(rows if where is None else rows.filter(where))
        assert sorted(pl.concat(kept)["user_id"].to_list()) == USERS[mine].tolist()
        assert len(s.parts()) <= math.ceil(n_shards / world) + 1
    # every file is read by at most two readers (whole when world divides n_shards)
    assert sum(len(s.parts()) for s in slices) <= n_shards + world - 1
    if n_shards % world == 0:
        assert all(s.where(k) is None for s in slices for k in s.parts())


def test_a_slice_must_fit_its_store():
    with pytest.raises(ValueError, match="rank"):
        UserSlice(4, rank=2, world=2)


def _rows(batches) -> pl.DataFrame:
    return pl.concat([pl.DataFrame(b) for b in batches]) if batches else pl.DataFrame()


def test_readers_see_every_sample_once_and_materialize_what_one_process_does(feature_set):
    """3 readers of a 2-shard store (so shards are split by user): their samples of the held-out day are the day's
    samples, and each reader's own events give its samples exactly the sequences the whole window's events give."""
    layout, day = feature_set.layout(), feature_set.days[-1:]
    whole = Samples(layout.pieces("samples", day))
    everything = _rows(list(whole.in_order(512))).sort("request_id", "ns_item_id")
    one_process = Materializer(feature_set.timelines(), feature_set.cfg, dedup=False)
    seen = []
    for r in range(3):
        owner = UserSlice(layout.n_shards, r, 3)
        mine = _rows(list(Samples(layout.pieces("samples", day, owner)).in_order(512)))
        assert owner.owns(mine["user_id"].to_numpy()).all()
        assert mine.group_by("request_id").agg(pl.col("user_id").n_unique()).filter(pl.col("user_id") > 1).is_empty()
        batch = {c: mine[c].to_numpy() for c in mine.columns}
        own = Materializer(layout.timelines(owner), feature_set.cfg, dedup=False)(batch)
        ref = one_process(batch)
        assert own.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(own[k], ref[k], err_msg=k)
        assert (ref["len_long"] > 0).any()  # the comparison covers real sequences
        seen.append(mine)
    together = pl.concat(seen).sort("request_id", "ns_item_id")
    assert together.equals(everything)
    assert Samples(layout.pieces("samples", day)).count()[0] == len(everything)


def test_training_batches_keep_readers_in_step_cover_every_row_and_resume_exactly(feature_set):
    layout, days = feature_set.layout(), feature_set.days[:-1]
    readers = [Samples(layout.pieces("samples", days, UserSlice(layout.n_shards, r, 3))) for r in range(3)]
    counts = [r.count() for r in readers]
    most, batch_size = max(c[0] for c in counts), 100
    assert sum(c[0] for c in counts) == Samples(layout.pieces("samples", days)).count()[0]
    assert sum(c[1] for c in counts) == pytest.approx(Samples(layout.pieces("samples", days)).count()[1])
    for rank, (reader, (rows, _)) in enumerate(zip(readers, counts, strict=True)):
        epoch = list(reader.batches(batch_size, most, seed=(0, 1, rank)))
        assert len(epoch) == math.ceil(most / batch_size)  # every reader: the same number of steps
        assert [len(b["label"]) for b in epoch[:-1]] == [batch_size] * (len(epoch) - 1)
        out = _rows(epoch)
        assert out.height == most
        keys = out.select("request_id", "ns_item_id")
        assert keys.unique().height == rows  # every own row at least once; a smaller reader repeats some
        again = list(reader.batches(batch_size, most, seed=(0, 1, rank)))
        assert all(_rows([a]).equals(_rows([b])) for a, b in zip(epoch, again, strict=True))  # same seed, same order
        resumed = list(reader.batches(batch_size, most, seed=(0, 1, rank), skip=3))
        assert len(resumed) == len(epoch) - 3 and _rows(resumed).equals(_rows(epoch[3:]))
        other = _rows(list(reader.batches(batch_size, most, seed=(0, 2, rank))))
        assert not other.equals(out)  # another epoch, another order; the same rows (repeats may differ)
        assert other.unique().sort(out.columns).equals(out.unique().sort(out.columns))


def test_a_reader_without_samples_fails_clearly():
    with pytest.raises(ValueError, match="owns no samples"):
        list(Samples([]).batches(10, 5, seed=0))
    empty = pl.LazyFrame({"label": pl.Series([], dtype=pl.Float32)})
    with pytest.raises(ValueError, match="all empty"):
        list(Samples([empty]).batches(10, 5, seed=0))


def test_prefetched_yields_in_order_raises_the_producers_error_and_stops_when_dropped():
    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise RuntimeError("piece 2 unreadable")

    with pytest.raises(RuntimeError, match="piece 2"):
        list(prefetched(failing()))
    produced, gate = [], threading.Event()

    def endless():
        for i in itertools.count():
            produced.append(i)
            gate.set()
            yield i

    it = prefetched(endless(), depth=2)
    assert next(it) == 0
    it.close()  # the consumer stops: the producer stops within its put timeout
    gate.wait(1)
    n = len(produced)
    threading.Event().wait(0.5)
    assert len(produced) <= n + 1 and len(produced) < 10

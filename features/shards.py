"""Who reads what: the users of a feature window dealt out to N readers (training workers, scoring tasks), each of
which reads only its own users' samples and events from storage. The driver ships a ``Layout`` (where the files
are: each day's pointer) and a ``UserSlice`` per reader; nothing of the data passes through it.

The store is sharded by user (``user_id mod n_shards``, jobs.build_features). ``UserSlice(n_shards, rank, world)``
owns the users whose *unit* ``(user_id mod n_shards) * world + (user_id div n_shards) mod world`` lies in
``[rank * n_shards, (rank + 1) * n_shards)``: every shard is cut into ``world`` parts and the ``n_shards * world``
units are dealt out in order, so every reader gets the same number of units (~1/world of the users, whatever the
ratio of readers to shards). When ``world`` divides ``n_shards`` a reader reads whole shard files; otherwise it reads
at most ``ceil(n_shards / world) + 1`` shards per day and part and keeps its users (filter on ``user_id``), so all
readers together read each file at most twice.

A request belongs to one user, so it is whole in one slice: query-level AUC stays exact when each reader scores its
own requests and the predictions are gathered.

    layout = feature_set.layout()                                     # driver: pointers only
    own = UserSlice(n_shards, rank, world)                            # reader: its users
    timelines = layout.timelines(own)                                 # their events of the window
    train = Samples(layout.pieces("samples", days, own))              # their samples, piece by piece
    for batch in train.batches(256, total=most_rows_of_any_rank, seed=(seed, epoch, rank)): ...
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import polars as pl

from features import storage
from features.build import STREAMS
from features.materialize import Timelines

T = TypeVar("T")


@dataclass(frozen=True)
class UserSlice:
    """Reader ``rank``'s users of ``world`` readers, over a store of ``n_shards`` user shards (module docstring)."""

    n_shards: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.n_shards < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"UserSlice: need n_shards >= 1 and 0 <= rank < world, got {self}")

    def parts(self) -> dict[int, tuple[int, int]]:
        """``{shard: (lo, hi)}``: the users of ``shard`` whose part ``(user_id div n_shards) mod world`` is in
        ``[lo, hi)`` are this slice's (every shard the slice touches, in order)."""
        out: dict[int, tuple[int, int]] = {}
        for unit in range(self.rank * self.n_shards, (self.rank + 1) * self.n_shards):
            shard, part = divmod(unit, self.world)
            lo, hi = out.get(shard, (part, part))
            out[shard] = (min(lo, part), max(hi, part + 1))
        return out

    def where(self, shard: int) -> pl.Expr | None:
        """The filter keeping this slice's users of ``shard`` (None: the whole shard is the slice's)."""
        lo, hi = self.parts()[shard]
        if (lo, hi) == (0, self.world):
            return None
        part = (pl.col("user_id") // self.n_shards) % self.world
        return (part >= lo) & (part < hi)

    def owns(self, user_id: np.ndarray) -> np.ndarray:
        """Which of ``user_id`` (>= 0) are this slice's (numpy; the same rule as ``where``)."""
        user_id = np.asarray(user_id, np.int64)
        unit = (user_id % self.n_shards) * self.world + (user_id // self.n_shards) % self.world
        return (unit >= self.rank * self.n_shards) & (unit < (self.rank + 1) * self.n_shards)


@dataclass(frozen=True)
class Layout:
    """Where a window's files are: the committed pointer of each day (and of the day before the first, whose state
    the first day's sequences start from), read once by whoever plans the work (jobs.build_features.FeatureSet)."""

    root: str  # the store
    n_shards: int
    days: tuple[str, ...]  # the window, oldest first
    before: str  # the day before the first
    metas: dict[str, dict]  # day -> pointer (version, files, counts); the day before only when it is built
    streams: tuple[str, ...] = tuple(STREAMS)  # the store's event streams (FeatureConfig.streams())

    def file(self, day: str, part: str, shard: int) -> str | None:
        """One shard's file of ``part`` (``samples``, ``events/<stream>``, ``state/<stream>``) of a built day; None
        when the day or the file is not there (the state before a store's first day, an empty state shard)."""
        meta, rel = self.metas.get(day), f"{part}/shard-{shard:04d}.parquet"
        if meta is None or rel not in meta["files"]:
            return None
        return storage.join(f"{self.root}/day={day}", meta["version"], rel)

    def files(self, part: str, days: Iterable[str]) -> list[str]:
        """Every shard's file of ``part`` over ``days`` (all users)."""
        return [f for d in days for k in range(self.n_shards) if (f := self.file(d, part, k)) is not None]

    def pieces(self, part: str, days: Iterable[str], owner: UserSlice | None = None) -> list[pl.LazyFrame]:
        """Lazy scans of ``owner``'s rows of ``part`` over ``days`` (all users when None): one per day and shard
        touched, in (day, shard) order."""
        owner = owner or UserSlice(self.n_shards)
        if owner.n_shards != self.n_shards:
            raise ValueError(f"{owner} does not fit a store of {self.n_shards} shards ({self.root})")
        out = []
        for d in days:
            for shard in owner.parts():
                if (f := self.file(d, part, shard)) is not None:
                    scan = storage.scan_parquet([f])
                    where = owner.where(shard)
                    out.append(scan if where is None else scan.filter(where))
        return out

    def timelines(self, owner: UserSlice | None = None) -> Timelines:
        """``owner``'s events of the window and their state before its first day (all users when None)."""
        return Timelines.load(
            {s: _concat(self.pieces(f"events/{s}", self.days, owner)) for s in self.streams},
            {s: _concat(self.pieces(f"state/{s}", [self.before], owner)) for s in self.streams},
        )


def _concat(pieces: list[pl.LazyFrame]) -> pl.LazyFrame | None:
    return pl.concat(pieces) if pieces else None


Batch = dict[str, np.ndarray]


class Samples:
    """One reader's samples over some days, read from storage one piece (day x shard) at a time: the reader holds a
    piece and a batch, never all its rows."""

    def __init__(self, pieces: list[pl.LazyFrame]):
        self.pieces = pieces

    def count(self) -> tuple[int, float]:
        """(rows, positive labels), reading only the label column."""
        if not self.pieces:
            return 0, 0.0
        agg = [p.select(rows=pl.len(), positives=pl.col("label").cast(pl.Float64).sum()) for p in self.pieces]
        total = pl.concat(agg).sum().collect()
        return int(total["rows"][0]), float(total["positives"][0] or 0.0)

    def _read(self, i: int, seed: Any = None) -> pl.DataFrame:
        df = self.pieces[i].collect()
        df = df.drop("day") if "day" in df.columns else df  # a string column: the batches hold numbers only
        return df if seed is None else df.sample(fraction=1.0, shuffle=True, seed=_seed(seed, i))

    def batches(self, batch_size: int, total: int, seed: Any, skip: int = 0) -> Iterator[Batch]:
        """An epoch of training batches: the pieces in a random order, each one's rows shuffled, cut into batches of
        ``batch_size`` rows until ``total`` rows are out (the last batch may be short). ``total`` is the largest
        reader's row count, so every reader yields the same number of batches (collectives stay in step); a reader
        with fewer rows starts over from its first piece to make up the difference, the way torch's
        DistributedSampler pads. ``seed``: the same seed gives the same batches (a restart resumes exactly);
        ``skip``: leave out the first ``skip`` batches without handing them out."""
        if total > 0 and not self.pieces:
            raise ValueError("this reader owns no samples: fewer readers (workers), or more data")
        order = np.random.default_rng(_seed(seed, -1)).permutation(len(self.pieces))
        rows_out, have, buf, n, cycle_rows = 0, 0, [], 0, 0
        while rows_out < total:
            size = min(batch_size, total - rows_out)
            while have < size:
                if n and n % len(order) == 0:  # a full pass over the pieces: start over (padding), unless empty
                    if not cycle_rows:
                        raise ValueError("this reader's samples are all empty: no rows to train on")
                    cycle_rows = 0
                piece = self._read(int(order[n % len(order)]), seed)
                n, cycle_rows = n + 1, cycle_rows + piece.height
                if piece.height:
                    buf.append(piece)
                    have += piece.height
            rows = pl.concat(buf) if len(buf) > 1 else buf[0]
            batch, rest = rows.head(size), rows.slice(size)
            buf, have, rows_out = ([rest] if rest.height else []), rest.height, rows_out + size
            if skip:
                skip -= 1
                continue
            yield {c: batch[c].to_numpy() for c in batch.columns}

    def in_order(self, batch_size: int) -> Iterator[Batch]:
        """Every row once, piece by piece, in batches of at most ``batch_size`` (evaluation, scoring)."""
        for i in range(len(self.pieces)):
            df = self._read(i)
            for start in range(0, df.height, batch_size):
                b = df.slice(start, batch_size)
                yield {c: b[c].to_numpy() for c in b.columns}


def _seed(seed: Any, i: int) -> int:
    """A 64-bit seed from ``seed`` (an int or a tuple of ints) and a piece index."""
    parts = [int(p) % 2**32 for p in (*(seed if isinstance(seed, tuple) else (seed,)), i + 1)]
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0])


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items``, made by a background thread up to ``depth`` ahead (the next batch is built while the model trains
    on this one); an error in the producer is raised here. Stopping early (or dropping the iterator) stops it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((done, e))

    threading.Thread(target=produce, daemon=True, name="prefetch").start()
    try:
        while True:
            x, err = q.get()
            if x is done:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()

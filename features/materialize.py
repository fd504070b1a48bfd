"""Rebuild model inputs from stored samples (ordinals) and the events of the training window.

``Timelines.load(events, state)`` reads the window's events once (CSR per user, plus a (user, relevance key) view);
``Materializer`` turns a batch of samples into the model's inputs, either

* **naive**: ``seq_<s>`` (B, L_s, F) ids, most recent event first, 0-padded, and ``len_<s>`` (B,); or
* **deduplicated ID tables** (paper §3.8.1, ``dedup=True``): per event stream a table of the batch's unique events
  ``uniq_<stream>`` (U, F) (row 0 = padding) and per sequence an index matrix ``inv_<s>`` (B, L_s) into it.
  ``reconstruct`` turns that back into ``seq_<s>`` with one gather (numpy or torch, on the device).
  The long and search sequences share the search stream's table.

An "event" in the dedup table is (stored event, its age bucket ``dt`` at the sample's time): candidates of one
request, and requests close in time, share rows. This module is numpy/Polars only; it runs where the batch is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from features.build import EVENT_FIELDS, KEY_COLUMN, N_DT_BUCKETS, FeatureConfig
from features.schema import GROUND_TRUTH


def dt_bucket(now_ts: np.ndarray, ev_ts: np.ndarray) -> np.ndarray:
    """Age of an event at the sample's time: ``1 + floor(log2(1 + minutes))``, capped at N_DT_BUCKETS - 1."""
    minutes = np.maximum(now_ts - ev_ts, 0) / 60_000.0
    return np.minimum(1 + np.floor(np.log2(1 + minutes)), N_DT_BUCKETS - 1).astype(np.int64)


def find_sorted(sorted_vals: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``q`` in the sorted array ``sorted_vals`` and which of them are there (a position is clipped into
    range where not)."""
    if len(sorted_vals) == 0:
        return np.zeros(len(q), np.int64), np.zeros(len(q), bool)
    pos = np.clip(np.searchsorted(sorted_vals, q), 0, len(sorted_vals) - 1)
    return pos, sorted_vals[pos] == q


class CorruptStoreError(RuntimeError):
    """Stored ordinals and stored events disagree (a day is missing or was rebuilt without its successors)."""


@dataclass
class Stream:
    """All events of one stream in the window (every user), as numpy arrays.

    Physical rows are sorted by (user, day, within-day order): the events of user ``users[i]`` are rows
    ``start[i] : start[i] + count[i]``; ``base[i]`` is how many of the user's events precede the window (the ordinal
    of row ``start[i]``). The relevance view lists the same rows grouped by (user, key): group ``g`` is
    ``perm[g_start[g] : g_start[g] + g_count[g]]``, with ordinal offset ``g_base[g]``.
    """

    ts: np.ndarray  # (N,) int64
    fields: np.ndarray  # (N, len(EVENT_FIELDS)) int32
    users: np.ndarray  # (U,) sorted user ids
    start: np.ndarray  # (U,)
    count: np.ndarray  # (U,)
    base: np.ndarray  # (U,)
    keys: np.ndarray  # (K,) sorted relevance keys present
    perm: np.ndarray  # (N,) physical rows in (user, key, order) order
    g_code: np.ndarray  # (G,) sorted: user index * K + key index
    g_start: np.ndarray  # (G,)
    g_count: np.ndarray  # (G,)
    g_base: np.ndarray  # (G,)

    @staticmethod
    def build(events: pl.DataFrame, state: pl.DataFrame) -> Stream:
        """``events``: the window's events in day order (each day sorted by user, ts, …); ``state``: the cumulative
        (user_id, key, n) counts before the window's first day (empty at the store's first day)."""
        ev = events.with_row_index("_row").sort("user_id", "_row")  # stable: keeps (day, within-day) order per user
        users, start, count = np.unique(ev["user_id"].to_numpy(), return_index=True, return_counts=True)
        base_u = state.group_by("user_id").agg(pl.col("n").sum())
        base = (
            pl.DataFrame({"user_id": users})
            .join(base_u, on="user_id", how="left", maintain_order="left")["n"]
            .fill_null(0)
            .to_numpy()
        )
        keys = np.unique(ev["key"].to_numpy())
        uidx = np.repeat(np.arange(len(users)), count)
        kidx = np.searchsorted(keys, ev["key"].to_numpy())
        n_keys = max(len(keys), 1)
        code = uidx.astype(np.int64) * n_keys + kidx
        perm = np.argsort(code, kind="stable")
        g_code, g_start, g_count = np.unique(code[perm], return_index=True, return_counts=True)
        g_user, g_key = users[g_code // n_keys], keys[g_code % n_keys]
        g_base = (
            pl.DataFrame({"user_id": g_user, "key": g_key})
            .join(state, on=["user_id", "key"], how="left", maintain_order="left")["n"]
            .fill_null(0)
            .to_numpy()
        )
        return Stream(
            ts=ev["ts"].to_numpy(),
            fields=np.stack([ev[f].to_numpy() for f in EVENT_FIELDS], axis=1).astype(np.int32)
            if ev.height
            else np.zeros((0, len(EVENT_FIELDS)), np.int32),
            users=users,
            start=start.astype(np.int64),
            count=count.astype(np.int64),
            base=base.astype(np.int64),
            keys=keys,
            perm=perm.astype(np.int64),
            g_code=g_code,
            g_start=g_start.astype(np.int64),
            g_count=g_count.astype(np.int64),
            g_base=g_base.astype(np.int64),
        )

    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in self.__dataclass_fields__)

    def rows(
        self, user_ids: np.ndarray, hi: np.ndarray, length: int, rel_key: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Physical rows of the ``length`` events before ordinal ``hi``, most recent first, -1 padded; and lengths.

        ``rel_key`` None: the user's whole stream (long sequence); else only events of that relevance key.
        """
        if len(self.ts) == 0:  # no events in the window: every sequence is empty
            return np.full((len(user_ids), length), -1, np.int64), np.zeros(len(user_ids), np.int64)
        ui, found = find_sorted(self.users, user_ids)
        if rel_key is None:
            first, avail_max, base = self.start[ui], self.count[ui], self.base[ui]
        else:
            ki, kfound = find_sorted(self.keys, rel_key)
            gi, gfound = find_sorted(self.g_code, ui * max(len(self.keys), 1) + ki)
            found = found & kfound & gfound
            first, avail_max, base = self.g_start[gi], self.g_count[gi], self.g_base[gi]
        avail = np.where(found, hi.astype(np.int64) - base, 0)  # events of the window before the sample
        if (avail > np.where(found, avail_max, 0)).any():
            bad = int(np.argmax(avail > np.where(found, avail_max, 0)))
            raise CorruptStoreError(
                f"ordinal {int(hi[bad])} of user {int(user_ids[bad])} exceeds the stored events: rebuild the store"
            )
        lens = np.clip(avail, 0, length)
        j = np.arange(length)
        valid = j[None, :] < lens[:, None]  # (B, L)
        pos = np.where(valid, first[:, None] + avail[:, None] - 1 - j[None, :], 0)  # (B, L)
        if rel_key is not None and len(self.perm):
            pos = self.perm[pos]
        return np.where(valid, pos, -1), lens


def _field_index(fields: tuple[str, ...]) -> list[int | None]:
    return [None if f == "dt" else EVENT_FIELDS.index(f) for f in fields]


class Timelines:
    """The streams of a training window (see ``Stream``), loaded from a feature store."""

    def __init__(self, streams: dict[str, Stream]):
        self.streams = streams

    @staticmethod
    def load(events: dict[str, pl.LazyFrame | None], state: dict[str, pl.LazyFrame | None]) -> Timelines:
        """Per stream: the window's events (its days in order, oldest first) and the state of the day before the
        first (None: no events; no state before a store's first day), as lazy scans, each collected once
        (features.shards.Layout.timelines makes them, for all users or one reader's)."""
        streams = {}
        for s in events:
            ev = events[s].collect() if events.get(s) is not None else pl.DataFrame()
            st = (
                state[s].collect()
                if state.get(s) is not None
                else pl.DataFrame(schema={"user_id": pl.Int64, "key": pl.Int64, "n": pl.Int64})
            )
            streams[s] = Stream.build(ev, st)
        return Timelines(streams)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.streams.values())


ID_KEYS = ("ns_", "bag_", "seq_", "uniq_", "inv_")  # the model inputs holding ids or indices (dense_<token>: floats)


def pad_lists(values: np.ndarray, width: int) -> np.ndarray:
    """A column of id lists (None: none) -> (B, width) int64, 0-padded, each list cut to ``width``."""
    out = np.zeros((len(values), width), np.int64)
    for i, v in enumerate(values):
        if v is not None and len(v):
            v = np.asarray(v, np.int64)[:width]
            out[i, : len(v)] = v
    return out


class Materializer:
    """Samples (ordinals) -> model inputs. Callable on a dict of numpy columns (a Ray Data / iter_batches batch)."""

    def __init__(self, timelines: Timelines, cfg: FeatureConfig, dedup: bool = True):
        self.t, self.cfg, self.dedup = timelines, cfg, dedup
        # what every batch is turned into, worked out once: per token its id, float and id-list features
        kinds = {n: cfg.feature_kind(n) for names in cfg.token_groups().values() for n in names}
        self.tokens = {
            g: {k: [n for n in names if kinds[n] == k] for k in ("id", "dense", "ids")}
            for g, names in cfg.token_groups().items()
        }
        self.specs = cfg.sequence_specs()
        self.tables = cfg.seq_tables()  # sequence -> its dedup table: one per (stream, side-info fields)
        self.fidx = {n: _field_index(cfg.seq_fields_of(n)) for n in self.specs}
        # ids and table indices travel as int32, half the bytes of int64, when every id space fits (it does unless an
        # id space has 2^31 ids or more); a batch's table index is < B x sum(L) and always fits
        self.id_dtype = np.int32 if max(cfg.vocab.values(), default=0) < 2**31 else np.int64

    def _values(self, stream: Stream, rows: np.ndarray, now_ts: np.ndarray, fidx: list) -> np.ndarray:
        """(…, F) side info ``fidx`` of physical rows (>= 0) seen at ``now_ts`` (broadcast to rows' shape)."""
        if len(stream.ts) == 0:  # no events: every row is padding
            return np.zeros((*rows.shape, len(fidx)), np.int64)
        cols = [
            dt_bucket(now_ts, stream.ts[rows]) if i is None else stream.fields[rows, i].astype(np.int64) for i in fidx
        ]
        return np.stack(cols, axis=-1) if cols else np.zeros((*rows.shape, 0), np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        users, ts = batch["user_id"].astype(np.int64), batch["ts"].astype(np.int64)
        out: dict[str, np.ndarray] = {}
        for g, kind in self.tokens.items():  # ns_<token> (B, F_g) ids; dense_<token> (B, n) floats
            ids = [batch[f"ns_{n}"].astype(np.int64) for n in kind["id"]]
            out[f"ns_{g}"] = np.stack(ids, axis=1) if ids else np.zeros((len(users), 0), np.int64)
            if kind["dense"]:
                out[f"dense_{g}"] = np.stack([batch[f"dense_{n}"].astype(np.float32) for n in kind["dense"]], axis=1)
            if bags := kind["ids"]:  # bag_<token> (B, K, L): each id list padded with 0 to the token's longest max_len
                width = max(self.cfg.features[n].max_len for n in bags)
                out[f"bag_{g}"] = np.stack([pad_lists(batch[f"ns_{n}"], width) for n in bags], axis=1)
        specs = self.specs
        rows: dict[str, np.ndarray] = {}
        for name, spec in specs.items():
            key_col = KEY_COLUMN[spec.relevance]
            key = None if key_col is None else batch[key_col].astype(np.int64)
            stream = self.t.streams[spec.stream(name)]
            rows[name], lens = stream.rows(users, batch[f"{name}_hi"], spec.length, key)
            out[f"len_{name}"] = lens
        for table in dict.fromkeys(self.tables.values()):  # one dedup table per (stream, fields), in sequence order
            names = [n for n in specs if self.tables[n] == table]
            stream, fidx = self.t.streams[specs[names[0]].stream(names[0])], self.fidx[names[0]]
            if self.dedup:
                out |= self._dedup(stream, {n: rows[n] for n in names}, ts, table, fidx)
            else:
                for n in names:
                    valid = rows[n] >= 0
                    vals = self._values(stream, np.where(valid, rows[n], 0), ts[:, None], fidx)
                    out[f"seq_{n}"] = np.where(valid[..., None], vals, 0)
        out = {k: (v.astype(self.id_dtype) if k.startswith(ID_KEYS) else v) for k, v in out.items()}
        out["label"] = batch["label"].astype(np.float32)
        out["request_id"] = batch["request_id"].astype(np.int64)
        for k in GROUND_TRUTH:  # synthetic ground truth, for the oracle AUCs only; NaN where the logs have none
            p = batch.get(k)
            out[k] = np.full(len(users), np.nan, np.float32) if p is None else p.astype(np.float32)
        return out

    def _dedup(
        self, stream: Stream, rows: dict[str, np.ndarray], ts: np.ndarray, s: str, fidx: list
    ) -> dict[str, np.ndarray]:
        """One unique table ``uniq_<s>`` (side info ``fidx``) for sequences of one stream: code = row * N_DT + dt + 1
        (0 = padding)."""
        codes = {}
        for n, r in rows.items():
            valid = r >= 0
            dt = (
                dt_bucket(ts[:, None], stream.ts[np.where(valid, r, 0)])
                if len(stream.ts)
                else np.zeros(r.shape, np.int64)
            )
            codes[n] = np.where(valid, r * N_DT_BUCKETS + dt + 1, 0)
        uniq = np.unique(np.concatenate([np.zeros(1, np.int64), *(c.ravel() for c in codes.values())]))  # uniq[0] = 0
        r, d = (uniq[1:] - 1) // N_DT_BUCKETS, (uniq[1:] - 1) % N_DT_BUCKETS
        cols = [d if i is None else stream.fields[r, i].astype(np.int64) for i in fidx]
        table = np.zeros((len(uniq), len(fidx)), np.int64)
        if len(r):
            table[1:] = np.stack(cols, axis=1)
        out = {f"uniq_{s}": table}
        for n, c in codes.items():
            out[f"inv_{n}"] = np.searchsorted(uniq, c)  # (B, L) int64
        return out


def reconstruct(batch: dict, tables: Mapping[str, str]) -> dict:
    """Dedup tables -> ``seq_<s>`` (B, L, F), one gather per sequence (``tables``: sequence -> the table it indexes,
    ``FeatureConfig.seq_tables()`` or ``InputSchema.seq_table``); works on numpy arrays and torch tensors."""
    if not any(k.startswith("inv_") for k in batch):
        return batch
    out = {k: v for k, v in batch.items() if not k.startswith(("uniq_", "inv_"))}
    for n in (k.removeprefix("inv_") for k in batch if k.startswith("inv_")):
        out[f"seq_{n}"] = batch[f"uniq_{tables.get(n, n)}"][batch[f"inv_{n}"]]
    return out


def unique_ratio(batch: dict[str, np.ndarray]) -> float:
    """Rows in the dedup tables / non-padding tokens of the sequences (paper: ~25% of sequence ids are unique)."""
    tokens = sum(int((v > 0).sum()) for k, v in batch.items() if k.startswith("inv_"))
    uniq = sum(len(v) - 1 for k, v in batch.items() if k.startswith("uniq_"))
    return uniq / max(tokens, 1)

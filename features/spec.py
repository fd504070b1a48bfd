"""The feature spec: which non-sequential features make which tokens, and which behaviour sequences the model reads.

Declared in the experiment file (``features:`` of ``configs/*.yaml``, docs/features.md) and held by
``features.build.FeatureConfig``; ingest, feature building, materialisation and the model's input schema
(``jobs.train.input_schema``) are all derived from it. Without one, the paper's spec applies (``DEFAULT_TOKENS`` and
the long / search / feed trio)::

    tokens:                      # NS token (semantic group, paper §3.3.1) -> its features, built-in or declared
      user: [user_id, age_bucket, gender, city_id]
      item: [item_id, author_id, item_category, duration_b, item_len]
    features:                    # declared features: any column of impressions, users, items, queries
      item_len: {table: items, column: duration_s, kind: dense, norm: log1p}
    sequences:                   # any number, in model order
      long: {table: search_events, length: 3000, relevance: none}
      search: {table: search_events, length: 50, relevance: query}
      liked: {table: feed_events, length: 20, relevance: candidate, filter: "like = 1"}

A sequence is "the ``length`` most recent events of ``table`` before the impression (strictly earlier, the
point-in-time rule of features.build) that pass ``filter`` (a scalar SQL condition on the table's columns, checked as
mapping SQL is: features.scalar_sql) and whose relevance key equals the query's (``relevance: query``), the
candidate item's (``candidate``), or any (``none``)". The relevance key of an item or query is the store's
``FeatureConfig.relevance``: its category (default) or a key table. Sequences over the same table without a filter
share one stored event stream (named after the table: ``search``, ``feed``) and one deduplicated ID table; a filtered
sequence stores its own stream, named after the sequence.

A feature is an id (``kind: id``: bucketised into an embedding table, its ``id_space``, shared by every feature that
names it), an id list (``kind: ids``: an ``id_list`` extension column, its embeddings mean-pooled) or a float
(``kind: dense``: normalised by ``norm``); each is projected into its token with the token's other features.
``columns`` declares extension columns of the logs (``ExtraColumn``), validated at ingest and kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import sqlglot
from sqlglot import exp

from features.scalar_sql import scalar_sql
from features.schema import GROUND_TRUTH, TABLES, Column, Table

EVENT_TABLES: dict[str, str] = {"search_events": "search", "feed_events": "feed"}  # table -> its stream of all events
FEATURE_TABLES = ("impressions", "users", "items", "queries")
RELEVANCE_RULES = ("none", "query", "candidate")
# per-event side-info fields (features.build.EVENT_FIELDS, stored) and dt (its age, computed when read)
SEQ_FIELDS = ("item", "author", "category", "dt", "action", "hour", "duration")
KINDS = ("id", "dense", "ids")  # ids: a multi-valued id list (an id_list column), mean-pooled embeddings
NORMS = ("none", "log1p", "zscore")
# what happened after the impression was shown: a feature made of one would leak the label
OUTCOMES = {"impressions": ("label", "watch_time_s", *GROUND_TRUTH)}

# Built-in features (features.build.ns_columns computes them): name -> (id space, describes the candidate item).
BUILTIN: dict[str, tuple[str, bool]] = {
    "user_id": ("user", False),
    "age_bucket": ("age", False),
    "gender": ("gender", False),
    "city_id": ("city", False),
    "query_id": ("query", False),
    "query_category": ("category", False),
    "n_terms": ("n_terms", False),
    "item_id": ("item", True),
    "author_id": ("author", True),
    "item_category": ("category", True),
    "duration_b": ("duration", True),
    "position_b": ("position", False),
    "hour_b": ("hour", False),
    "device_b": ("device", False),
    "network_b": ("network", False),
    "cat_pair": ("cat_pair", False),
    "cat_match": ("cat_match", False),
    "query_item": ("query_item", False),
}
# The paper's semantic groups (§3.3.1) over the built-ins: the default tokens.
DEFAULT_TOKENS: dict[str, tuple[str, ...]] = {
    "user": ("user_id", "age_bucket", "gender", "city_id"),
    "query": ("query_id", "query_category", "n_terms"),
    "item": ("item_id", "author_id", "item_category", "duration_b"),
    "context": ("position_b", "hour_b", "device_b", "network_b"),
    "cross": ("cat_pair", "cat_match", "query_item"),
}


COLUMN_TYPES: dict[str, pa.DataType] = {
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "id_list": pa.string(),  # integer ids separated by "|" ("" for none), e.g. a video's tags: read by kind: ids
}
ID_LIST = r"(\d+(\|\d+)*)?"  # what ingest checks an id_list value against


class SpecError(ValueError):
    """A feature spec that cannot be built; the message names the token, feature or sequence and the rule, ``path``
    the key in the spec (e.g. ("sequences", "liked", "table")), for errors that point at a line of a file."""

    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.path = path


def _one_of(path: tuple, field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(f"{_where(path)}: {field}={value!r} must be one of {list(allowed)}", (*path, field))


def _where(path: tuple) -> str:
    kind = {"sequences": "sequence", "features": "feature", "tokens": "token", "columns": "column"}[path[0]]
    return f"{kind} {'.'.join(path[1:3]) if path[0] == 'columns' else repr(path[1])}"


@dataclass(frozen=True)
class ExtraColumn:
    """A column of the logs beyond the contract (features/schema.py): ingest validates it (type, null when required,
    bounds) like a contract column and keeps it in the clean table, where features can read it."""

    type: str  # one of COLUMN_TYPES
    required: bool = False  # must be present in every file and non-null
    min: float | None = None  # inclusive bounds (numbers only)
    max: float | None = None
    doc: str = ""

    def column(self, table: str, name: str) -> Column:
        path = ("columns", table, name)
        if table not in TABLES:
            raise SpecError(f"columns: {table!r} is not a table of the contract {list(TABLES)}", ("columns", table))
        if not name.isidentifier() or name.startswith("_"):
            raise SpecError(f"{_where(path)}: the name must be an identifier not starting with _", path)
        if name in TABLES[table].schema.names:
            raise SpecError(f"{_where(path)}: already a contract column of {table} (features/schema.py)", path)
        _one_of(path, "type", self.type, tuple(COLUMN_TYPES))
        numeric = self.type not in ("bool", "string", "id_list")
        if not numeric and (self.min is not None or self.max is not None):
            raise SpecError(f"{_where(path)}: bounds are for numeric types, not {self.type}", path)
        pattern = ID_LIST if self.type == "id_list" else None
        doc = self.doc or "extension column"
        return Column(name, COLUMN_TYPES[self.type], self.required, doc, self.min, self.max, pattern)


def contract(columns: Mapping[str, Mapping[str, ExtraColumn]]) -> dict[str, Table]:
    """The log contract with the declared extension columns appended to their tables."""
    out = dict(TABLES)
    for table, extra in columns.items():
        added = tuple(c.column(table, name) for name, c in extra.items())
        out[table] = dataclasses.replace(TABLES[table], columns=TABLES[table].columns + added)
    return out


@dataclass(frozen=True)
class SequenceSpec:
    """One behaviour sequence (module doc). The name is its key in ``FeatureConfig.sequences``."""

    table: str = "search_events"  # an event table (EVENT_TABLES)
    length: int = 50  # L_s, the most recent events kept (read side: changing it rebuilds nothing)
    relevance: str = "query"  # "none" | "query" | "candidate": whose relevance key an event must share
    filter: str | None = None  # scalar SQL over the table's columns, e.g. "finish = 1"; None: every event
    # side-info fields of each event (read side), a subset of SEQ_FIELDS; None: the store-wide side_info set
    fields: tuple[str, ...] | None = None

    def check(self, name: str) -> None:
        path = ("sequences", name)
        where = _where(path)
        if not name.isidentifier():
            raise SpecError(f"{where}: the name must be an identifier (it names the model's inputs)", path)
        if self.table not in EVENT_TABLES:
            raise SpecError(
                f"{where}: table {self.table!r} is not an event table; event tables: {list(EVENT_TABLES)}",
                (*path, "table"),
            )
        if not (isinstance(self.length, int) and self.length >= 1):
            raise SpecError(f"{where}: length={self.length!r} must be an int >= 1", (*path, "length"))
        _one_of(path, "relevance", self.relevance, RELEVANCE_RULES)
        if self.fields is not None:
            fields = tuple(self.fields)
            object.__setattr__(self, "fields", fields)
            if not fields or len(set(fields)) != len(fields) or any(f not in SEQ_FIELDS for f in fields):
                raise SpecError(
                    f"{where}: fields={list(fields)} must be distinct side-info fields of {list(SEQ_FIELDS)}",
                    (*path, "fields"),
                )
        if self.filter is not None:
            try:
                scalar_sql(self.filter, f"{where} filter")
            except ValueError as e:
                raise SpecError(str(e), (*path, "filter")) from None
            columns = {c.name for c in TABLES[self.table].columns}
            unknown = sorted(_filter_columns(self.filter) - columns)
            if unknown:
                raise SpecError(
                    f"{where}: filter uses {unknown}, not columns of {self.table} ({sorted(columns)})",
                    (*path, "filter"),
                )

    def stream(self, name: str) -> str:
        """The stored event stream this sequence reads: the table's, or its own when filtered."""
        return EVENT_TABLES[self.table] if self.filter is None else name


def _filter_columns(sql: str) -> set[str]:
    return {c.name for c in sqlglot.parse_one(sql).find_all(exp.Column)}


@dataclass(frozen=True)
class Feature:
    """A declared non-sequential feature: one column of an impression's row or of its user, item or query."""

    table: str  # impressions | users | items | queries (items: the candidate item's row)
    column: str  # a column of that table
    kind: str = "id"  # "id" (embedding), "ids" (an id_list column: mean-pooled embeddings) or "dense" (float)
    id_space: str | None = None  # id(s): its embedding table (default: the feature's name); a built-in's to share it
    vocab: int | None = None  # id(s): buckets incl. padding; default (id): planned from the dimension table
    norm: str = "none"  # dense: "none", "log1p" (log(1 + max(x, 0))) or "zscore" ((x - mean) / std)
    mean: float = 0.0  # zscore
    std: float = 1.0  # zscore
    max_len: int = 16  # ids: the first max_len ids of a list are kept

    def check(self, name: str, builtin_spaces: set[str], tables: Mapping[str, Table] = TABLES) -> None:
        path = ("features", name)
        where = _where(path)
        if not name.isidentifier():
            raise SpecError(f"{where}: the name must be an identifier", path)
        if name in BUILTIN:
            raise SpecError(f"{where}: the name is a built-in feature's; choose another", path)
        _one_of(path, "table", self.table, FEATURE_TABLES)
        columns = [c.name for c in tables[self.table].columns]
        if self.column not in columns:
            raise SpecError(
                f"{where}: {self.table} has no column {self.column!r} (declare an extension column under "
                f"columns.{self.table}); its columns: {columns}",
                (*path, "column"),
            )
        if self.column in OUTCOMES.get(self.table, ()):
            raise SpecError(
                f"{where}: {self.table}.{self.column} is an outcome of the impression, never a feature",
                (*path, "column"),
            )
        col = tables[self.table].column(self.column)
        number = pa.types.is_floating(col.type) or col.type == pa.bool_()
        if self.kind == "ids":
            ok = col.pattern == ID_LIST
        else:
            ok = pa.types.is_integer(col.type) or (self.kind == "dense" and number)
        if not ok and self.kind in KINDS:
            reads = {"id": "integer ids", "dense": "numbers", "ids": "an id_list extension column"}[self.kind]
            raise SpecError(
                f"{where}: {self.table}.{self.column} is {col.type}: kind {self.kind} reads {reads}", (*path, "column")
            )
        _one_of(path, "kind", self.kind, KINDS)
        if self.kind == "dense":
            _one_of(path, "norm", self.norm, NORMS)
            if self.id_space is not None or self.vocab is not None:
                raise SpecError(f"{where}: id_space and vocab are for kind: id", path)
            if self.norm == "zscore" and not self.std > 0:
                raise SpecError(f"{where}: zscore needs std > 0, got {self.std}", (*path, "std"))
            return
        if self.norm != "none":
            raise SpecError(f"{where}: norm is for kind: dense", (*path, "norm"))
        if self.kind == "ids" and not (isinstance(self.max_len, int) and self.max_len >= 1):
            raise SpecError(f"{where}: max_len={self.max_len!r} must be an int >= 1", (*path, "max_len"))
        if self.vocab is not None and not (isinstance(self.vocab, int) and self.vocab >= 2):
            raise SpecError(
                f"{where}: vocab={self.vocab!r} must be an int >= 2 (bucket 0 is padding)", (*path, "vocab")
            )
        shared = self.id_space in builtin_spaces
        if self.vocab is None and not shared and (self.table == "impressions" or self.kind == "ids"):
            raise SpecError(
                f"{where}: no vocabulary is planned for an impressions column or an id list: give vocab "
                "(buckets incl. padding) or an id_space of a built-in feature",
                path,
            )
        if shared and self.vocab is not None:
            raise SpecError(
                f"{where}: id_space {self.id_space!r} is a built-in's, whose vocabulary is planned; drop vocab",
                (*path, "vocab"),
            )

    def space(self, name: str) -> str:
        return self.id_space or name


def as_specs(value: Mapping | None, cls: type) -> dict | None:
    """A mapping of names to ``cls`` instances or to their fields (JSON / YAML), as a dict of instances."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise SpecError(f"expected a mapping of names to {cls.__name__} fields, got {type(value).__name__}")
    return {k: v if isinstance(v, cls) else cls(**v) for k, v in value.items()}


def check_spec(
    tokens: Mapping[str, tuple[str, ...]],
    features: Mapping[str, Feature],
    sequences: Mapping[str, SequenceSpec],
    tables: Mapping[str, Table] = TABLES,
) -> None:
    """Every rule of the spec that spans its parts (each part checks its own): known features and columns (of the
    contract ``tables``, extension columns included), distinct names."""
    spaces = {sp for sp, _ in BUILTIN.values()}
    for name, f in features.items():
        f.check(name, spaces, tables)
    if not tokens:
        raise SpecError("tokens: needs at least one token (NS group)", ("tokens",))
    for group, names in tokens.items():
        path = ("tokens", group)
        if not (isinstance(group, str) and group.isidentifier()):
            raise SpecError(f"token {group!r}: the name must be an identifier", path)
        if not names:
            raise SpecError(f"token {group!r} has no features", path)
        for n in names:
            if n not in BUILTIN and n not in features:
                raise SpecError(
                    f"token {group!r}: unknown feature {n!r}; built-in: {list(BUILTIN)}; declared: {list(features)}",
                    path,
                )
    if not sequences:
        raise SpecError("sequences: needs at least one sequence", ("sequences",))
    streams = set(EVENT_TABLES.values())
    for name, s in sequences.items():
        s.check(name)
        if s.filter is not None and name in streams:
            raise SpecError(
                f"sequence {name!r}: a filtered sequence may not be named like a stream {sorted(streams)}",
                ("sequences", name),
            )


QUERY_BUILTINS = ("query_id", "query_category", "n_terms", "cat_pair", "cat_match", "query_item")
CORE_TABLES = ("impressions", "users", "items")  # every spec reads them


def needs_queries(
    tokens: Mapping[str, tuple[str, ...]], features: Mapping[str, Feature], sequences: Mapping[str, SequenceSpec]
) -> bool:
    """Does the spec read the queries table (a query feature, or a sequence relevant to the query)?"""
    used = {n for names in tokens.values() for n in names}
    return (
        bool(used & set(QUERY_BUILTINS))
        or any(features[n].table == "queries" for n in used if n in features)
        or any(s.relevance == "query" for s in sequences.values())
    )


def candidate_feature(name: str, features: Mapping[str, Feature]) -> bool:
    """Does the feature describe the candidate item (an items column, or a built-in item feature)?"""
    return BUILTIN[name][1] if name in BUILTIN else features[name].table == "items"

"""What a model is built from: the input schema (what the data looks like) and the architecture's hyperparameters.

    InputSchema      id spaces and their vocabularies, NS groups, sequence side info and lengths, dedup tables,
                     the candidate's groups: derived from the feature set (jobs/train.model_config), never tuned
    HyFormerConfig   the architecture and its sizes, on an InputSchema; tiny() and paper() presets

Both are frozen dataclasses. Mapping fields are dicts (copied on construction; do not mutate them: build a new
config with `config.replace(...)`, which also routes schema fields into the schema). This module sits below
hyformer/layers.py, whose building blocks read the config, so that nothing in the package imports in a circle.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ATTN_IMPLS = ("reference", "sdpa")
# Sequence encoders of §3.4.1, built by layers.make_seq_encoder: (i) "transformer" (full self-attention), (ii)
# "longer" (cross-attention from the L_H most recent events to the full sequence), (iii) "swiglu" (attention-free).
SEQ_ENCODERS = ("transformer", "longer", "swiglu")
# Architectures (config.arch): "hyformer" (§3, hyformer/model.py), "two_stage" (Table 1's BaseArch: sequence
# modelling, then feature interaction), "unified" (Table 1's MTGR/OneTrans), "din" (DIN-style target attention of the
# candidate item over each sequence, a reference row every ranking engineer knows); the last three in
# hyformer/baselines.py. Build any of them with hyformer.zoo.build_model.
ARCHS = ("hyformer", "two_stage", "unified", "din")
INTERACTIONS = ("rankmixer", "transformer", "wukong")  # feature interaction of "two_stage" (Table 1)
# dense (non-embedding) weights at the start: PyTorch's defaults (U(±1/sqrt(fan_in)) for Linear) or N(0, 0.02²) with
# zero biases for every Linear and per-token FFN (BERT / GPT-2 style); RankingModel.init_dense
DENSE_INITS = ("default", "normal")
QUERY_SOURCES = ("global", "ns", "target")  # Global Info of §3.3.2 / without pooling / candidate only (Table 2)


class ConfigError(ValueError):
    """A config that cannot build a model; the message names the field and the rule."""


def _pairs(name: str, value: Any) -> dict[str, Any]:
    """A mapping, or (key, value) pairs (the JSON of configs saved before the schema was split out), as a dict."""
    if isinstance(value, Mapping):
        return dict(value)
    pairs = [tuple(p) for p in value]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"{name}={value!r} must be a mapping or (key, value) pairs")
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{name}: duplicate names in {keys} (name each once)")
    return dict(pairs)


def _check_names(what: str, names: list[str]) -> None:
    if not names:
        raise ConfigError(f"needs at least one {what}")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate {what} names in {names}")
    for n in names:
        if not (isinstance(n, str) and n.isidentifier()):
            raise ConfigError(f"{what} name {n!r} must be a Python identifier")


def _check_ints(owner: object, names: tuple[str, ...], low: int, meaning: str = "") -> None:
    for f in names:
        value = getattr(owner, f)
        if not (isinstance(value, int) and value >= low):
            raise ConfigError(f"{f}={value!r} must be an int >= {low}{meaning}")


@dataclass(frozen=True)
class InputSchema:
    """What the batches hold (hyformer/model.py's input contract), derived from the feature set.

    Example:
        InputSchema(
            id_spaces={"user_id": 1_000_000, "item": 5_000_000, "author": 100_000, "action": 8},
            ns_groups={"user": ("user_id",), "item": ("item", "author")},
            seq_fields=("item", "author", "action"),
            sequences={"long": 1000, "search": 50},
            target_groups=("item",),
        )
    """

    id_spaces: Mapping[str, int]  # name -> vocab size including padding id 0: one embedding table each
    ns_groups: Mapping[str, tuple[str, ...]]  # group -> id space of each column: one NS token per group
    seq_fields: tuple[str, ...]  # id space of each per-event side-info column, same for every sequence
    sequences: Mapping[str, int]  # sequence name -> max length L_s: one query set per sequence
    # sequence -> table: the uniq_<table> key a sequence's inv_<sequence> indexes when the batch carries
    # deduplicated ID tables; a sequence not named uses uniq_<sequence>
    seq_tables: Mapping[str, str] = field(default_factory=dict)
    target_groups: tuple[str, ...] = ()  # NS groups that describe the candidate item
    # group -> names of its float features: batch["dense_<group>"] (B, n), projected into the group's token with its
    # ids; a group may hold only floats (its ns_groups entry is then ())
    dense: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # group -> id space of each of its id-list features: batch["bag_<group>"] (B, K, L) ids, 0 = padding; each list's
    # embeddings are mean-pooled and projected into the group's token with its ids and floats
    bags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # sequence -> its own side-info fields (id spaces), for a sequence whose events carry other fields than seq_fields
    seq_side: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "id_spaces", _pairs("id_spaces", self.id_spaces))
            set_(self, "ns_groups", {g: tuple(cols) for g, cols in _pairs("ns_groups", self.ns_groups).items()})
            set_(self, "seq_fields", tuple(self.seq_fields))
            set_(self, "sequences", _pairs("sequences", self.sequences))
            set_(self, "seq_tables", _pairs("seq_tables", self.seq_tables))
            set_(self, "target_groups", tuple(self.target_groups))
            set_(self, "dense", {g: tuple(names) for g, names in _pairs("dense", self.dense).items()})
            set_(self, "bags", {g: tuple(spaces) for g, spaces in _pairs("bags", self.bags).items()})
            set_(self, "seq_side", {q: tuple(f) for q, f in _pairs("seq_side", self.seq_side).items()})
            self._validate()
        except ConfigError as e:
            raise ConfigError(f"InputSchema: {e}") from None

    def _validate(self) -> None:
        for what, names in (("id space", self.id_spaces), ("NS group", self.ns_groups), ("sequence", self.sequences)):
            _check_names(what, list(names))
        for name, vocab in self.id_spaces.items():
            if not (isinstance(vocab, int) and vocab >= 2):
                raise ConfigError(f"id space {name!r} vocab {vocab!r} must be an int >= 2 (id 0 is padding)")
        for what, extra in (("dense", self.dense), ("bags", self.bags)):
            for group, names in extra.items():
                if group not in self.ns_groups or not names:
                    raise ConfigError(f"{what} group {group!r} must be an NS group with at least one feature")
        for group, spaces in self.bags.items():
            if unknown := [sp for sp in spaces if sp not in self.id_spaces]:
                raise ConfigError(f"bags of {group!r} use unknown id spaces {unknown}")
        for group, cols in (*self.ns_groups.items(), ("seq_fields", self.seq_fields), *self.seq_side.items()):
            if not cols and not self.dense.get(group) and not self.bags.get(group):
                raise ConfigError(f"{group!r} has no columns")
            for sp in cols:
                if sp not in self.id_spaces:
                    raise ConfigError(f"{group!r} uses unknown id space {sp!r}; known: {sorted(self.id_spaces)}")
        for name, max_len in self.sequences.items():
            if not (isinstance(max_len, int) and max_len >= 1):
                raise ConfigError(f"sequence {name!r} max length {max_len!r} must be an int >= 1")
        if any(seq not in self.sequences for seq in (*self.seq_tables, *self.seq_side)):
            raise ConfigError(
                f"seq_tables={self.seq_tables!r} / seq_side={self.seq_side!r} name a sequence not in "
                f"{list(self.sequences)}"
            )
        by_table: dict[str, tuple[str, ...]] = {}
        for seq in self.sequences:
            if by_table.setdefault(self.seq_table(seq), self.fields_of(seq)) != self.fields_of(seq):
                raise ConfigError(f"sequences sharing table {self.seq_table(seq)!r} must have the same side info")
        self.check_groups("target_groups", self.target_groups)

    def check_groups(self, name: str, groups: tuple[str, ...]) -> None:
        """Fail unless `groups` are distinct NS groups of this schema."""
        if any(g not in self.ns_groups for g in groups) or len(set(groups)) != len(groups):
            raise ConfigError(f"{name}={groups!r} must name distinct NS groups of {list(self.ns_groups)}")

    def __hash__(self) -> int:  # dict fields: hash the JSON form, so equal schemas hash equal
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def n_dense(self, group: str) -> int:
        """How many float features NS group ``group`` has (``dense_<group>`` columns)."""
        return len(self.dense.get(group, ()))

    def fields_of(self, seq: str) -> tuple[str, ...]:
        """The side-info fields (id spaces) of sequence ``seq``'s events."""
        return self.seq_side.get(seq, self.seq_fields)

    def seq_table(self, seq: str) -> str:
        """The dedup table (uniq_<table>) that sequence `seq` indexes."""
        return self.seq_tables.get(seq, seq)

    @classmethod
    def tiny(cls) -> InputSchema:
        """Small vocabularies and short sequences for CPU tests: S=3 sequences, M=5 NS groups."""
        return cls(
            id_spaces={"user_id": 50, "item": 100, "author": 30, "query": 40, "context": 10, "action": 5},
            ns_groups={
                "user": ("user_id", "context"),
                "query": ("query",),
                "item": ("item", "author"),
                "context": ("context",),
                "cross": ("query", "item"),
            },
            seq_fields=("item", "author", "action"),
            sequences={"long": 16, "search": 8, "feed": 8},
            target_groups=("item",),
        )

    @classmethod
    def paper(cls) -> InputSchema:
        """The paper's shapes (§4.1): sequences long/search/feed of 3000/50/50 events with 3 side-info types
        (§4.3.2) and 13 NS groups following its user / query / document / cross families; the vocabularies are our
        guesses (the paper does not publish its feature list)."""
        big, mid, small = 1 << 20, 1 << 16, 1 << 10
        return cls(
            id_spaces={
                "user_id": big,
                "user_attr": mid,
                "query_id": big,
                "query_term": mid,
                "query_attr": small,
                "item": big,
                "author": mid,
                "item_attr": mid,
                "context": small,
                "cross": mid,
                "action": small,
            },
            ns_groups={
                "user_profile": ("user_id", "user_attr", "user_attr"),
                "user_stats": ("user_attr", "user_attr"),
                "user_interest": ("author", "item_attr"),
                "query_text": ("query_id", "query_term", "query_term"),
                "query_intent": ("query_attr", "query_attr"),
                "query_stats": ("query_attr",),
                "item_id": ("item", "author"),
                "item_content": ("item_attr", "item_attr"),
                "item_stats": ("item_attr", "item_attr"),
                "context": ("context", "context"),
                "cross_query_item": ("cross", "cross"),
                "cross_user_item": ("cross", "cross"),
                "cross_user_query": ("cross",),
            },
            seq_fields=("item", "author", "action"),
            sequences={"long": 3000, "search": 50, "feed": 50},
            target_groups=("item_id", "item_content"),
        )


SCHEMA_FIELDS = tuple(f.name for f in dataclasses.fields(InputSchema))


@dataclass(frozen=True)
class HyFormerConfig:
    """The architecture and its sizes, on an input schema. Per-sequence fields (n_queries, seq_encoder) take one
    value for every sequence or a mapping naming every sequence.

    Example:
        HyFormerConfig(
            schema=InputSchema(...),  # see InputSchema; here sequences "long" and "search", M = 2 NS groups
            d_model=64, n_heads=4,  # D must be divisible by n_heads and by T = n_queries * 2 + 2 = 4
            seq_encoder={"long": "longer", "search": "transformer"},  # or one name for every sequence
        )
    """

    schema: InputSchema  # what the batches hold
    emb_dim: int = 16  # E, width of every embedding table
    d_model: int = 64  # D, width of all tokens
    n_layers: int = 2  # HyFormer layers (each: sequence encoder layer + Query Decoding + Query Boosting)
    n_heads: int = 4  # H, heads of the cross-attention and of the sequence self-attention
    # N, queries per sequence: one number, or sequence -> N_s naming every sequence ("adaptive allocation", §4.2.2)
    n_queries: int | Mapping[str, int] = 1
    ffn_mult: int = 4  # hidden width of every FFN (encoder MLP, per-token FFN) as a multiple of D
    dropout: float = 0.0  # dropout after attention, FFNs and in the head
    # §3.4.1 sequence encoder, one of SEQ_ENCODERS: one name for every sequence, or sequence -> name for each
    seq_encoder: str | Mapping[str, str] = "transformer"
    longer_queries: int = 100  # L_H, most recent events kept as queries by each "longer" encoder layer
    attn_impl: str = "reference"  # attention kernel: "reference" (plain softmax) or "sdpa" (fused)
    head_hidden: tuple[int, ...] = (256,)  # hidden widths of the output MLP on the flattened T*D tokens
    d_seq: int = 0  # Ds, width of sequence tokens, encoders and cross-attention; 0 = d_model (§4.2.1: sequence
    #                 and interaction widths scale independently)
    # §3.3.2 query generation: Global Info from "global" (selected NS tokens + the sequence's mean pool), "ns" (no
    # pool) or "target" (only the schema's target_groups, no pool); query_groups selects NS groups (() = all);
    # query_compress > 0 maps the Global Info to that width with one shared Linear before the per-query FFNs
    query_source: str = "global"
    query_groups: tuple[str, ...] = ()
    query_compress: int = 0
    query_pool_all: bool = False  # Global Info of each sequence holds every sequence's mean pool, not only its own
    merge_sequences: bool = False  # Table 2 "Merge Seq": one merged sequence decoded by all Q queries together
    # beyond the paper: the queries of a "longer" layer decode its L_H outputs followed by the older events of its
    # input, so the first layer's queries read the full-length sequence (later layers' inputs are L_H long already)
    longer_full_kv: bool = False
    # beyond the paper: in every layer the candidate's NS tokens (target_groups) are one more query of every
    # sequence's decoder (DIN-style target attention, the decoder's own weights), the decoded values added to them
    target_attention: bool = False
    hide_sequences: bool = False  # ablation ("no-seq"): every sequence event is masked, the model sees NS tokens only
    dense_init: str = "default"  # one of DENSE_INITS, applied by hyformer.zoo.build_model
    id_dropout: float = 0.0  # training only: each NS id is replaced by 0 (missing) with this probability
    id_bias: bool = False  # a first-order term: one learned scalar per NS id added to the logit (Tokenizer.first_order)
    arch: str = "hyformer"  # one of ARCHS
    interaction: str = "rankmixer"  # one of INTERACTIONS: the feature-interaction blocks of arch="two_stage"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.schema, Mapping):
            set_(self, "schema", InputSchema(**self.schema))
        try:
            for f in ("n_queries", "seq_encoder"):
                if isinstance(getattr(self, f), (Mapping, list, tuple)):
                    set_(self, f, _pairs(f, getattr(self, f)))
            set_(self, "head_hidden", tuple(self.head_hidden))
            set_(self, "query_groups", tuple(self.query_groups))
            self._validate()
        except ConfigError as e:
            raise ConfigError(f"HyFormerConfig: {e}") from None

    def _validate(self) -> None:
        _check_ints(self, ("emb_dim", "d_model", "n_layers", "n_heads", "ffn_mult", "longer_queries"), 1)
        _check_ints(self, ("d_seq", "query_compress"), 0, " (0 = off)")
        if not all(isinstance(h, int) and h >= 1 for h in self.head_hidden):
            raise ConfigError(f"head_hidden={self.head_hidden!r} must be ints >= 1")
        for f in ("dropout", "id_dropout"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"{f}={getattr(self, f)} must be in [0, 1)")
        for f, allowed in (
            ("attn_impl", ATTN_IMPLS),
            ("arch", ARCHS),
            ("dense_init", DENSE_INITS),
            ("interaction", INTERACTIONS),
            ("query_source", QUERY_SOURCES),
        ):
            if getattr(self, f) not in allowed:
                raise ConfigError(f"{f}={getattr(self, f)!r} must be one of {allowed}")
        for w in ("d_model", "seq_width"):
            if getattr(self, w) % self.n_heads:
                raise ConfigError(f"{w}={getattr(self, w)} must be divisible by n_heads={self.n_heads}")
        self.schema.check_groups("query_groups", self.query_groups)
        for what, needs in (
            ('query_source="target"', self.query_source == "target"),
            ("target_attention=True", self.target_attention),
        ):
            if needs and not self.schema.target_groups:
                raise ConfigError(f"{what} needs target_groups (the schema's NS groups of the candidate item)")
        for seq in self.schema.sequences:
            if self.encoder_of(seq) not in SEQ_ENCODERS:
                raise ConfigError(
                    f"seq_encoder {self.encoder_of(seq)!r} (sequence {seq!r}) must be one of {SEQ_ENCODERS}"
                )
            if not (isinstance(self.queries_of(seq), int) and self.queries_of(seq) >= 1):
                raise ConfigError(f"n_queries {self.queries_of(seq)!r} (sequence {seq!r}) must be an int >= 1")
        if self.arch == "unified" and self.seq_encoder not in ("longer", "transformer"):
            raise ConfigError(
                f'arch="unified" takes seq_encoder "longer" (cross-attention only) or "transformer" (full '
                f"self-attention) for all sequences, got {self.seq_encoder!r}"
            )
        mixes = self.arch == "hyformer" or (self.arch == "two_stage" and self.interaction == "rankmixer")
        if mixes and self.d_model % self.n_tokens:
            raise ConfigError(
                f"d_model={self.d_model} must be divisible by T = Q + M = {self.n_tokens - self.n_ns} + "
                f"{self.n_ns} = {self.n_tokens} (token mixing splits D into T parts)"
            )

    def __hash__(self) -> int:  # dict fields: hash the JSON form, so equal configs hash equal
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def _of(self, name: str, seq: str) -> Any:
        """A per-sequence field's value for `seq`: the one value, or the mapping's entry (which must name every
        sequence once)."""
        value = getattr(self, name)
        if not isinstance(value, Mapping):
            return value
        seqs = list(self.schema.sequences)
        if set(value) != set(seqs):
            unknown, missing = sorted(set(value) - set(seqs)), [s for s in seqs if s not in value]
            raise ConfigError(
                f"{name} must name each sequence of {seqs} once; got {list(value)} "
                f"(unknown {unknown}, missing {missing})"
            )
        return value[seq]

    def encoder_of(self, seq: str) -> str:
        """The §3.4.1 encoder (one of SEQ_ENCODERS) of sequence `seq`."""
        return self._of("seq_encoder", seq)

    def queries_of(self, seq: str) -> int:
        """N_s, the queries of sequence `seq`."""
        return self._of("n_queries", seq)

    @property
    def seq_plan(self) -> tuple[tuple[str, int, int, str], ...]:
        """(name, max length, queries, encoder) of each sequence the layers decode. With merge_sequences one
        "merged" sequence of the summed lengths, decoded by all queries, with the first sequence's encoder."""
        plan = tuple((s, L, self.queries_of(s), self.encoder_of(s)) for s, L in self.schema.sequences.items())
        if self.merge_sequences:
            return (("merged", sum(p[1] for p in plan), sum(p[2] for p in plan), plan[0][3]),)
        return plan

    @property
    def seq_width(self) -> int:
        """Ds: d_seq, or d_model when d_seq is 0."""
        return self.d_seq or self.d_model

    @property
    def query_ns_groups(self) -> tuple[str, ...]:
        """The NS groups that enter the Global Info of query generation (feature selection)."""
        if self.query_source == "target":
            return self.schema.target_groups
        return self.query_groups or tuple(self.schema.ns_groups)

    @property
    def n_seq(self) -> int:
        """S, number of behaviour sequences."""
        return len(self.schema.sequences)

    @property
    def n_ns(self) -> int:
        """M, number of non-sequential tokens (one per NS group)."""
        return len(self.schema.ns_groups)

    @property
    def n_tokens(self) -> int:
        """T = Q + M tokens that reach the head (mixed by Query Boosting); M for arch="unified" (no queries); M + S
        for arch="din" (the NS tokens and one target-attention pooled token per sequence)."""
        if self.arch == "unified":
            return self.n_ns
        if self.arch == "din":
            return self.n_ns + len(self.seq_plan)
        return sum(p[2] for p in self.seq_plan) + self.n_ns

    def replace(self, **changes: Any) -> HyFormerConfig:
        """A copy with `changes`; InputSchema fields (e.g. sequences=...) go to the schema. Validated once."""
        schema = {k: changes.pop(k) for k in list(changes) if k in SCHEMA_FIELDS}
        if schema:
            changes["schema"] = dataclasses.replace(self.schema, **schema)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the schema nested under "schema"); from_dict turns it back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HyFormerConfig:
        """The config of a to_dict() dict. Schema fields at the top level (configs saved before the schema was split
        out, or overrides such as {"sequences": {...}}) are moved into the schema, over its own values."""
        d = dict(d)
        schema = dict(d.pop("schema", {})) | {k: d.pop(k) for k in list(d) if k in SCHEMA_FIELDS}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"HyFormerConfig: unknown fields {sorted(unknown)}")
        return cls(schema=InputSchema(**schema), **d)

    @classmethod
    def tiny(cls, **overrides: Any) -> HyFormerConfig:
        """InputSchema.tiny() (S=3, M=5) with N=1 -> T=8, D=32, for CPU tests."""
        config = cls(
            schema=InputSchema.tiny(),
            emb_dim=8,
            d_model=32,
            n_layers=2,
            n_heads=2,
            n_queries=1,
            ffn_mult=2,
            longer_queries=4,  # < every tiny sequence length, so "longer" really shortens them
            head_hidden=(32,),
        )
        return config.replace(**overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> HyFormerConfig:
        """The shapes the paper gives (§4.1, InputSchema.paper()): one global query per sequence and 13 NS tokens
        -> T = 16 mixer tokens. The paper does not publish its widths or depth: they are our guesses.

        Widths: D = 832 for the tokens, queries and mixer and Ds = 128 for the sequence side (§4.2.1: HyFormer
        "allows independent adjustment of ... sequence modeling layers and dimensions"). With them HyFormer has
        404M dense parameters (paper 418M) and LONGER + RankMixer 381M (paper 386M), and HyFormer's forward pass
        over a batch of 2048 costs 3.3 TFLOPs (`python -m hyformer.profile`; docs/architectures.md compares every
        row with the paper).

        Sequence encoders: the paper names the three options of §3.4.1 but not which one each sequence uses, nor
        L_H. §3.4.1 (ii) introduces LONGER-style encoding "for long sequences", so the long sequence uses "longer"
        with L_H = 100 (our guess; the paper says L_H << L_S) and the 50-event search and feed sequences the Full
        Transformer.
        """
        config = cls(
            schema=InputSchema.paper(),
            emb_dim=32,
            d_model=832,  # divisible by T = 16 and by n_heads
            d_seq=128,
            n_layers=4,
            n_heads=8,
            n_queries=1,
            ffn_mult=4,
            seq_encoder={"long": "longer", "search": "transformer", "feed": "transformer"},  # §3.4.1, see above
            longer_queries=100,
            head_hidden=(1024, 256),
        )
        return config.replace(**overrides)

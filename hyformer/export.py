"""One request's scoring as a standalone graph: `torch.export` of "score M candidates against one user's sequences".

A ranking server calls the model once per request: one user's behaviour sequences and the M candidates to rank. With
KV reuse (paper §3.7, hyformer/serving.py) the sequences are encoded once and every candidate is decoded against that
memory, so the graph a server runs is `RequestScorer.forward(request, candidates) -> logits (M,)`, with M dynamic.
`export_scorer` traces it with torch.export (no Python at serving time: the program runs from `torch.export.load`,
AOTInductor or another runtime that reads ExportedPrograms), and `save_scorer` writes the program next to a JSON input
contract, so a serving team reads what to feed without reading this code.

    RequestScorer    (request, candidates) -> logits (M,); encode once + score with KV reuse, else a forward on the
                     request repeated M times (baselines whose candidates enter the sequence side: MTGR, DIN)
    example_inputs   a valid random request and M candidates for a config (ids inside their vocabularies)
    export_scorer    torch.export.export with dynamic M (and each bag's list length), strict=False
    contract         the input contract: every key, its shape ("M" for the candidate axis), dtype and meaning
    save_scorer      scoring_graph.pt2 (torch.export.save) + scoring_graph.json (the contract)
    load_scorer      the saved program as a callable (request, candidates) -> logits

Shapes are fixed except the candidate axis M (1..max_candidates) and the list length of each bag_<group>: a request's
sequences are padded to the schema's maximum length L_s, as in training. Every row of hyformer/zoo.py exports with
attn_impl "reference" and "sdpa" and scores exactly as the eager model (checked once for all rows on tiny();
tests/test_export.py keeps HyFormer with both kernels, MTGR without KV reuse, and dense and bag inputs); nothing in
the models needed changing (their control flow depends on shapes and config only, never on values). Pure PyTorch.

The loaded program is an FX module: it runs the recorded aten ops one by one from Python, unfused. For a faster
server compile it (torch._inductor.aoti_compile_and_package) from the same ExportedProgram.

Shape notation as in hyformer/model.py; M here is the candidates of one request (model.py's B with R = 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hyformer.config import HyFormerConfig
from hyformer.model import RankingModel
from hyformer.serving import supports_kv_reuse
from hyformer.testing import make_batch
from hyformer.zoo import MODELS

GRAPH_FILE = "scoring_graph.pt2"
CONTRACT_FILE = "scoring_graph.json"
EXAMPLE_M = 8  # candidates in the traced example: not 0 or 1, which torch.export would specialise on
BAG_LEN = 4  # list length of every bag in example_inputs (dynamic in the exported program)
MAX_BAG_LEN = 4096  # longest id list the exported program takes


def request_keys(config: HyFormerConfig) -> list[str]:
    """The keys of `request`, in contract order: seq_<s>, len_<s> per sequence."""
    return [k for s in config.schema.sequences for k in (f"seq_{s}", f"len_{s}")]


def candidate_keys(config: HyFormerConfig) -> list[str]:
    """The keys of `candidates`, in contract order: ns_<g>, then dense_<g> and bag_<g> where the group has them."""
    schema = config.schema
    keys = [f"ns_{g}" for g in schema.ns_groups]
    keys += [f"dense_{g}" for g in schema.ns_groups if schema.n_dense(g)]
    return keys + [f"bag_{g}" for g in schema.ns_groups if g in schema.bags]


class RequestScorer(nn.Module):
    """Logits (M,) of one request's M candidates: `forward(request, candidates)`.

    request:    seq_<s> (1, L_s, F_s) and len_<s> (1,) of each sequence s: one user's sequences
    candidates: ns_<g> (M, F_g), dense_<g> (M, n_g), bag_<g> (M, K_g, L) of the M candidates, in any order

    With KV reuse (HyFormer, TwoStage) the sequences are encoded once and the M candidates scored against that memory;
    otherwise (Unified, DIN) the request is expanded to M rows and the model runs a forward. Either way the logits
    equal `model(batch)` on the M rows with the request's sequences repeated. The model is put in eval mode (dropout
    off); keys other than the contract's are ignored.
    """

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model.eval()
        self.kv_reuse = supports_kv_reuse(model)
        self.request_keys = request_keys(model.config)
        self.candidate_keys = candidate_keys(model.config)

    def forward(self, request: Mapping[str, Tensor], candidates: Mapping[str, Tensor]) -> Tensor:
        request = {k: request[k] for k in self.request_keys}  # (1, L_s, F_s), (1,)
        candidates = {k: candidates[k] for k in self.candidate_keys}  # (M, ...)
        if self.kv_reuse:
            memory = self.model.encode_sequences(request)  # pooled (1, S, Ds), per layer K/V (1, H, L', Ds/H)
            return self.model.score(candidates, memory)  # (M,)
        M = candidates[self.candidate_keys[0]].shape[0]
        repeated = {k: v.expand(M, *v.shape[1:]) for k, v in request.items()}  # (M, L_s, F_s), (M,): views
        return self.model(repeated | candidates)  # (M,)


def example_inputs(config: HyFormerConfig, m: int, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A valid (request, candidates) pair: m candidates' rows and one request whose sequences are about two thirds
    full (the rest padding). Ids follow hyformer.testing.make_batch: inside every id space's vocabulary, NS ids 0
    (missing) now and then, valid events >= 1, padding events 0; bags hold BAG_LEN ids per list, dense are N(0, 1)."""
    lens = {s: max(1, 2 * L // 3) for s, L in config.schema.sequences.items()}  # (1,) each: partly padded
    one = make_batch(config, 1, lens=lens, seed=seed)
    rows = make_batch(config, m, seed=seed + 1)
    request = {k: one[k] for k in request_keys(config)}  # (1, L_s, F_s), (1,)
    candidates = {k: rows[k] for k in candidate_keys(config)}  # (m, F_g), (m, n_g), (m, K_g, BAG_LEN)
    return request, candidates


def export_scorer(model: RankingModel, max_candidates: int = 4096) -> torch.export.ExportedProgram:
    """torch.export of RequestScorer(model) with the candidate axis M dynamic in [1, max_candidates] (and each bag's
    list length in [1, MAX_BAG_LEN]); every other shape is the schema's. Non-strict tracing (the Python runs as is,
    only the tensor operations are recorded), under no_grad. The model is put in eval mode.

    The example traced has M = EXAMPLE_M: torch.export specialises a dimension whose example is 0 or 1, so an
    example of 1 would fix M = 1 although the range starts at 1. The models' control flow depends on shapes and the
    config only (the empty-sequence guard of layers.attention is a tensor op, not an `if`), so one graph serves every
    M and every sequence length."""
    if max_candidates < 2:
        raise ValueError(f"max_candidates={max_candidates} must be >= 2 (M is a dynamic axis)")
    config = model.config
    scorer = RequestScorer(model)
    request, candidates = example_inputs(config, min(EXAMPLE_M, max_candidates))
    M = torch.export.Dim("M", min=1, max=max_candidates)
    bag_len = {g: torch.export.Dim(f"L_bag_{g}", min=1, max=MAX_BAG_LEN) for g in config.schema.bags}
    cand_shapes = {k: {0: M} for k in candidates}
    for g, dim in bag_len.items():
        cand_shapes[f"bag_{g}"] = {0: M, 2: dim}
    dynamic_shapes = ({k: None for k in request}, cand_shapes)
    with torch.no_grad():
        return torch.export.export(scorer, (request, candidates), dynamic_shapes=dynamic_shapes, strict=False)


def contract(config: HyFormerConfig, max_candidates: int) -> dict[str, Any]:
    """The exported program's input contract as JSON-ready data: per input key its shape (ints; "M" for the
    candidate axis; "L_bag_<g>" for a bag's list length), dtype and meaning, the output, and the model's config."""
    schema, vocab = config.schema, config.schema.id_spaces

    def columns(spaces: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{"id_space": sp, "vocab": vocab[sp]} for sp in spaces]

    request: dict[str, Any] = {}
    for s, L in schema.sequences.items():
        fields = schema.fields_of(s)
        request[f"seq_{s}"] = {
            "shape": [1, L, len(fields)],
            "dtype": "int64",
            "meaning": f"the user's {s!r} behaviour sequence: per event the ids of {list(fields)} (columns, each in "
            f"[0, vocab)), most recent event first, padded with all-zero events to L = {L}",
            "columns": columns(fields),
        }
        request[f"len_{s}"] = {
            "shape": [1],
            "dtype": "int64",
            "meaning": f"number of valid events of seq_{s}, in [0, {L}]; events at positions >= len_{s} are padding",
        }
    candidates: dict[str, Any] = {}
    for g, spaces in schema.ns_groups.items():
        candidates[f"ns_{g}"] = {
            "shape": ["M", len(spaces)],
            "dtype": "int64",
            "meaning": f"NS group {g!r} of each candidate row: ids of {list(spaces)}, each in [0, vocab), 0 = missing; "
            + (
                "the candidate item's own features"
                if g in schema.target_groups
                else "a group that describes the user, query or context holds the request's values on every row"
            ),
            "columns": columns(spaces),
        }
    for g in [g for g in schema.ns_groups if g in schema.dense]:  # candidate_keys' order
        names = schema.dense[g]
        candidates[f"dense_{g}"] = {
            "shape": ["M", len(names)],
            "dtype": "float32",
            "meaning": f"float features {list(names)} of NS group {g!r}, normalised as for training "
            "(features/build.py: log1p or z-score as declared; missing -> 0)",
            "columns": list(names),
        }
    for g in [g for g in schema.ns_groups if g in schema.bags]:
        spaces = schema.bags[g]
        candidates[f"bag_{g}"] = {
            "shape": ["M", len(spaces), f"L_bag_{g}"],
            "dtype": "int64",
            "meaning": f"id lists of NS group {g!r}: list k holds ids of id space {list(spaces)}[k] in [0, vocab), "
            f"padded with 0 to a common length L_bag_{g} >= 1 (0 = padding, mean-pooled over the non-zero ids)",
            "columns": columns(spaces),
        }
    return {
        "call": "logits = load_scorer(directory)(request, candidates)  # torch.export.load(...).module()",
        "dims": {
            "M": f"candidates of the request, 1 <= M <= {max_candidates}",
            **{
                f"L_bag_{g}": f"list length of bag_{g} (padded with 0), 1 <= L_bag_{g} <= {MAX_BAG_LEN}"
                for g in schema.bags
            },
        },
        "request": request,
        "candidates": candidates,
        "output": {
            "shape": ["M"],
            "dtype": "float32",
            "meaning": "click logit of each candidate, in the candidates' row order; sigmoid gives the probability",
        },
        "model": {
            "arch": config.arch,
            "attn_impl": config.attn_impl,
            "kv_reuse": supports_kv_reuse(MODELS[config.arch]),
            "torch": torch.__version__,
            "config": config.to_dict(),
        },
    }


def max_candidates_of(program: torch.export.ExportedProgram) -> int:
    """The upper bound of the candidate axis M that `program` was exported with (the output's length)."""
    out = next(n for n in program.graph.nodes if n.op == "output").args[0][0].meta["val"]  # (M,) logits
    M = out.shape[0]
    return int(M) if isinstance(M, int) else int(program.range_constraints[M.node.expr].upper)


def save_scorer(
    program: torch.export.ExportedProgram, config: HyFormerConfig, directory: str | Path
) -> tuple[Path, Path]:
    """Write `program` as scoring_graph.pt2 and its input contract as scoring_graph.json into `directory`; returns
    both paths. `config` is the exported model's config (its schema gives the contract's shapes and meanings)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    graph, spec = path / GRAPH_FILE, path / CONTRACT_FILE
    torch.export.save(program, graph)
    spec.write_text(json.dumps(contract(config, max_candidates_of(program)), indent=2) + "\n")
    return graph, spec


def load_scorer(directory: str | Path) -> nn.Module:
    """The program save_scorer wrote into `directory`, as a module: `scorer(request, candidates) -> logits (M,)`.

    Its inputs are exactly the contract's keys (in any order; an extra key is an error) with the contract's shapes,
    which the module checks. Its parameters are frozen (no autograd graph is built when scoring)."""
    return torch.export.load(Path(directory) / GRAPH_FILE).module().requires_grad_(False)

"""The exported scoring graph (hyformer/export.py): one request's M candidates scored by a torch.export program that
equals the eager model for any M, saved with its input contract and loaded back."""

from __future__ import annotations

import json

import pytest
import torch

from hyformer import HyFormerConfig, build_model
from hyformer.export import (
    CONTRACT_FILE,
    GRAPH_FILE,
    RequestScorer,
    contract,
    example_inputs,
    export_scorer,
    load_scorer,
    save_scorer,
)
from hyformer.testing import make_batch
from hyformer.zoo import architecture

CFG = HyFormerConfig.tiny()
# a float feature and an id list per candidate as well (as in tests/test_serving.py)
RICH = CFG.replace(dense={"item": ("length", "price"), "context": ("load",)}, bags={"item": ("author", "context")})
MAX_M = 256


def model_of(arch: str, config: HyFormerConfig = CFG, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(architecture(arch).config(config, overrides)).eval()


def repeated_batch(request: dict, candidates: dict) -> dict:
    """The M rows a plain forward scores: the candidates with the request's sequences repeated on every row."""
    M = candidates["ns_user"].shape[0]
    return {k: v.repeat(M, *[1] * (v.dim() - 1)) for k, v in request.items()} | candidates


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (a second one only adds waits, and on a busy machine many)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# one export per (arch, attn_impl, config), shared by the tests below: exporting takes seconds
@pytest.fixture(scope="module")
def exported() -> dict:
    cases = {
        "hyformer": model_of("hyformer"),  # KV reuse, attn_impl "reference"
        "hyformer-sdpa": model_of("hyformer", attn_impl="sdpa"),
        "mtgr-sdpa": model_of("mtgr-longer", attn_impl="sdpa"),  # no KV reuse: request expanded to M rows
        "rich": model_of("hyformer", RICH),  # dense and bag inputs (bag length dynamic too)
    }
    return {name: (model, export_scorer(model, max_candidates=MAX_M)) for name, model in cases.items()}


@pytest.mark.parametrize(
    ("arch", "kv_reuse"), [("hyformer", True), ("longer-rankmixer", True), ("mtgr-longer", False), ("din", False)]
)
def test_request_scorer_equals_the_forward_on_the_request_repeated(arch: str, kv_reuse: bool) -> None:
    model = model_of(arch, RICH)
    scorer = RequestScorer(model)
    assert scorer.kv_reuse == kv_reuse
    request, candidates = example_inputs(RICH, 7, seed=3)
    with torch.no_grad():
        logits = scorer(request, candidates | {"label": torch.zeros(7)})  # extra keys are ignored
        expected = model(repeated_batch(request, candidates))
    assert logits.shape == (7,)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_example_inputs_follow_the_schema() -> None:
    request, candidates = example_inputs(RICH, 5)
    schema, vocab = RICH.schema, RICH.schema.id_spaces
    for s, L in schema.sequences.items():
        seq, n = request[f"seq_{s}"], int(request[f"len_{s}"])
        assert seq.shape == (1, L, len(schema.fields_of(s))) and 1 <= n < L  # partly padded
        assert (seq[0, :n] >= 1).all() and (seq[0, n:] == 0).all()
        for j, sp in enumerate(schema.fields_of(s)):
            assert int(seq[..., j].max()) < vocab[sp]
    for g, spaces in schema.ns_groups.items():
        assert candidates[f"ns_{g}"].shape == (5, len(spaces))
        assert all(int(candidates[f"ns_{g}"][:, j].max()) < vocab[sp] for j, sp in enumerate(spaces))
    assert candidates["dense_item"].dtype == torch.float32 and candidates["bag_item"].shape[:2] == (5, 2)


@pytest.mark.parametrize("name", ["hyformer", "hyformer-sdpa", "mtgr-sdpa"])
@pytest.mark.parametrize("m", [1, 3, 10, 200])
def test_the_exported_program_equals_the_eager_scorer_for_any_m(exported: dict, name: str, m: int) -> None:
    model, program = exported[name]
    request, candidates = example_inputs(model.config, m, seed=m)
    with torch.no_grad():
        got = program.module()(request, candidates)
        expected = RequestScorer(model)(request, candidates)
    assert got.shape == (m,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lens", [0, 1, "full", "mixed"])
def test_the_exported_program_follows_the_request_s_sequence_lengths(exported: dict, lens) -> None:
    """Lengths are values, not shapes: empty, one event, full and mixed sequences run the same graph."""
    model, program = exported["hyformer"]
    n = {s: lens for s in CFG.schema.sequences}
    if lens == "full":
        n = dict(CFG.schema.sequences)
    elif lens == "mixed":
        n = {"long": 7, "search": 0, "feed": 8}  # part padded, empty, full
    _, candidates = example_inputs(CFG, 4)
    request = {k: v for k, v in make_batch(CFG, 1, lens=n, seed=5).items() if k.startswith(("seq_", "len_"))}
    with torch.no_grad():
        got = program.module()(request, candidates)
        torch.testing.assert_close(got, model(repeated_batch(request, candidates)), rtol=1e-5, atol=1e-5)


def test_dense_and_bag_inputs_export_with_any_bag_length(exported: dict) -> None:
    model, program = exported["rich"]
    for m, bag_len in [(1, 1), (6, 4), (33, 9)]:
        request, candidates = example_inputs(RICH, m, seed=m)
        candidates["bag_item"] = torch.randint(0, 10, (m, 2, bag_len), generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            got = program.module()(request, candidates)
            expected = model(repeated_batch(request, candidates))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_program_checks_the_shapes_it_was_exported_for(exported: dict) -> None:
    _, program = exported["hyformer"]
    scorer = program.module()
    request, candidates = example_inputs(CFG, MAX_M + 1)
    with pytest.raises(Exception, match="M|<= 256"):  # more candidates than max_candidates
        scorer(request, candidates)
    request, candidates = example_inputs(CFG, 4)
    request["seq_long"] = request["seq_long"][:, :10]  # sequences must be padded to the schema's L_s
    with pytest.raises(Exception, match="seq_long"):
        scorer(request, candidates)


def test_save_and_load_round_trip(exported: dict, tmp_path) -> None:
    model, program = exported["rich"]
    graph, spec = save_scorer(program, model.config, tmp_path)
    assert graph == tmp_path / GRAPH_FILE and spec == tmp_path / CONTRACT_FILE
    assert json.loads(spec.read_text()) == contract(model.config, MAX_M)
    scorer = load_scorer(tmp_path)
    request, candidates = example_inputs(RICH, 11, seed=2)
    with torch.no_grad():
        expected = program.module()(request, candidates)
    got = scorer(request, candidates)
    assert not got.requires_grad  # frozen for serving
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("config", [CFG, RICH], ids=["ids", "ids+dense+bags"])
def test_the_contract_lists_every_input_with_its_shape_and_dtype(config: HyFormerConfig) -> None:
    spec = json.loads(json.dumps(contract(config, MAX_M)))  # as written to scoring_graph.json
    request, candidates = example_inputs(config, 11)
    for part, inputs in (("request", request), ("candidates", candidates)):
        assert list(spec[part]) == list(inputs), part  # every key, in the order the program takes them
        for key, tensor in inputs.items():
            entry = spec[part][key]
            assert entry["dtype"] == str(tensor.dtype).removeprefix("torch."), key
            assert entry["meaning"], key
            dims = {"M": 11, **{f"L_bag_{g}": tensor.shape[-1] for g in config.schema.bags}}
            assert [dims.get(d, d) for d in entry["shape"]] == list(tensor.shape), key
            assert entry["shape"][0] == ("M" if part == "candidates" else 1)
    assert set(spec["dims"]) == {"M", *(f"L_bag_{g}" for g in config.schema.bags)}
    assert str(MAX_M) in spec["dims"]["M"]
    assert spec["output"]["shape"] == ["M"] and spec["output"]["dtype"] == "float32"
    assert spec["model"]["arch"] == "hyformer" and spec["model"]["kv_reuse"] is True
    assert HyFormerConfig.from_dict(spec["model"]["config"]) == config

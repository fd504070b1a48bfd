"""KV reuse when scoring requests (hyformer/serving.py): the same logits as a forward, fewer sequence encodings."""

from __future__ import annotations

import pytest
import torch

from hyformer import HyFormerConfig, build_model
from hyformer.serving import predict_requests
from hyformer.testing import make_batch
from hyformer.zoo import architecture

CFG = HyFormerConfig.tiny()


def request_batch(config: HyFormerConfig, sizes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of len(sizes) requests (sizes[r] candidates each), shuffled; a request's rows share its sequences."""
    B = sum(sizes)
    batch = make_batch(config, B, seed=seed)
    rid = torch.repeat_interleave(torch.arange(len(sizes)) * 7 + 100, torch.tensor(sizes))  # (B,) any id values
    first = torch.cumsum(torch.tensor(sizes), 0) - torch.tensor(sizes)
    owner = torch.repeat_interleave(first, torch.tensor(sizes))  # (B,) the row whose sequences the request uses
    for k in [k for k in batch if k.startswith(("seq_", "len_"))]:
        batch[k] = batch[k][owner]
    batch["request_id"] = rid
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    return {k: v[perm] for k, v in batch.items()}


# a schema with a float feature and an id list per candidate as well (features.spec: kind dense, kind ids)
RICH = HyFormerConfig.tiny().replace(
    dense={"item": ("length", "price"), "context": ("load",)}, bags={"item": ("author", "context")}
)


@pytest.mark.parametrize("config", [CFG, RICH], ids=["ids", "ids+dense+bags"])
def test_kv_reuse_scores_equal_the_forward_with_one_encoding_per_request(config: HyFormerConfig) -> None:
    torch.manual_seed(0)
    model = build_model(config).eval()
    batch = request_batch(config, [3, 1, 3, 2, 5, 1])
    logits, encodings = predict_requests(model, batch)
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert encodings == 6  # requests, not the 15 rows


def test_rows_of_one_request_with_different_sequences_fall_back_to_the_forward() -> None:
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    batch = request_batch(CFG, [2, 2])
    batch["request_id"] = torch.tensor([1, 1, 1, 1])  # two requests' rows under one id: sequences differ
    logits, encodings = predict_requests(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(batch))
    assert encodings == 4


@pytest.mark.parametrize(("arch", "encodings"), [("longer-rankmixer", 2), ("mtgr-longer", 5)])
def test_baselines_reuse_kv_where_their_sequence_side_allows_it(arch: str, encodings: int) -> None:
    """LONGER+RankMixer (sequences first, then interaction) encodes once per request; MTGR's unified blocks mix the
    candidate into the sequence, so they run a forward per row."""
    config = architecture(arch).config(CFG, {})
    torch.manual_seed(0)
    model = build_model(config).eval()
    batch = request_batch(config, [2, 3])
    logits, n = predict_requests(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(batch), rtol=1e-5, atol=1e-5)
    assert n == encodings

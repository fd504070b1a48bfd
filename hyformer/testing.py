"""Random valid input batches for tests and smoke runs (pure torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hyformer.config import HyFormerConfig


def make_batch(
    config: HyFormerConfig,
    batch_size: int,
    lens: Mapping[str, int | Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A batch that follows the model's input contract, plus a random "label" (B,) float column.

    lens[s] is one length for every row or one per row; sequences not in `lens` get random lengths in [0, L_s].
    NS ids are uniform over [0, vocab) (0 = missing happens); valid events have ids >= 1; padding events are 0.
    """
    g = torch.Generator().manual_seed(seed)
    schema = config.schema
    vocab = schema.id_spaces
    lens = lens or {}

    def ids(spaces: tuple[str, ...], *shape: int, low: int) -> Tensor:
        cols = [torch.randint(low, vocab[sp], shape, generator=g) for sp in spaces]
        return torch.stack(cols, dim=-1)  # (*shape, F)

    batch: dict[str, Tensor] = {}
    for group, spaces in schema.ns_groups.items():
        batch[f"ns_{group}"] = ids(spaces, batch_size, low=0) if spaces else torch.zeros(batch_size, 0).long()
    for group, names in schema.dense.items():
        batch[f"dense_{group}"] = torch.randn(batch_size, len(names), generator=g)  # (B, n_g)
    for group, spaces in schema.bags.items():
        bag = ids(spaces, batch_size, 4, low=0)  # (B, 4, K): 0 = padding happens
        batch[f"bag_{group}"] = bag.permute(0, 2, 1).contiguous()  # (B, K, 4)
    for s, max_len in schema.sequences.items():
        if s in lens:
            n = torch.as_tensor(lens[s], dtype=torch.long).expand(batch_size).clone()  # (B,)
        else:
            n = torch.randint(0, max_len + 1, (batch_size,), generator=g)  # (B,)
        if bool((n < 0).any() or (n > max_len).any()):
            raise ValueError(f"lens for {s!r} must be in [0, {max_len}], got {n.tolist()}")
        valid = torch.arange(max_len)[None, :] < n[:, None]  # (B, L)
        batch[f"seq_{s}"] = ids(schema.fields_of(s), batch_size, max_len, low=1) * valid[..., None]  # (B, L, F_e)
        batch[f"len_{s}"] = n
    batch["label"] = torch.randint(0, 2, (batch_size,), generator=g).float()
    return batch

"""HyFormer CTR model (arXiv 2601.12681) in pure PyTorch. See hyformer/model.py."""

from hyformer.model import HyFormer, HyFormerConfig

__all__ = ["HyFormer", "HyFormerConfig"]

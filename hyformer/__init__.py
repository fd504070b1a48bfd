"""HyFormer CTR model (arXiv 2601.12681) and the paper's baselines in pure PyTorch. See hyformer/model.py."""

from hyformer.model import HyFormer, HyFormerConfig
from hyformer.zoo import ARCHITECTURES, build_model, load_model

__all__ = ["ARCHITECTURES", "HyFormer", "HyFormerConfig", "build_model", "load_model"]

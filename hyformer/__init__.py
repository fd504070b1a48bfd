"""HyFormer CTR model (arXiv 2601.12681) and the paper's baselines in pure PyTorch.

config.py (InputSchema, HyFormerConfig) <- layers.py (building blocks) <- model.py (HyFormer, Figure 1)
<- baselines.py (TwoStage, Unified, DIN) <- zoo.py (every row by name; build, load). Training: training.py. Serving:
serving.py (KV reuse over a batch of requests), export.py (one request's scoring as a torch.export program).
"""

from hyformer.config import HyFormerConfig, InputSchema
from hyformer.model import HyFormer
from hyformer.zoo import ARCHITECTURES, build_model, load_model

__all__ = ["ARCHITECTURES", "HyFormer", "HyFormerConfig", "InputSchema", "build_model", "load_model"]

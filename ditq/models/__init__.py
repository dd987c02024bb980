"""Model zoo: the official DiT, the LLaMA-style Large-DiT (TerDiT), configs and weight loading."""

from ditq.models.configs import MODEL_CONFIGS, build, create
from ditq.models.dit import DiT
from ditq.models.large_dit import LargeDiT
from ditq.models.loading import load_weights

__all__ = ["DiT", "LargeDiT", "MODEL_CONFIGS", "create", "build", "load_weights"]

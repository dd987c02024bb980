"""The model zoo: name → constructor kwargs (plus ``arch``), and the two ways to build a model.

``create(name)`` builds a zoo entry; ``build(arch, config)`` rebuilds a model from the ``arch`` and
``config`` a checkpoint saved. Sizes are the papers': DiT S/B/L/XL (hidden/depth/heads 384/12/6,
768/12/12, 1024/24/16, 1152/28/16) × patch 2/4/8 at ``input_size=32`` (256 px through the SD VAE;
pass ``input_size=64`` for 512 px), Large-DiT 600M and 4.2B with TerDiT's adaLN RMSNorm, TerDiT's
released networks (``TerDiT-600M``, ``TerDiT-4.2B``: the release's key layout, `models/terdit.py`), and two
small pixel-space MNIST models (1×32×32, 10 classes) that train and sample on a CPU.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from ditq.models.dit import DiT
from ditq.models.large_dit import LargeDiT
from ditq.models.terdit import LlamaDiT

ARCHS: dict[str, type[nn.Module]] = {DiT.arch: DiT, LargeDiT.arch: LargeDiT, LlamaDiT.arch: LlamaDiT}

_DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

# Pixel-space MNIST (1×32×32 after padding, 10 digits): 8×8 tokens of 4×4 pixels, as fast to sample on a CPU
# as a real DiT can be while keeping ≥ 6 blocks and widths that every group size (32…256) divides.
_MNIST = dict(
    input_size=32, patch_size=4, in_channels=1, hidden_size=256, depth=8, num_heads=4,
    num_classes=10, learn_sigma=True, class_dropout_prob=0.1,
)  # fmt: skip

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    **{
        f"DiT-{size}/{patch}": dict(
            arch="dit", hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch
        )
        for size, (hidden, depth, heads) in _DIT_SIZES.items()
        for patch in (2, 4, 8)
    },
    "DiT-MNIST": dict(arch="dit", **_MNIST),
    "LargeDiT-600M": dict(
        arch="large_dit", hidden_size=1536, depth=16, num_heads=32, patch_size=2, adaln_norm=True
    ),
    "LargeDiT-4.2B": dict(
        arch="large_dit", hidden_size=3072, depth=32, num_heads=32, patch_size=2, adaln_norm=True
    ),
    # TerDiT's released networks (Lucky-Lance/TerDiT `DiT_Llama_600M_patch2`, `DiT_Llama_3B_patch2`); the
    # "3B" code name is the model the paper calls 4.2B. input_size=64 for the 512 px release.
    "TerDiT-600M": dict(arch="llama_dit", hidden_size=1536, depth=16, num_heads=32, patch_size=2),
    "TerDiT-4.2B": dict(arch="llama_dit", hidden_size=3072, depth=32, num_heads=32, patch_size=2),
    # multiple_of=64 keeps the SwiGLU width at 704 (not 768) so the fp16 weights stay under 20 MB.
    "LargeDiT-MNIST": dict(arch="large_dit", **_MNIST, multiple_of=64, adaln_norm=True),
}


def _constructor_kwargs(cls: type[nn.Module]) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def build(arch: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from a saved ``model.arch`` and ``model.config`` (weights are initialised
    fresh; load them afterwards). Works under ``with torch.device("meta")``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; known archs are: {sorted(ARCHS)}")
    cls = ARCHS[arch]
    allowed = _constructor_kwargs(cls)
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for arch {arch!r}; allowed keys are: {allowed}")
    return cls(**config)


def create(name: str, **overrides: Any) -> nn.Module:
    """Build zoo model ``name`` (a key of ``MODEL_CONFIGS``), with constructor kwargs overridden,
    e.g. ``create("DiT-XL/2", input_size=64)`` for 512 px or ``create("DiT-S/2", depth=2)``."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models are: {sorted(MODEL_CONFIGS)}")
    config = dict(MODEL_CONFIGS[name])
    arch = config.pop("arch")
    allowed = _constructor_kwargs(ARCHS[arch])
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown overrides {unknown} for model {name!r}; allowed keys are: {allowed}")
    return build(arch, {**config, **overrides})

"""Models that ship inside the package, and one way to open any model reference.

A model reference is a zoo name (`DiT-MNIST`, `DiT-XL/2`) or a path to a ditq checkpoint. A zoo name with
bundled weights loads them; any other zoo name is built with random weights (and says so), optionally
loaded from `weights` (an official `.pt` or a `.safetensors` state dict).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ditq import io
from ditq.models import MODEL_CONFIGS, create, load_weights

log = logging.getLogger("ditq")

BUNDLED_WEIGHTS: dict[str, str] = {"DiT-MNIST": "dit_mnist/dit_mnist_fp16.safetensors"}


def bundled_path(name: str) -> Path | None:
    """Path of the bundled checkpoint for zoo model `name`, or None when none ships."""
    rel = BUNDLED_WEIGHTS.get(name)
    if rel is None:
        return None
    path = Path(str(resources.files("ditq") / "assets" / rel))
    return path if path.is_file() else None


def open_model(
    ref: str, *, weights: str | None = None, seed: int = 0, device: str | torch.device = "cpu",
    bits: io.ServedBits | None = None,
) -> tuple[nn.Module, str]:
    """(model in eval mode with float32 tensors, a one-line description of where its weights came from).

    Checkpoints store floats in 16 bits; they are computed in float32 here (CPU has few 16-bit kernels).
    `bits` serves a nested (MatQuant) checkpoint at a width or a per-layer plan (`ditq.load`).
    """
    path = Path(ref)
    if bits is not None and ref in MODEL_CONFIGS:
        raise ValueError(f"bits serve the slices of a nested checkpoint; {ref} is a zoo model name")
    if ref not in MODEL_CONFIGS:
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a checkpoint file")
        if not path.exists():
            raise ValueError(f"{ref!r} is neither a zoo model ({', '.join(MODEL_CONFIGS)}) nor an existing "
                             "checkpoint file")
        if weights is not None:
            raise ValueError(f"weights {weights} apply to zoo models; {path} is a checkpoint with its own weights")
        served = "" if bits is None else f" served at bits {bits}"
        return io.load(path, device=device, bits=bits).float(), f"checkpoint {path}{served}"
    if weights is not None:
        with torch.device("meta"):
            model = create(ref)
        model = load_weights(model, weights).to(device).float()
        return model.eval(), f"{ref} with weights from {weights}"
    bundled = bundled_path(ref)
    if bundled is not None:
        return io.load(bundled, device=device).float(), f"{ref} (bundled trained weights)"
    torch.manual_seed(seed)
    model = create(ref).to(device)
    log.warning("%s has no trained weights here: using RANDOM weights (seed %d)", ref, seed)
    return model.eval(), f"{ref} with RANDOM weights (seed {seed}; no trained weights available)"

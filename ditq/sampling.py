"""`ditq.sample`: images from a zoo transformer (DiT, Large-DiT), full precision or quantized.

The one call that `ditq sample` and Python users sample a zoo model with. Every argument is checked before
the model runs once, so a typo never costs a sampling run. A diffusers transformer samples through its own
pipeline (`pipe.transformer = ditq.load(path)`, then `pipe(...)`): the pipeline already owns its scheduler,
VAE and conditioning, so ditq adds no second way to call it.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ditq.adapters import ADAPTERS, ZooAdapter, adapter_for
from ditq.bits_schedule import BitsSchedule
from ditq.checks import check_count
from ditq.diffusion import sample_images
from ditq.diffusion.samplers import SAMPLERS, check_steps

__all__ = ["sample"]


def sample(
    model: nn.Module,
    labels: Sequence[int] | Tensor,
    *,
    steps: int = 50,
    cfg_scale: float = 1.5,
    seed: int = 0,
    sampler: str = "ddim",
    batch_size: int | None = None,
    progress: bool = False,
    bits_schedule: BitsSchedule | Sequence | None = None,
) -> Tensor:
    """One image per class label, (N, C, H, W) in [−1, 1] on the model's device.

    `steps` respaced DDIM (or DDPM) steps of the model's 1000-step diffusion, classifier-free guidance
    `cfg_scale` (1 = off). Deterministic given `seed`: image k draws all its noise from a generator seeded
    by (seed, k), so the images depend on the seed and the labels, not on `batch_size` (None: all at once;
    up to the batch invariance of the model's own kernels). A latent model (DiT-XL/2) returns its latents,
    to be decoded by its VAE. `model` may be `torch.compile`d; it runs in eval mode under no_grad.
    `bits_schedule` serves a nested (MatQuant) model at other widths at other steps (`BitsSchedule`, or the
    list of (from, bits) pairs it takes); the model serves its own widths again afterwards.
    """
    _check_model(model)
    labels = _check_labels(labels, int(_unwrapped(model).num_classes))
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    check_count("steps", steps)
    check_steps(steps, sampler, "steps")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    check_count("seed", seed, minimum=0)
    if batch_size is not None:
        check_count("batch_size", batch_size)
    serving = contextlib.nullcontext(None)
    if bits_schedule is not None:
        schedule = bits_schedule if isinstance(bits_schedule, BitsSchedule) else BitsSchedule(bits_schedule)
        serving = schedule.serving(_unwrapped(model))  # checks every entry against the model first
    with serving as before_step:
        return sample_images(model, labels, steps=steps, sampler=sampler, cfg_scale=float(cfg_scale), seed=seed,
                             batch_size=batch_size, progress=progress, before_step=before_step)  # fmt: skip


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module `torch.compile` wrapped (its attributes are the model's), or `model` itself."""
    return getattr(model, "_orig_mod", model)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a zoo transformer), got {type(model).__name__}")
    if not isinstance(adapter_for(_unwrapped(model)), ZooAdapter):
        zoo = ", ".join(name for name, adapter in ADAPTERS.items() if isinstance(adapter, ZooAdapter))
        raise ValueError(
            f"ditq.sample draws from class-conditional zoo transformers ({zoo}); a "
            f"{type(_unwrapped(model)).__name__} is not one (a diffusers transformer samples through its "
            "pipeline: pipe.transformer = ditq.load(path), then pipe(...))"
        )


def _check_labels(labels: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """Labels as a 1-D long tensor; each an int in 0..num_classes−1 (num_classes is guidance's null class)."""
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() != 1:
            raise TypeError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        values = labels.tolist()
    else:
        if isinstance(labels, (str, bytes, Mapping)) or not isinstance(labels, Iterable):
            raise TypeError(f"labels must be a sequence of class indices (e.g. [3] for one image of class 3), "
                            f"got {labels!r}")
        values = [_class_index(v) for v in labels]
    outside = sorted({v for v in values if not 0 <= v < num_classes})
    if outside:
        raise ValueError(f"labels {outside[:5]} lie outside the model's classes 0..{num_classes - 1}")
    return torch.tensor(values, dtype=torch.long)


def _class_index(value: object) -> int:
    """An int (numpy ints too); bools and floats are refused rather than rounded."""
    if isinstance(value, bool):
        raise TypeError(f"labels must be ints (class indices), got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"labels must be ints (class indices), got {value!r}") from None

"""Classifier-free guidance and `sample_images`, the sampling loop inside ditq (`ditq.sample` checks a user's
arguments, then calls it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ditq.diffusion.losses import ModelFn
from ditq.diffusion.samplers import SAMPLERS, StepHook, create_diffusion, respacing, standard_normal


def _param_dtype(model: nn.Module) -> torch.dtype:
    """The model's parameter dtype (float32 for a parameter-free model)."""
    first = next(model.parameters(), None)
    return torch.float32 if first is None else first.dtype


def _param_device(model: nn.Module) -> torch.device:
    """The model's parameter device (CPU for a parameter-free model)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def guided(model: nn.Module, cfg_scale: float, guide_channels: int | None = None) -> ModelFn:
    """model_fn(x, t, y) that applies classifier-free guidance with scale s = `cfg_scale`.

    ε̂ = ε̂(x, ∅) + s · (ε̂(x, y) − ε̂(x, ∅)) on the first `guide_channels` output channels (default:
    all `model.in_channels` ε channels; the official DiT sampler guides only the first 3 of the 4
    latent channels, which its FID numbers depend on, so the ImageNet protocol passes 3), in one model
    call on the doubled batch [x, x] with labels [y, null], null = `model.num_classes`; the other
    channels come from the conditional half. s = 1 is the plain conditional call. Inputs are cast to
    the model's dtype and outputs back to x's, so a half-precision model can run under a float32 sampler.
    """
    channels = int(model.in_channels) if guide_channels is None else int(guide_channels)
    if not 0 < channels <= int(model.in_channels):
        raise ValueError(f"guide_channels must be in 1..{int(model.in_channels)}, got {guide_channels}")
    null_class = int(model.num_classes)
    dtype = _param_dtype(model)

    def conditional(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return model(x.to(dtype), t, y).to(x.dtype)

    if cfg_scale == 1.0:
        return conditional

    def classifier_free(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        both = model(
            torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)])
        )
        cond, uncond = both.to(x.dtype).chunk(2)  # (N, C_out, H, W) each
        eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return classifier_free


def sample_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator for sample `index` of run `seed`; (seed, index) pairs get unrelated streams.

    Seeds are mixed through numpy's SeedSequence, so neighbouring seeds or indices do not collide.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def sample_images(
    model: nn.Module,
    labels: Tensor | Sequence[int],
    *,
    steps: int = 50,
    sampler: str = "ddim",
    cfg_scale: float = 1.5,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    guide_channels: int | None = None,
    first_index: int = 0,
    before_step: StepHook | None = None,
) -> Tensor:
    """Class-conditional samples (N, C, H, W) in [−1, 1] on the model's device.

    Runs `steps` respaced steps ("ddim{steps}" for DDIM, "{steps}" for DDPM) of the model's
    1000-step diffusion with guidance `cfg_scale`. Sample k draws x_T and all later noise from its
    own generator seeded by (seed, k), so images depend on the seed but not on `batch_size` (up to
    the batch-invariance of the model's own kernels); `first_index` numbers the first sample, so a
    shard of a larger run (one rank of a data-parallel evaluation) draws the same noise as the whole
    run would. `guide_channels`: see `guided`. `before_step(step, steps)` runs before each model call of
    every batch (`GaussianDiffusion.sample`). The model runs in eval mode under no_grad; its training flag is
    restored afterwards.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    device = _param_device(model)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = labels.shape[0]
    sample_shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    if n == 0:
        return torch.empty((0, *sample_shape), device=device)

    diffusion = create_diffusion(respacing(steps, sampler), learn_sigma=model.learn_sigma)
    if first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index}")
    model_fn = guided(model, cfg_scale, guide_channels)
    batch_size = batch_size or n
    was_training = model.training
    model.eval()
    images = []
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                generators = [sample_generator(seed, first_index + k) for k in range(start, stop)]
                shape = (stop - start, *sample_shape)
                x_T = standard_normal(shape, generators, device)
                x_0 = diffusion.sample(
                    model_fn,
                    shape,
                    sampler=sampler,
                    model_kwargs={"y": labels[start:stop].to(device)},
                    noise=x_T,
                    generator=generators,
                    progress=progress,
                    before_step=before_step,
                )
                images.append(x_0.clamp(-1, 1))
    finally:
        model.train(was_training)
    return torch.cat(images)

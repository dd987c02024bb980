"""Reverse-process samplers (DDPM ancestral, DDIM) and the `GaussianDiffusion` facade.

Both samplers walk the chain indices T−1 … 0 of a (possibly respaced) schedule and call the model
with the *original* timestep of each index, so a model trained on 1000 steps samples in 50.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ditq.diffusion.losses import ModelFn, training_losses
from ditq.diffusion.schedule import (
    NoiseSchedule,
    gather,
    make_schedule,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_sample,
    split_model_output,
)

Generators = torch.Generator | Sequence[torch.Generator] | None
StepHook = Callable[[int, int], None]  # (step, steps), step 0 the noisiest: runs before that step's model call
SAMPLERS = ("ddim", "ddpm")

# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


def standard_normal(
    shape: Sequence[int],
    generator: Generators,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """N(0, I) of `shape` on `device`, drawn from one generator or from one generator per sample.

    Drawing on the generator's own device and then moving keeps a CPU generator usable for a GPU
    run. Per-sample generators make each sample's noise independent of how samples are batched.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]} samples")
    home = generators[0].device  # stack where the draws are made, then move once
    draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(home) for g in generators]
    return torch.stack(draws).to(device)


# ---------------------------------------------------------------------------------------------
# One reverse step: x_t → x_{t−1}   (x, eps, v: (N, C, H, W); i: chain index shared by the batch)
# ---------------------------------------------------------------------------------------------


def ddpm_step(
    s: NoiseSchedule,
    eps: Tensor,
    v: Tensor | None,
    x: Tensor,
    i: int,
    noise: Tensor | None,
    *,
    clip_denoised: bool = False,
) -> Tensor:
    """Ancestral step x_{t−1} = μ_θ(x_t) + σ_t z; the last step (i = 0) returns the mean."""
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    step = p_mean_variance(s, eps, v, x, t, clip_denoised=clip_denoised)
    if i == 0:
        return step.mean
    if noise is None:
        raise ValueError("ddpm_step needs noise for every step but the last")
    return step.mean + torch.exp(0.5 * step.log_variance) * noise


def ddim_sigma(s: NoiseSchedule, t: Tensor, ndim: int, eta: float) -> Tensor:
    """σ_t(η) = η √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−1}) (DDIM eq. 16); η = 1 is DDPM-like."""
    alpha_bar = gather(s.alphas_cumprod, t, ndim)
    alpha_bar_prev = gather(s.alphas_cumprod_prev, t, ndim)
    return (
        eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    )


def ddim_step(
    s: NoiseSchedule,
    eps: Tensor,
    x: Tensor,
    i: int,
    noise: Tensor | None,
    *,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> Tensor:
    """DDIM update (eq. 12): x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z.

    ε̂ is re-derived from x̂_0 so that clipping x̂_0 stays consistent with the direction term.
    """
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    pred_xstart = predict_xstart_from_eps(s, x, t, eps)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    eps = predict_eps_from_xstart(s, x, t, pred_xstart)
    alpha_bar_prev = gather(s.alphas_cumprod_prev, t, x.ndim)
    sigma = ddim_sigma(s, t, x.ndim, eta)
    mean = pred_xstart * alpha_bar_prev.sqrt() + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    if i == 0 or eta == 0:
        return mean
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise for every step but the last")
    return mean + sigma * noise


# ---------------------------------------------------------------------------------------------
# GaussianDiffusion
# ---------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """ε-prediction Gaussian diffusion over one schedule: training loss and sampling in one object.

    With `learn_sigma` the model outputs 2C channels (ε̂ and the variance interpolation v);
    otherwise C channels of ε̂ and the fixed-large variance β_t is used by DDPM.
    """

    def __init__(self, schedule: NoiseSchedule, *, learn_sigma: bool = True) -> None:
        self.schedule = schedule
        self.learn_sigma = learn_sigma
        self._schedule_by_device: dict[torch.device, NoiseSchedule] = {}

    def schedule_on(self, device: torch.device | str) -> NoiseSchedule:
        """The schedule with its coefficients on `device`, cached so a step does no host copies."""
        device = torch.device(device)
        if device not in self._schedule_by_device:
            self._schedule_by_device[device] = self.schedule.to(device)
        return self._schedule_by_device[device]

    @property
    def num_timesteps(self) -> int:
        """Length of the (respaced) chain, i.e. the number of sampling steps."""
        return self.schedule.num_timesteps

    @property
    def timestep_map(self) -> Tensor:
        """(T,) long: original timestep of each chain index; what the model is called with."""
        return self.schedule.timestep_map

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Noisy x_t from clean x_start at chain indices t (fresh ε when noise is None)."""
        schedule = self.schedule_on(x_start.device)
        return q_sample(schedule, x_start, t, torch.randn_like(x_start) if noise is None else noise)

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample {"loss", "mse", "vb"}; see `ditq.diffusion.losses.training_losses`."""
        return training_losses(
            self.schedule_on(x_start.device),
            model_fn,
            x_start,
            t,
            learn_sigma=self.learn_sigma,
            model_kwargs=model_kwargs,
            noise=noise,
        )

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        sampler: str = "ddim",
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        generator: Generators = None,
        eta: float = 0.0,
        progress: bool = False,
        clip_denoised: bool = False,
        device: torch.device | str | None = None,
        before_step: StepHook | None = None,
    ) -> Tensor:
        """x_0 from x_T (`noise`, or drawn from `generator`) by DDPM or DDIM over every chain step.

        `generator` (one, or one per sample) also supplies the per-step noise of DDPM and of DDIM
        with eta > 0. `eta` is used by DDIM only. `device` defaults to that of `noise`, then of the
        first tensor in `model_kwargs`, then the CPU. `before_step(step, steps)` runs before each
        model call, step 0 the noisiest (e.g. to serve a nested model at another width).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        model_kwargs = model_kwargs or {}
        shape = tuple(shape)
        device = _resolve_device(device, noise, model_kwargs)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            x = noise.to(device)
        else:
            x = standard_normal(shape, generator, device)

        schedule = self.schedule_on(device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for step, i in enumerate(tqdm(indices, desc=sampler, disable=not progress)):
            if before_step is not None:
                before_step(step, self.num_timesteps)
            original_t = int(self.timestep_map[i])  # the model was trained on the original steps
            t_model = torch.full((shape[0],), original_t, dtype=torch.long, device=device)
            output = model_fn(x, t_model, **model_kwargs)
            eps, v = split_model_output(output, shape[1], self.learn_sigma)
            needs_noise = i > 0 and (sampler == "ddpm" or eta > 0)
            z = standard_normal(shape, generator, device, x.dtype) if needs_noise else None
            if sampler == "ddpm":
                x = ddpm_step(schedule, eps, v, x, i, z, clip_denoised=clip_denoised)
            else:
                x = ddim_step(schedule, eps, x, i, z, eta=eta, clip_denoised=clip_denoised)
        return x


def _resolve_device(
    device: torch.device | str | None, noise: Tensor | None, model_kwargs: dict[str, Any]
) -> torch.device:
    """The explicit device, else noise's, else the first tensor kwarg's, else the CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    for value in model_kwargs.values():
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None = "",
    num_timesteps: int = 1000,
    learn_sigma: bool = True,
) -> GaussianDiffusion:
    """DiT's diffusion: linear β over `num_timesteps`, respaced ("250", "ddim50", "" = all steps)."""
    schedule = make_schedule(num_timesteps, "" if timestep_respacing is None else timestep_respacing)
    return GaussianDiffusion(schedule, learn_sigma=learn_sigma)


def respacing(steps: int, sampler: str) -> str:
    """The `create_diffusion` respacing that runs `steps` steps of `sampler` ("ddim" or "ddpm")."""
    return f"ddim{steps}" if sampler == "ddim" else str(steps)


def check_steps(steps: int, sampler: str, flag: str) -> None:
    """Refuse a step count the sampler cannot respace 1000 diffusion steps to, naming workable ones."""
    try:
        create_diffusion(respacing(steps, sampler))
    except ValueError as err:
        by_distance = sorted(range(1, 1001), key=lambda n: (abs(n - steps), n))
        near = sorted(itertools.islice((n for n in by_distance if _respaces(n, sampler)), 2))
        raise ValueError(f"{flag} {steps}: {err} ({sampler}); the nearest that work: "
                         f"{' and '.join(map(str, near))}") from None


def _respaces(steps: int, sampler: str) -> bool:
    try:
        create_diffusion(respacing(steps, sampler))
    except ValueError:
        return False
    return True

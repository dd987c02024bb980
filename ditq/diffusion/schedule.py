"""Noise schedule of DiT's Gaussian diffusion and the closed-form Gaussians built on it.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): β_t is the per-step noise variance,
ᾱ_t = ∏_{s≤t} (1 − β_s), the forward marginal is q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), and the
posterior q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I). Index t counts from 0 (the first noising step).

A respaced schedule keeps a subset S of the original timesteps and defines the shorter chain whose
ᾱ equals the original ᾱ at S; `timestep_map` translates a chain index back to the original
timestep, which is what the model was trained on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# β schedule and respacing
# ---------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000) -> Tensor:
    """Ho et al.'s linear β_t from 1e-4 to 0.02 at 1000 steps, scaled by 1000/T for other T.

    The scaling keeps ᾱ_T (how much signal survives) about the same for any step count.
    Evaluated like numpy's float64 linspace so values match the reference code bit for bit.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    beta_start, beta_end = scale * 1e-4, scale * 0.02
    step = (beta_end - beta_start) / (num_timesteps - 1)
    betas = torch.arange(num_timesteps, dtype=torch.float64) * step + beta_start
    betas[-1] = beta_end
    return betas


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Original timesteps kept by a respacing request, sorted ascending.

    - ``"ddimN"``: the DDIM paper's fixed stride, the smallest integer stride k with
      ``len(range(0, T, k)) == N``.
    - ``"N"`` or ``"N1,N2,..."`` (or a list of ints): split [0, T) into equal sections (the first
      ``T % len`` sections one step longer) and take N_i evenly spaced steps, endpoints included,
      from section i (positions rounded with Python's round-half-to-even).
    - ``""``: every step.
    """
    if isinstance(section_counts, str):
        if section_counts == "":
            return list(range(num_timesteps))
        if section_counts.startswith("ddim"):
            return _ddim_stride_timesteps(num_timesteps, int(section_counts[len("ddim") :]))
        section_counts = [int(c) for c in section_counts.split(",")]
    counts = list(section_counts)
    if not counts:
        raise ValueError("section_counts must name at least one section")
    base_size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    section_start = 0
    for i, count in enumerate(counts):
        size = base_size + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(section_start + round(position))
            position += stride
        section_start += size
    return sorted(set(kept))


def _ddim_stride_timesteps(num_timesteps: int, count: int) -> list[int]:
    """Timesteps 0, k, 2k, … for the first integer stride k that yields exactly `count` steps."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"no integer stride gives exactly {count} steps out of {num_timesteps}")


# ---------------------------------------------------------------------------------------------
# Schedule: β and every coefficient derived from it (float64, CPU)
# ---------------------------------------------------------------------------------------------


class NoiseSchedule:
    """β_1..β_T of one (possibly respaced) chain and the q / posterior coefficients derived from it.

    Coefficients are computed in float64 on the CPU, shape (T,); `to(device)` copies them to an
    accelerator once, and `gather` reads entries as float32 on the data's device, so a schedule
    left on the CPU still serves any device (at the price of a copy per read). `timestep_map`
    always stays on the CPU.
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None) -> None:
        betas = torch.as_tensor(betas).to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        num_timesteps = betas.shape[0]
        if timestep_map is None:
            timestep_map = torch.arange(num_timesteps)
        if timestep_map.shape != (num_timesteps,):
            raise ValueError(
                f"timestep_map must have shape ({num_timesteps},), got {tuple(timestep_map.shape)}"
            )
        self.num_timesteps = num_timesteps
        self.timestep_map = timestep_map.to(torch.long).cpu()
        self.betas = betas

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)  # ᾱ_t
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])  # ᾱ_{t−1}
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); it is 0 at t = 0, so its log borrows β̃_1 there.
        one_minus_ab = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_ab
        floor = self.posterior_variance[1:2] if num_timesteps > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.cat([floor, self.posterior_variance[1:]]).log()
        # μ̃_t = coef1 · x_0 + coef2 · x_t
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus_ab
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / one_minus_ab
        self.log_betas = betas.log()
        # "fixed large" variance σ_t² = β_t, except β̃_1 at t = 0 for a better decoder likelihood.
        self.fixed_large_log_variance = torch.cat([floor, betas[1:]]).log()

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Copy with every coefficient on `device` (float32 where float64 is unsupported, e.g. MPS)."""
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and name != "timestep_map":
                setattr(moved, name, value.to(dtype).to(device))
        return moved


def respace(base: NoiseSchedule, use_timesteps: Sequence[int]) -> NoiseSchedule:
    """Shorter chain over `use_timesteps` whose ᾱ equals the base chain's ᾱ at those steps.

    β'_i = 1 − ᾱ_{s_i} / ᾱ_{s_{i−1}}, so q(x_t | x_0) is unchanged at every kept step.
    """
    kept = sorted(set(int(s) for s in use_timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
        raise ValueError(f"use_timesteps must lie in [0, {base.num_timesteps}), got {kept[:3]}…")
    index = torch.tensor(kept, dtype=torch.long)
    alphas_cumprod = base.alphas_cumprod[index]
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return NoiseSchedule(1.0 - alphas_cumprod / previous, timestep_map=base.timestep_map[index])


def make_schedule(num_timesteps: int = 1000, timestep_respacing: str | Sequence[int] = "") -> NoiseSchedule:
    """Linear schedule of `num_timesteps` steps, respaced as the string/list asks ("" = all)."""
    base = NoiseSchedule(linear_betas(num_timesteps))
    if isinstance(timestep_respacing, str) and timestep_respacing == "":
        return base
    return respace(base, space_timesteps(num_timesteps, timestep_respacing))


# ---------------------------------------------------------------------------------------------
# Closed-form Gaussians (tensors are (N, C, ...); t is a (N,) long tensor of chain indices)
# ---------------------------------------------------------------------------------------------


def gather(coef: Tensor, t: Tensor, ndim: int) -> Tensor:
    """coef[t] as float32 on t's device, shaped (N, 1, …, 1) to broadcast over an ndim-D batch."""
    values = coef.to(torch.float32).to(t.device)[t]
    return values.reshape(-1, *([1] * (ndim - 1)))


def q_sample(s: NoiseSchedule, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε: a draw from q(x_t | x_0) with the given ε."""
    n = x_start.ndim
    return (
        gather(s.sqrt_alphas_cumprod, t, n) * x_start + gather(s.sqrt_one_minus_alphas_cumprod, t, n) * noise
    )


def q_posterior_mean(s: NoiseSchedule, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """μ̃_t(x_t, x_0), the mean of q(x_{t−1} | x_t, x_0)."""
    n = x_t.ndim
    return gather(s.posterior_mean_coef1, t, n) * x_start + gather(s.posterior_mean_coef2, t, n) * x_t


def predict_xstart_from_eps(s: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, the data estimate implied by a noise prediction."""
    n = x_t.ndim
    return gather(s.sqrt_recip_alphas_cumprod, t, n) * x_t - gather(s.sqrt_recipm1_alphas_cumprod, t, n) * eps


def predict_eps_from_xstart(s: NoiseSchedule, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
    """ε consistent with x_t and a (possibly clipped) x̂_0; the inverse of `predict_xstart_from_eps`."""
    n = x_t.ndim
    return (gather(s.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / gather(
        s.sqrt_recipm1_alphas_cumprod, t, n
    )


def learned_log_variance(s: NoiseSchedule, v: Tensor, t: Tensor) -> Tensor:
    """log Σ_θ = f log β_t + (1 − f) log β̃_t with f = (v + 1) / 2 (improved DDPM, eq. 15).

    v = −1 gives the posterior variance β̃_t, v = +1 gives β_t.
    """
    n = v.ndim
    frac = (v + 1) / 2
    return frac * gather(s.log_betas, t, n) + (1 - frac) * gather(s.posterior_log_variance_clipped, t, n)


class ReverseStep(NamedTuple):
    """p_θ(x_{t−1} | x_t) = N(mean, exp(log_variance)) and the x̂_0 it was built from."""

    mean: Tensor
    log_variance: Tensor
    pred_xstart: Tensor


def split_model_output(output: Tensor, channels: int, learn_sigma: bool) -> tuple[Tensor, Tensor | None]:
    """(ε̂, v) from a model output of 2C channels when σ is learned, else (ε̂, None) from C channels."""
    expected = 2 * channels if learn_sigma else channels
    if output.shape[1] != expected:
        raise ValueError(
            f"model output has {output.shape[1]} channels, expected {expected} "
            f"(in_channels={channels}, learn_sigma={learn_sigma})"
        )
    if learn_sigma:
        eps, v = output.split(channels, dim=1)
        return eps, v
    return output, None


def p_mean_variance(
    s: NoiseSchedule,
    eps: Tensor,
    v: Tensor | None,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = False,
) -> ReverseStep:
    """Mean and log-variance of p_θ(x_{t−1} | x_t) from an ε̂ prediction (and v when σ is learned).

    The mean is the posterior mean μ̃_t evaluated at x̂_0(ε̂); the variance is learned (v) or the
    fixed-large β_t.
    """
    pred_xstart = predict_xstart_from_eps(s, x_t, t, eps)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    if v is None:
        log_variance = gather(s.fixed_large_log_variance, t, x_t.ndim).expand_as(x_t)
    else:
        log_variance = learned_log_variance(s, v, t)
    return ReverseStep(q_posterior_mean(s, pred_xstart, x_t, t), log_variance, pred_xstart)

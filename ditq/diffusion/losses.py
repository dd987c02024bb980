"""DiT's training objective: L_simple (MSE on ε) plus, when σ is learned, the VLB term L_vlb.

As in DiT's default (`loss_type` MSE with `learn_sigma=True`), the two are added unscaled:
loss = mean‖ε − ε̂‖² + L_vlb[t], with L_vlb in bits per dimension and a stop-gradient on ε̂ inside
L_vlb so that the bound trains only the variance interpolation v (Nichol & Dhariwal 2021, §3.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ditq.diffusion.schedule import (
    NoiseSchedule,
    gather,
    p_mean_variance,
    q_posterior_mean,
    q_sample,
    split_model_output,
)

ModelFn = Callable[..., Tensor]

# ---------------------------------------------------------------------------------------------
# Gaussian log-likelihood pieces
# ---------------------------------------------------------------------------------------------


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch: one value per sample."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) by the tanh approximation used in the reference likelihoods (keeps numbers comparable)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of data quantised to 256 levels in [−1, 1] under N(means, e^{2·log_scales}), in nats.

    Each level owns the bin x ± 1/255; the two extreme levels own the tails down to −∞ / up to +∞.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    inv_std = torch.exp(-log_scales)
    centered = x - means
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_upper = cdf_upper.clamp(min=1e-12).log()  # bin (−∞, x + 1/255] for x = −1
    log_survival_lower = (1.0 - cdf_lower).clamp(min=1e-12).log()  # bin [x − 1/255, ∞) for x = +1
    log_bin = (cdf_upper - cdf_lower).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin))


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


def vlb_term(
    s: NoiseSchedule,
    x_start: Tensor,
    x_t: Tensor,
    t: Tensor,
    eps: Tensor,
    v: Tensor | None,
) -> Tensor:
    """L_t of the variational bound per sample, in bits per dimension.

    L_{t>0} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)); L_0 = −log p_θ(x_0 | x_1), the
    discretised decoder likelihood. t is the chain index (after respacing).
    """
    true_mean = q_posterior_mean(s, x_start, x_t, t)
    true_log_variance = gather(s.posterior_log_variance_clipped, t, x_t.ndim)
    model = p_mean_variance(s, eps, v, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model.mean, model.log_variance)) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=model.mean, log_scales=0.5 * model.log_variance
    )
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


def training_losses(
    s: NoiseSchedule,
    model_fn: ModelFn,
    x_start: Tensor,
    t: Tensor,
    *,
    learn_sigma: bool,
    model_kwargs: dict[str, Any] | None = None,
    noise: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-sample {"loss", "mse", "vb"} for one diffusion step t (chain indices, shape (N,)).

    model_fn receives x_t and the original timesteps `s.timestep_map[t]`. Without a learned σ the
    loss is the plain MSE and "vb" is zero (the fixed-variance bound has nothing to train).
    """
    if t.shape != (x_start.shape[0],):
        raise ValueError(f"t must have shape ({x_start.shape[0]},), got {tuple(t.shape)}")
    if not bool(((t >= 0) & (t < s.num_timesteps)).all()):  # one host sync instead of a device assert
        raise ValueError(f"t must lie in [0, {s.num_timesteps})")
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = q_sample(s, x_start, t, noise)
    model_t = s.timestep_map.to(t.device)[t]
    output = model_fn(x_t, model_t, **(model_kwargs or {}))
    eps, v = split_model_output(output, x_start.shape[1], learn_sigma)

    mse = mean_flat((noise - eps) ** 2)
    if v is None:
        vb = torch.zeros_like(mse)
    else:
        vb = vlb_term(s, x_start, x_t, t, eps.detach(), v)  # stop-gradient: the bound trains v only
    return {"loss": mse + vb, "mse": mse, "vb": vb}

"""Smoothing (SmoothQuant, arXiv 2211.10438; SVDQuant §4.1): move activation outliers into the weights.

For a Linear y = x Wᵀ, any positive per-input-channel vector s gives the same output:

    y = (x / s) · (W · diag(s))ᵀ

    s_j = max|X_j|^α / max|W_{:,j}|^β      (β = 1 − α: SmoothQuant's migration; β = 0: activations only)

so dividing the activations by s flattens their outlier channels while the weight absorbs them. SVDQuant
then lets a low-rank branch take the enlarged weight outliers. α is chosen per layer (per input group)
by a grid search on the quantized output error; this module only builds the candidates. Layers that
read one input tensor share one s, computed from the largest weight magnitude over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["DEFAULT_ALPHAS", "WeightExponent", "smooth_candidates", "smooth_factors"]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(i / 20, 2) for i in range(20))  # 0, 0.05, ..., 0.95
WeightExponent = Literal["1-alpha", "zero", "both"]
_FLOOR = 1e-5  # smallest smoothing factor: keeps x / s finite for channels that never fire


def smooth_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s = act_absmax^α / weight_absmax^β per input channel (float32), with dead channels (a zero on either
    side) left at 1 and the result floored at 1e-5."""
    if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
        raise ValueError(f"smoothing exponents must lie in [0, 1], got alpha={alpha}, beta={beta}")
    a, w = act_absmax.float(), weight_absmax.float()
    s = a.pow(alpha) / w.pow(beta)
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s).clamp_min(_FLOOR)


def smooth_candidates(
    act_absmax: torch.Tensor,
    weight_absmax: torch.Tensor,
    alphas: Sequence[float],
    weight_exponent: WeightExponent = "both",
) -> list[tuple[float, float, torch.Tensor]]:
    """(α, β, s) for every grid point: β = 1 − α, β = 0, or both families (SVDQuant's search); α = 0 with
    β = 0 is s = 1, i.e. no smoothing, so the search can always decline to smooth."""
    if weight_exponent not in ("1-alpha", "zero", "both"):
        raise ValueError(f"weight_exponent={weight_exponent!r} is not one of '1-alpha', 'zero', 'both'")
    pairs: list[tuple[float, float]] = [(0.0, 0.0)]
    for alpha in alphas:
        if weight_exponent in ("zero", "both"):
            pairs.append((float(alpha), 0.0))
        if weight_exponent in ("1-alpha", "both"):
            pairs.append((float(alpha), round(1.0 - float(alpha), 6)))
    unique = list(dict.fromkeys(pairs))
    return [(a, b, smooth_factors(act_absmax, weight_absmax, a, b)) for a, b in unique]

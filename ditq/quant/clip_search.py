"""Clipping search (SPEC §2 "optional clipping search"): per-group clip ratios that minimise output error.

A method tool rather than a primitive: it searches, using the pure quantizers of `ditq.quant.primitives`.
"""

from __future__ import annotations

import torch

from ditq.quant.primitives import (
    check_bits,
    check_clip,
    compute_qparams,
    dequantize,
    grouped,
    n_groups_of,
    quantize,
)

__all__ = ["DEFAULT_CLIP_GRID", "clip_search"]


DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0, 0.975, ..., 0.5


def clip_search(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    x: torch.Tensor | None = None,
    grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
    *,
    per_layer: bool = False,
) -> torch.Tensor:
    """Clip ratios for `compute_qparams(weight, ..., clip_ratio=...)` found by grid search.

    The error is the layer's output MSE on inputs `x` (..., in) when given, else the weight MSE.
    Returns float32 ratios of shape (out, G), or (1, 1) with `per_layer`. 1.0 (no clipping) is always a
    candidate, and each output row keeps 1.0 everywhere if its chosen ratios do worse on the full-row
    output error, so the result is never worse than no clipping. Group errors use the per-group Gram
    matrices of x (cross-group terms are ignored while choosing, then checked per row).
    """
    if weight.ndim != 2:
        raise ValueError(f"clip_search expects a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    check_bits(bits)
    out_features, in_features = weight.shape
    n_groups = n_groups_of(in_features, group_size)
    w = weight.detach().float()
    ratios = sorted({float(r) for r in grid} | {1.0}, reverse=True)
    check_clip(torch.tensor(ratios))

    gram = gram_groups = None
    if x is not None:
        if x.shape[-1] != in_features:
            raise ValueError(f"x has last dim {x.shape[-1]} but the weight has in_features={in_features}")
        xf = x.detach().reshape(-1, in_features).float()
        gram = xf.T @ xf / xf.shape[0]  # (in, in)
        g = in_features // n_groups
        idx = torch.arange(n_groups, device=w.device)
        gram_groups = gram.reshape(n_groups, g, n_groups, g)[idx, :, idx, :]  # (G, g, g)

    def residual(ratio: torch.Tensor | float) -> torch.Tensor:
        scale, zero = compute_qparams(w, bits, group_size, symmetric, ratio)
        return w - dequantize(quantize(w, scale, zero, bits, symmetric), scale, zero, group_size)

    def group_error(d: torch.Tensor) -> torch.Tensor:  # (out, G)
        dg = grouped(d, n_groups)
        if gram_groups is None:
            return dg.square().sum(-1)
        return torch.einsum("ogi,gij,ogj->og", dg, gram_groups, dg)

    def row_error(d: torch.Tensor) -> torch.Tensor:  # (out,)
        return d.square().sum(-1) if gram is None else ((d @ gram) * d).sum(-1)

    if per_layer:
        errors = torch.stack([row_error(residual(r)).sum() for r in ratios])
        return torch.full((1, 1), ratios[int(errors.argmin())], device=w.device)

    best = torch.ones(out_features, n_groups, device=w.device)
    best_err = group_error(residual(1.0))
    for r in ratios[1:]:
        err = group_error(residual(r))
        better = err < best_err
        best = torch.where(better, torch.full_like(best, r), best)
        best_err = torch.where(better, err, best_err)
    if gram is not None and n_groups > 1:
        worse = row_error(residual(best)) > row_error(residual(1.0))
        best[worse] = 1.0
    return best

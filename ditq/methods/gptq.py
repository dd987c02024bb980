"""GPTQ (Frantar et al., arXiv 2210.17323): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

The algorithm box, for W (out, in) and calibration inputs X (rows, in):

    H     = mean(x xᵀ) + λ·mean(diag H)·I            (dampened; dead inputs get H_jj = 1)
    U     = chol(H⁻¹)ᵀ  (upper)                       the sweep's step sizes and error directions
    for each block of B columns (in sweep order, act-order: by falling H_jj):
        for column j in the block:
            if j is the first column of its group the sweep reaches:
                scale, zero ← the group's *current* columns (the updates so far included)
            q_j  = Q(w_j);  e_j = (w_j − q̂_j) / U_jj
            w_k ← w_k − e_j U_jk   for the block's later columns k
        W[:, after block] −= E_block · U[block, after block]   (lazy batch update)

Groups are the spec's contiguous input-channel groups in the original order, so the result is exactly
what `QuantLinear.set_codes` stores for that spec; with act-order a group's scale is fixed when the sweep
first touches any of its columns. Q-DiT reuses this with per-layer group sizes. Q(w_j) is the nearest code;
a `ColumnRounding` replaces it (MatGPTQ's nested codes, `ditq.methods.matquant`): it may keep several targets
(copies of W, each compensated with its own error: one per served width), chooses one code per weight from
their columns and returns each target's q̂_j. Scales come from the first target.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Protocol

import torch

from ditq.quant.primitives import compute_qparams, qrange
from ditq.quant.spec import QuantSpec
from ditq.threads import torch_threads

__all__ = ["ColumnRounding", "gptq", "hessian"]


class ColumnRounding(Protocol):
    """How the sweep turns a column into codes, for symmetric specs (the default: the nearest code, one target).

    The sweep keeps `targets` copies of W; the call gets column j of each, (targets, out), and the rows'
    scales (out,), and returns the codes (out,) and each target's reconstruction q̂ (targets, out), whose error
    (w − q̂) / U_jj the sweep feeds back to that target's remaining columns."""

    targets: int

    def __call__(self, columns: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = mean over rows of x xᵀ, float32 (in, in), from calibration inputs (rows, in) (or (..., in))."""
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"hessian: inputs must be a tensor of shape (rows, in), got {shape}")
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    if x.shape[0] == 0:
        raise ValueError("hessian: inputs hold no rows")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("hessian: inputs hold NaN or infinite values")
    return x.T @ x / x.shape[0]


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    rounding: ColumnRounding | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, scales, zeros) of `weight` (out, in) for `spec`, minimising ‖X Wᵀ − X Ŵᵀ‖² given H = mean x xᵀ.

    Codes are int8 (symmetric) or uint8 (asymmetric, with uint8 `zeros`), at `spec.code_bits`; scales are
    float32 (out, n_groups): exactly what `QuantLinear.set_codes` takes. `damp` is λ, the fraction of
    mean(diag H) added to the diagonal; if H is still not positive definite the damping is raised tenfold
    (up to 1.0) before giving up. Runs on weight's device in float32 (the Cholesky in float64); on the CPU on
    one thread, as the sweep is thousands of small ops (`ditq.threads`). `rounding` (symmetric specs) chooses
    each column's codes and what is fed back in place of the nearest code (`ColumnRounding`).
    """
    _check_args(weight, hessian, spec, block_size, damp, act_order)
    if rounding is not None and not spec.symmetric:
        raise ValueError("gptq: a ColumnRounding takes symmetric specs (no zero points)")
    with torch_threads(1) if weight.device.type == "cpu" else nullcontext():
        return _sweep(weight, hessian, spec, block_size, damp, act_order, rounding)


def _sweep(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int, damp: float, act_order: bool,
    rounding: ColumnRounding | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`gptq` after its checks, on the threads it chose."""
    out_f, in_f = weight.shape
    bits, symmetric, group = spec.code_bits, spec.symmetric, spec.group_size
    qmin, qmax = qrange(bits, symmetric)
    device = weight.device
    targets = 1 if rounding is None else rounding.targets
    w = weight.detach().float().expand(targets, out_f, in_f).clone()  # (T, out, in), updated by the sweep
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0  # an input never seen: its column is rounded and its error goes nowhere

    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(in_f, device=device)
    w, h = w[:, :, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp).float()  # (in, in) upper

    n_groups = spec.n_groups(in_f)
    gsize = in_f if group is None else group
    group_of = (perm // gsize).tolist()  # group of each column in sweep order (host list: no sync per column)
    scales = torch.zeros(n_groups, out_f, device=device)  # transposed while sweeping: one row per group
    zeros = None if symmetric else torch.zeros(n_groups, out_f, device=device, dtype=torch.uint8)
    codes = torch.zeros(out_f, in_f, device=device, dtype=torch.int8 if symmetric else torch.uint8)
    ready = [False] * n_groups
    position = torch.empty_like(perm)
    position[perm] = torch.arange(in_f, device=device)  # sweep position of each original column

    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        # The block's columns as rows (T, B, out): each column is read and updated contiguously.
        wb = w[:, :, b0:b1].transpose(1, 2).contiguous()
        errors = torch.zeros_like(wb)  # (T, B, out)
        block_codes = torch.empty_like(wb[0])  # (B, out)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            g = group_of[b0 + i]
            if not ready[g]:
                cols = position[g * gsize:(g + 1) * gsize]  # sweep positions of the group's columns
                current = _current_columns(w[0], wb[0], errors[0, :i], u, b0, b1, i, cols)
                s, z = compute_qparams(current, bits, None, symmetric)  # (out, 1)
                scales[g] = spec.store_scale(s)[:, 0]  # codes against the scale as stored
                if zeros is not None:
                    zeros[g] = z[:, 0]
                ready[g] = True
            col = wb[:, i]  # (T, out)
            s = scales[g]
            if rounding is not None:
                q, dq = rounding(col, s)
            else:
                z = None if zeros is None else zeros[g].float()
                q = torch.round(col[0] / s) if z is None else torch.round(col[0] / s) + z
                q = q.clamp_(qmin, qmax)
                dq = s * (q if z is None else q - z)
            block_codes[i] = q
            err = (col - dq) / ub[i, i]  # (T, out)
            wb[:, i + 1:] -= ub[i, i + 1:, None] * err[:, None]  # the block's later columns
            errors[:, i] = err
        codes[:, perm[b0:b1]] = block_codes.T.to(codes.dtype)
        w[:, :, b1:] -= errors.transpose(1, 2) @ u[b0:b1, b1:]
    return codes, scales.T.contiguous(), None if zeros is None else zeros.T.contiguous()


def _current_columns(
    w: torch.Tensor, wb: torch.Tensor, errors: torch.Tensor, u: torch.Tensor, b0: int, b1: int, i: int,
    cols: torch.Tensor,
) -> torch.Tensor:
    """The columns at sweep positions `cols` as they stand now, (out, len(cols)): in-block ones from the block
    copy (B, out), later ones with the block's errors so far (i, out) applied (the lazy update has not reached
    them yet)."""
    out = torch.empty(w.shape[0], cols.numel(), device=w.device)
    inside = (cols >= b0) & (cols < b1)
    if bool(inside.any()):
        out[:, inside] = wb[cols[inside] - b0].T
    later = ~inside
    if bool(later.any()):
        out[:, later] = w[:, cols[later]] - errors.T.contiguous() @ u[b0:b0 + i, cols[later]]
    return out


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ tenfold while H is not positive definite."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp
    while True:
        lower, info = torch.linalg.cholesky_ex(h + lam * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        if lam >= 1.0:
            raise ValueError(f"gptq: the Hessian is not positive definite even with damp={lam:g}; "
                             "are the calibration inputs degenerate?")
        lam = min(1.0, max(lam * 10, 1e-4))


def _check_args(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int, damp: float, act_order: bool
) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"gptq: spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.w_format != "int":
        raise ValueError(f"gptq: spec.w_format={spec.w_format!r}; GPTQ rounds to an integer grid ('int') only")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"gptq: weight must be a 2-D tensor (out, in), got {getattr(weight, 'shape', weight)!r}")
    in_f = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(
            f"gptq: hessian must have shape (in, in) = {(in_f, in_f)}, got {tuple(getattr(hessian, 'shape', ()))}"
        )
    try:
        spec.check_fits(in_f, weight.shape[0])
    except ValueError as err:
        raise ValueError(f"gptq: spec: {err}") from err
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"gptq: block_size={block_size!r} must be a positive int")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"gptq: damp={damp!r} must be a finite number >= 0")
    if not isinstance(act_order, bool):
        raise TypeError(f"gptq: act_order={act_order!r} must be True or False")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("gptq: weight holds NaN or infinite values")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("gptq: hessian holds NaN or infinite values")

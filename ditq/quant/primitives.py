"""Pure quantizers: uniform integer (symmetric / asymmetric), straight-through fake quant, absmean
ternary and FP8 (e4m3fn) casts.

Every function is side-effect free (no device moves, no caches, no prints) and computes in float32;
integer codes come back as integer tensors, scales as float32.

Granularity convention (one rule for weights and activations): groups run along the **last** dim.

| `group_size` | scale shape for x of shape (..., K) | weights (out, in)          | activations (..., tokens, K) |
|--------------|--------------------------------------|----------------------------|------------------------------|
| `None`       | (..., 1)                             | per output channel (row)   | per token                    |
| `g`          | (..., K // g)                        | per row, per g input cols  | per token, per g channels    |
| per tensor   | (1,) * x.ndim  (`per_tensor_qparams`)| one scale for the matrix   | one scale for the tensor     |

Functions that *receive* a scale (`quantize`, `fake_quantize(qparams=...)`, `fp8_cast`, ...) read the
grouping from it: the scale's last dim is the number of groups G, so the group size is K // G, and
its leading dims broadcast against x's (a scale of shape (G,) is one static scale per channel group,
shared by all tokens).

Integer grids (b = bits, 2..8):
- symmetric: s = absmax / qmax with qmax = 2^(b-1) - 1; codes = clamp(round(x / s), -qmax-1, qmax),
  returned as **int8**; x̂ = s·q.
- asymmetric: the range [min, max] is first widened to contain 0 (so 0 is exact and the zero point
  is a valid code), s = (max - min) / (2^b - 1), z = clamp(round(-min / s), 0, 2^b - 1) stored as
  **uint8**; codes = clamp(round(x / s) + z, 0, 2^b - 1) returned as **uint8**; x̂ = s·(q - z).
- `round` is `torch.round` (half to even); division is a true division x / s.
- Scales are floored at `SCALE_FLOOR` so all-zero groups give code 0 instead of NaN.
"""

from __future__ import annotations

import torch

SCALE_FLOOR = 1e-8
"""Smallest scale any quantizer returns (absolute); keeps all-zero groups finite."""

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0

MIN_BITS, MAX_BITS = 2, 8

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FLOOR",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "fp8_cast",
    "fp8_dequantize",
    "fp8_quantize",
    "fp8_scale",
    "per_tensor_qparams",
    "qrange",
    "quantize",
    "slice_codes",
    "slice_range",
    "straight_through",
    "ternary_absmean",
]


# ---------------------------------------------------------------------------------------------------
# Validation and grouping
# ---------------------------------------------------------------------------------------------------


def check_bits(bits: int) -> None:
    """Raise ValueError unless `bits` is an int in 2..8 (the range of every integer grid here)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is outside the supported range {MIN_BITS}..{MAX_BITS}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The (qmin, qmax) code range of a b-bit grid: signed for symmetric, unsigned otherwise."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def n_groups_of(n_cols: int, group_size: int | None) -> int:
    """Groups along a last dim of `n_cols`; ValueError when `group_size` does not divide it."""
    if group_size is None:
        return 1
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive int or None")
    if n_cols % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the last dim {n_cols}; "
            f"choose a divisor of {n_cols} or None (one group per row)"
        )
    return n_cols // group_size


def _groups_in(scale: torch.Tensor) -> int:
    """Number of groups a scale describes: its last dim (a 0-dim scale is one group)."""
    return scale.shape[-1] if scale.ndim else 1


def grouped(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    """View (..., K) as (..., G, K // G)."""
    k = x.shape[-1]
    if n_groups <= 0 or k % n_groups != 0:
        raise ValueError(f"a scale with {n_groups} groups does not fit a last dim of {k}")
    return x.reshape(*x.shape[:-1], n_groups, k // n_groups)


def check_clip(clip_ratio: float | torch.Tensor) -> None:
    if isinstance(clip_ratio, torch.Tensor):
        if clip_ratio.numel() and not bool(((clip_ratio > 0) & (clip_ratio <= 1)).all()):
            raise ValueError("clip_ratio values must lie in (0, 1]")
    elif not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio={clip_ratio!r} must lie in (0, 1]")


# ---------------------------------------------------------------------------------------------------
# Integer quantization parameters
# ---------------------------------------------------------------------------------------------------


def _qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) from per-group min/max (float32), after shrinking the range by `clip_ratio`."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        absmax = torch.maximum(-lo, hi) * clip_ratio
        return (absmax / qmax).clamp_min(SCALE_FLOOR), None
    lo = lo.clamp(max=0.0) * clip_ratio
    hi = hi.clamp(min=0.0) * clip_ratio
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_FLOOR)
    zero = torch.round(-lo / scale).clamp(qmin, qmax).to(torch.uint8)
    return scale, zero


def compute_qparams(
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip_ratio: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max (or absmax) scale and zero point per group of the last dim.

    Returns `scale` float32 of shape (..., G) and `zero` uint8 of the same shape, or None when
    `symmetric`. `clip_ratio` (a float or a tensor broadcastable to (..., G), values in (0, 1]) shrinks
    the range before the scale is taken — see `clip_search`.
    """
    check_bits(bits)
    check_clip(clip_ratio)
    xg = grouped(x.detach().float(), n_groups_of(x.shape[-1], group_size))
    lo, hi = torch.aminmax(xg, dim=-1)
    return _qparams_from_range(lo, hi, bits, symmetric, clip_ratio)


def per_tensor_qparams(
    x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (scale, zero) for the whole tensor, shaped (1,) * x.ndim so it broadcasts as one group."""
    check_bits(bits)
    check_clip(clip_ratio)
    lo, hi = torch.aminmax(x.detach().float())
    scale, zero = _qparams_from_range(lo, hi, bits, symmetric, clip_ratio)
    shape = (1,) * max(x.ndim, 1)
    return scale.reshape(shape), None if zero is None else zero.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------------


def _unclamped_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """round(x / s) + z in float32, grouped as (..., G, g)."""
    xg = grouped(x.detach().float(), _groups_in(scale))
    q = torch.round(xg / scale.float().unsqueeze(-1))
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    return q


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool
) -> torch.Tensor:
    """Integer codes of x: int8 in [-2^(b-1), 2^(b-1)-1] if symmetric, else uint8 in [0, 2^b-1].

    The grouping is read from `scale` (last dim = number of groups); see the module docstring.
    """
    qmin, qmax = qrange(bits, symmetric)
    if symmetric != (zero is None):
        raise ValueError("symmetric quantization takes zero=None; asymmetric needs a zero point")
    q = _unclamped_codes(x, scale, zero).clamp(qmin, qmax)
    return q.to(torch.int8 if symmetric else torch.uint8).reshape(x.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int | None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x̂ = scale · (codes - zero), computed in float32 and returned as `dtype`.

    `group_size` must agree with the scale (None ↔ one group per row); it is checked so that a scale
    from another grouping cannot be applied silently.
    """
    n_groups = _groups_in(scale)
    if group_size is not None and n_groups != n_groups_of(codes.shape[-1], group_size):
        raise ValueError(
            f"scale has {n_groups} groups but group_size={group_size} over {codes.shape[-1]} columns "
            f"gives {codes.shape[-1] // group_size}"
        )
    if group_size is None and n_groups != 1:
        raise ValueError(f"group_size=None means one group per row, but the scale has {n_groups} groups")
    q = grouped(codes.float(), n_groups)
    if zero is not None:
        q = q - zero.float().unsqueeze(-1)
    x_hat = q * scale.float().unsqueeze(-1)
    return x_hat.reshape(codes.shape).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Fake quantization with a straight-through estimator
# ---------------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward returns x̂; backward passes the gradient to x unchanged (or masked)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return x_hat.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return (grad if mask is None else grad * mask.to(grad.dtype)), None, None


def straight_through(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Value of `x_hat`, gradient of `x` (times `mask` where given): the STE of QAT (SPEC §2).

    The forward value is exactly `x_hat` (no `x + (x_hat - x).detach()` rounding).
    """
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat shape {tuple(x_hat.shape)} differs from x shape {tuple(x.shape)}")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x_hat
    return _StraightThrough.apply(x, x_hat.detach(), mask)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip_ratio: float | torch.Tensor = 1.0,
    *,
    qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    mask_outside_clip: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize x in its own dtype; the gradient passes straight through to x.

    Scales are computed from x (dynamic) unless `qparams=(scale, zero)` is given (static; then
    `group_size`/`clip_ratio` are not used for the scale). With `mask_outside_clip`, elements whose
    code was clamped get zero gradient.
    """
    if qparams is None:
        scale, zero = compute_qparams(x, bits, group_size, symmetric, clip_ratio)
    else:
        scale, zero = qparams
    qmin, qmax = qrange(bits, symmetric)
    q_raw = _unclamped_codes(x, scale, zero)
    q = q_raw.clamp(qmin, qmax)
    if zero is not None:
        q = q - zero.float().unsqueeze(-1)
    x_hat = (q * scale.float().unsqueeze(-1)).reshape(x.shape).to(x.dtype)
    mask = None
    if mask_outside_clip:
        mask = ((q_raw >= qmin) & (q_raw <= qmax)).reshape(x.shape)
    return straight_through(x, x_hat, mask)


def slice_range(served_bits: int, extra_precision: bool = False) -> tuple[int, int]:
    """(lo, hi) of a `served_bits` slice in its own units: the signed grid, or with `extra_precision` on a
    2-bit slice one level more at the top, hi = 2^(r−1) (MatQuant's extra-precision int2)."""
    lo, hi = qrange(served_bits, symmetric=True)
    return lo, hi + int(extra_precision and served_bits == 2)


def slice_codes(
    codes: torch.Tensor, stored_bits: int, served_bits: int, *, extra_precision: bool = False
) -> torch.Tensor:
    """The `served_bits` most significant bits of symmetric `stored_bits` codes, on the stored grid (SPEC §6).

    S(q, r) = clamp(round(q / 2^(s−r)), −2^(r−1), 2^(r−1) − 1) · 2^(s−r): rounded, not truncated, with the
    top bucket clamped; the result is dequantized with the same scale as the stored codes. The r-bit grid is
    a subset of every wider one (nested grids), so a slice is served unchanged by any wider slice.

    `extra_precision` (2-bit slices only, `slice_range`): the top bucket keeps its own level 2^(r−1) instead
    of being clamped onto 2^(r−1) − 1, so the slice takes 5 values {−2, −1, 0, 1, 2} · 2^(s−2) and its codes
    need one more bit. The new level, 2^(s−1), is not a stored code: that slice is no longer nested in the
    stored grid. Such slices come back as int16 (2^7 does not fit an int8).
    """
    check_bits(stored_bits)
    check_bits(served_bits)
    if served_bits > stored_bits:
        raise ValueError(f"served_bits={served_bits} exceeds stored_bits={stored_bits}")
    step = 2 ** (stored_bits - served_bits)
    lo, hi = slice_range(served_bits, extra_precision)
    dtype = torch.int16 if hi * step > qrange(stored_bits, symmetric=True)[1] else codes.dtype
    return (torch.round(codes.float() / step).clamp(lo, hi) * step).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Ternary (BitNet b1.58 absmean)
# ---------------------------------------------------------------------------------------------------


def ternary_absmean(w: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes {-1, 0, 1} (int8) and γ = mean|W| over the whole matrix (float32 scalar).

    codes = clamp(round(W / (γ + ε)), -1, 1), as in BitNet b1.58 / TerDiT; the dequantized weight is
    γ·codes (BitNet) or α·codes with TerDiT's learned α.
    """
    wf = w.detach().float()
    gamma = wf.abs().mean()
    codes = torch.round(wf / (gamma + eps)).clamp(-1, 1).to(torch.int8)
    return codes, gamma


# ---------------------------------------------------------------------------------------------------
# FP8 e4m3fn
# ---------------------------------------------------------------------------------------------------


def fp8_scale(x: torch.Tensor, group_size: int | None = None, *, per_tensor: bool = False) -> torch.Tensor:
    """absmax / 448 per group of the last dim (None = per row/token), or per tensor; float32.

    Computed as absmax · (1/448) with the float32 reciprocal, which is how PyTorch's CUDA kernels divide by a
    scalar, so the CPU, CUDA and the Triton kernel give the same scales bit for bit. A group wider than 128
    columns (and a multiple of them) takes its absmax over 128-column chunks first: the same value (a max is
    exact in any order), but `torch.compile` then fuses short inner reductions into the kernel producing x
    instead of looping twice over a long row (DiT-XL/2 W4A8-FP8 at batch 64: 1.05× vs 0.99× bf16, same run).
    """
    xf = x.detach().float()
    if per_tensor:
        amax = xf.abs().amax().reshape((1,) * max(x.ndim, 1))
    else:
        groups = grouped(xf, n_groups_of(x.shape[-1], group_size)).abs()  # (..., G, W)
        width = groups.shape[-1]
        if width > 128 and width % 128 == 0:
            groups = groups.reshape(*groups.shape[:-1], width // 128, 128).amax(-1)
        amax = groups.amax(-1)
    return (amax * (1.0 / FP8_MAX)).clamp_min(SCALE_FLOOR)


def fp8_cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3fn codes of x · (1/scale) (saturated to ±448, round to nearest even); grouping read from scale.

    A multiply by the float32 reciprocal, not a division: a kernel then pays one division per row instead of
    one per element, and computes the same codes bit for bit."""
    xg = grouped(x.detach().float(), _groups_in(scale))
    q = (xg * torch.reciprocal(scale.float()).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE).reshape(x.shape)


def fp8_quantize(
    x: torch.Tensor, group_size: int | None = None, *, per_tensor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn tensor, float32 scale) with scale = absmax / 448 per row, per group or per tensor."""
    scale = fp8_scale(x, group_size, per_tensor=per_tensor)
    return fp8_cast(x, scale), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · scale in float32, returned as `dtype`; grouping read from the scale's last dim."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"fp8_dequantize expects a {FP8_DTYPE} tensor, got {q.dtype}")
    qg = grouped(q.float(), _groups_in(scale))
    return (qg * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)

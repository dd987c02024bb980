"""Per-token FP8 quantization of activations in one kernel: smoothing, row absmax, scale, e4m3 codes.

Computes what `ditq.kernels.reference.quantize_activations` does for a dynamic per-token FP8 spec
(h = x / smooth in x's dtype; scale = max(absmax(h) · (1/448), SCALE_FLOOR); codes = e4m3(clamp(h / scale))),
but returns the codes and scales for an FP8 GEMM instead of their dequantized product. Each program owns
one row and reads it once. Values are rounded to the e4m3 grid (nearest, ties to
even) in float32 before the cast, so the cast is exact on every backend (Triton's CPU interpreter
mis-rounds some values that sit between two e4m3 binades).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditq.quant.primitives import FP8_MAX, SCALE_FLOOR, fp8_cast, fp8_scale

__all__ = ["quantize_rows_fp8", "quantize_rows_fp8_reference"]


@triton.jit
def _round_to_e4m3(v):
    """v (|v| ≤ 448, float32) rounded to the nearest e4m3 value, ties to even: a quantum of 2^(e−3) for a
    normal v of exponent e, 2^−9 below (subnormals); the 1.5·2^23 add-subtract rounds half to even."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = tl.maximum(exponent - 3, -9)  # log2 of the quantum; ≤ 5 for |v| ≤ 448
    quantum = ((step + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - step) << 23).to(tl.float32, bitcast=True)  # exact: no division to approximate
    return ((v * inverse + 12582912.0) - 12582912.0) * quantum


@triton.jit
def _row_quant_kernel(x, smooth, codes, scales, n_cols, HAS_SMOOTH: tl.constexpr, FP8_LIMIT: tl.constexpr,
                      INV_LIMIT: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program, read once: BLOCK ≥ n_cols holds the whole row. Tensor divisions are IEEE-rounded
    (`div_rn`) and the scale is absmax times the float32 reciprocal of 448, as PyTorch computes them, so codes
    and scales match the reference bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    h = tl.load(x + row * n_cols + cols, mask=inside, other=0.0)
    if HAS_SMOOTH:  # x / smooth rounded to x's dtype, as the reference computes it
        s = tl.load(smooth + cols, mask=inside, other=1.0).to(h.dtype).to(tl.float32)
        h = tl.math.div_rn(h.to(tl.float32), s).to(h.dtype)
    h = h.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(h), axis=0) * INV_LIMIT, FLOOR)  # as `fp8_scale`: times the reciprocal
    tl.store(scales + row, scale)
    q = tl.minimum(tl.maximum(tl.math.div_rn(h, scale), -FP8_LIMIT), FP8_LIMIT)
    tl.store(codes + row * n_cols + cols, _round_to_e4m3(q).to(tl.float8e4nv), mask=inside)


def quantize_rows_fp8(x: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (M, K) float8_e4m3fn, scales (M, 1) float32) for a contiguous 2-D x (M, K)."""
    if x.ndim != 2:
        raise ValueError(f"quantize_rows_fp8 takes a 2-D (tokens, channels) tensor, got shape {tuple(x.shape)}")
    x = x.contiguous()
    n_rows, n_cols = x.shape
    codes = torch.empty(n_rows, n_cols, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(n_rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(max(n_cols, 16))
    _row_quant_kernel[(n_rows,)](x, x if smooth is None else smooth.contiguous(), codes, scales, n_cols,
                                 HAS_SMOOTH=smooth is not None, FP8_LIMIT=FP8_MAX, INV_LIMIT=1.0 / FP8_MAX,
                                 FLOOR=SCALE_FLOOR, BLOCK=block,
                                 num_warps=min(16, max(4, block // 512)))
    return codes, scales


def quantize_rows_fp8_reference(x: torch.Tensor, smooth: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from the primitives."""
    h = x if smooth is None else x / smooth.to(x.dtype)
    scale = fp8_scale(h, None)
    return fp8_cast(h, scale), scale

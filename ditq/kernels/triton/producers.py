"""What the FP8 input pre-pass (`ditq.kernels.triton.rowquant`) applies to a tile of rows before it quantizes
them: the producers of a transformer's Linear inputs (a residual add, an activation, a norm, adaLN's modulate, a
concatenation of channels whose second part goes through an activation, or of tokens),
each computed as PyTorch's ops compute it, every value rounded to x's dtype where they round it, so that the
kernels' codes are the reference's (ties aside). Each producer is a compile-time branch: a launch compiles only
its own."""

from __future__ import annotations

import triton
import triton.language as tl

from ditq.kernels.triton.rounding import product, rounded

__all__ = ["concat_rows", "inv_std", "load_rows", "residual_sum", "token_concat_rows", "transformed"]


@triton.jit
def load_rows(x, rows, cols, row_ok, K, stride_xm):
    """(rows, cols) tile of x in its own dtype; 0 outside."""
    inside = row_ok[:, None] & (cols < K)[None, :]
    return tl.load(x + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)


@triton.jit
def _per_sample(t, rows, cols, row_ok, K, tokens, stride_mod, ONE_SAMPLE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The rows' samples' rows of a (samples, K) tensor (adaLN's shift, scale, gate) in float32, 0 outside: one
    row broadcast over the tile when ONE_SAMPLE (the program's rows are tokens of one sample)."""
    if ONE_SAMPLE:
        offsets = ((tl.program_id(0) * BLOCK_M) // tokens).to(tl.int64) * stride_mod + cols
        row = tl.load(t + offsets, mask=cols < K, other=0.0).to(tl.float32)
        return tl.broadcast_to(row[None, :], (BLOCK_M, cols.shape[0]))  # one return type for both branches
    offsets = (rows // tokens).to(tl.int64)[:, None] * stride_mod + cols[None, :]  # each row's sample
    return tl.load(t + offsets, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def residual_sum(
    v, update, gate, x_out, rows, cols, row_ok, K, tokens, stride_um, stride_om, stride_mod, RESIDUAL: tl.constexpr,
    EMULATE: tl.constexpr, ONE_SAMPLE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """x + gate · update (RESIDUAL 1) or x + update (2) for a tile of x (as loaded), the product and the sum
    each rounded to x's dtype as PyTorch's ops round them; stored to `x_out` and returned in x's dtype."""
    dtype: tl.constexpr = v.dtype
    y = load_rows(update, rows, cols, row_ok, K, stride_um).to(tl.float32)
    if RESIDUAL == 1:
        g = _per_sample(gate, rows, cols, row_ok, K, tokens, stride_mod, ONE_SAMPLE, BLOCK_M)
        y = product(g, y, EMULATE)
        if dtype != tl.float32:
            y = rounded(y, dtype, EMULATE)
    if dtype != tl.float32:
        total = rounded(v.to(tl.float32) + y, dtype, EMULATE)
    else:
        total = v + y
    total = total.to(dtype)
    tl.store(x_out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], total,
             mask=row_ok[:, None] & (cols < K)[None, :])  # fmt: skip
    return total


@triton.jit
def _per_channel(t, cols, K):
    """A (K,) tensor's values at the tile's columns in float32, as a (1, cols) row; 0 outside."""
    return tl.load(t + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _normalized(
    h, mean, rstd, norm_weight, norm_bias, cols, K, dtype: tl.constexpr, NORM: tl.constexpr,
    NORM_WEIGHT: tl.constexpr, NORM_BIAS: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """norm(h) for a float32 tile of x, rounded to x's dtype where PyTorch rounds it: NORM 1 (LayerNorm) and 2
    (F.rms_norm) once after the weight and bias, in float32 before; 3 ("rms_cast") before the weight, then
    after the product and after the sum. `mean` (LayerNorm), `rstd`: the rows' statistics."""
    ROUND: tl.constexpr = dtype != tl.float32
    if NORM == 1:
        h = (h - mean[:, None]) * rstd[:, None]
    else:
        h = h * rstd[:, None]
    if NORM == 3:
        if ROUND:
            h = rounded(h, dtype, EMULATE)
        if NORM_WEIGHT:
            h = product(h, _per_channel(norm_weight, cols, K), EMULATE)
            if ROUND:
                h = rounded(h, dtype, EMULATE)
        if NORM_BIAS:
            h = h + _per_channel(norm_bias, cols, K)
            if ROUND:
                h = rounded(h, dtype, EMULATE)
    else:
        if NORM_WEIGHT:
            h = h * _per_channel(norm_weight, cols, K)
        if NORM_BIAS:
            h = h + _per_channel(norm_bias, cols, K)
        if ROUND:
            h = rounded(h, dtype, EMULATE)
    return h


@triton.jit
def _activated(h, ACT: tl.constexpr):
    """ACT(h) in float32: 1 exact GELU, 2 its tanh approximation, 3 SiLU (0: h)."""
    if ACT == 1:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    if ACT == 2:  # tanh(u) = 1 − 2 / (e^{2u} + 1): up to 7e-5 relative off PyTorch's for inputs in [-3, -1] (and 0
        # below -3, |error| ≤ 3.2e-7), far under the bf16 step the result is rounded to
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        h = 0.5 * h * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 80.0)) + 1.0))
    if ACT == 3:  # x / (1 + e^-x) as PyTorch computes it (e^-x = inf below -88: -0, as PyTorch's)
        h = h / (1.0 + tl.exp(-h))
    return h


@triton.jit
def concat_rows(x, second, rows, cols, row_ok, split, K, stride_xm, stride_sm, ACT: tl.constexpr,
                EMULATE: tl.constexpr):  # fmt: skip
    """(rows, cols) tile of cat([x, ACT(second)], -1) in x's dtype, x (M, split) and second (M, K − split) of one
    dtype: the activation in float32, rounded to that dtype as PyTorch's op on `second` rounds it; 0 outside."""
    first = load_rows(x, rows, cols, row_ok, split, stride_xm)
    in_second = row_ok[:, None] & ((cols >= split) & (cols < K))[None, :]
    rest = tl.load(second + rows.to(tl.int64)[:, None] * stride_sm + (cols - split)[None, :], mask=in_second,
                   other=0.0)  # fmt: skip
    if ACT != 0:
        rest = _activated(rest.to(tl.float32), ACT)
        if first.dtype != tl.float32:
            rest = rounded(rest, first.dtype, EMULATE)
    return tl.where((cols < split)[None, :], first, rest.to(first.dtype))


@triton.jit
def token_concat_rows(x, second, rows, cols, row_ok, split, period, K, stride_xm, stride_sm):
    """(rows, cols) tile of the rows of cat([x, second], dim=1) over samples of `period` tokens, each sample's
    first `split` rows in x (N·split, K) and the rest in second (N·(period − split), K); 0 outside."""
    sample, token = rows // period, rows % period
    in_first = token < split
    inside = (cols < K)[None, :]
    first_rows = (sample * split + token).to(tl.int64)
    second_rows = (sample * (period - split) + token - split).to(tl.int64)
    first = tl.load(x + first_rows[:, None] * stride_xm + cols[None, :], mask=(row_ok & in_first)[:, None] & inside,
                    other=0.0)  # fmt: skip
    rest = tl.load(second + second_rows[:, None] * stride_sm + cols[None, :],
                   mask=(row_ok & ~in_first)[:, None] & inside, other=0.0)  # fmt: skip
    return tl.where(in_first[:, None], first, rest)


@triton.jit
def transformed(
    v, mean, rstd, shift, scale_mod, norm_weight, norm_bias, inv_smooth, rows, cols, row_ok, K, tokens, stride_mod,
    ACT: tl.constexpr, NORM: tl.constexpr, MODULATE: tl.constexpr, NORM_WEIGHT: tl.constexpr,
    NORM_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, EMULATE: tl.constexpr, ONE_SAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """A tile of x (as loaded) → act(x) or [modulate(] norm(x) [)] [· inv_smooth] in float32, each step before
    the smoothing rounded to x's dtype as PyTorch's ops round it; 0 outside. NORM: `mean`, `rstd` are the rows'
    statistics; ONE_SAMPLE: the program's BLOCK_M rows are tokens of one sample (one shift and scale row for all)."""
    dtype: tl.constexpr = v.dtype
    ROUND: tl.constexpr = dtype != tl.float32
    h = v.to(tl.float32)
    if NORM != 0:
        inside = row_ok[:, None] & (cols < K)[None, :]
        if MODULATE:  # loaded first: their loads then overlap the norm's arithmetic
            gain = 1.0 + _per_sample(scale_mod, rows, cols, row_ok, K, tokens, stride_mod, ONE_SAMPLE, BLOCK_M)
            bias = _per_sample(shift, rows, cols, row_ok, K, tokens, stride_mod, ONE_SAMPLE, BLOCK_M)
        h = _normalized(h, mean, rstd, norm_weight, norm_bias, cols, K, dtype, NORM, NORM_WEIGHT, NORM_BIAS, EMULATE)
        if MODULATE:
            if ROUND:
                h = rounded(product(h, rounded(gain, dtype, EMULATE), EMULATE), dtype, EMULATE)
                h = rounded(h + bias, dtype, EMULATE)
            else:
                h = product(h, gain, EMULATE) + bias
        h = tl.where(inside, h, 0.0)
    if ACT != 0:
        h = _activated(h, ACT)
        if ROUND:
            h = rounded(h, dtype, EMULATE)
    if HAS_SMOOTH:
        r = tl.load(inv_smooth + cols, mask=cols < K, other=1.0).to(tl.float32)[None, :]
        h = h * r  # in float32, as x · inv_smooth promotes to, and not rounded to x's dtype
    return h


@triton.jit
def inv_std(m2, K, eps):
    """1 / sqrt(m2 / K + eps) (m2: the biased variance's or the mean square's sum), correctly rounded
    (PyTorch's CPU norms; its CUDA ones take an approximate rsqrt, a float32 ulp or two apart)."""
    # eps in float32 as Triton's launcher passes it (inductor passes a Python float as float64)
    return tl.math.div_rn(tl.full(m2.shape, 1.0, tl.float32), tl.sqrt_rn(m2 / K + tl.cast(eps, tl.float32)))

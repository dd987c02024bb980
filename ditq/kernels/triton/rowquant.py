"""Per-token FP8 quantization of a wide activation in one read, with what produces it fused in: the input
pre-pass of an FP8 GEMM whose input no compiler fuses well.

    x (M, K) ──► [x += (gate ·) update] ──► h = act(x) or [modulate(] norm(x) [, shift, scale)] [· inv_smooth]
                                                 or cat([x, act(second)], -1), or any of these of x's and
                                                 second's tokens concatenated per sample
             ──► s = max|h| / 448 per row, codes = e4m3(h · (1/s))

The producers fused are those of a transformer's Linear inputs. The input of an MLP's second Linear is
GELU(fc1(x)): `torch.compile` fuses the GELU, the row absmax and the cast into one reduction kernel, but over
rows wider than 1,024 it loops twice and recomputes the GELU (DiT-XL/2 fc2, 16,384 × 4,608: 316 µs on an H100
against 106 µs for bf16's GELU alone); SiLU (adaLN's and timestep MLPs' input) likewise. The input of a DiT
block's qkv and fc1 is adaLN's modulate(LayerNorm(x)) (shift and scale per sample, rows = samples × `tokens`
tokens), often after the block's residual add: inductor's kernel for it loops over each row once per reduction
(mean and variance, then absmax) before the cast. The norm may be a LayerNorm with or without an affine, or an
RMSNorm (torch's, rounded once, or diffusers', rounded before its weight: `reference.Norm`), modulated or not;
the residual gated (x + gate·update) or not. Here each program holds whole rows in registers — a power-of-two
head tile plus a tail tile, so a row of 4,608 = 4,096 + 512 columns wastes no lanes — reads x once and writes
codes and scales once; rows too wide to hold take a kernel that walks K again for each step (the norm's
statistics, the absmax, the cast). Each producer is a compile-time branch (`ditq.kernels.triton.producers`): a
launch compiles only its own. Every value is rounded where the PyTorch reference rounds it (the residual's
product and sum, the activation, the norm, each modulate op and the smoothing in x's dtype; scale = absmax ·
(1/448), floored; codes = e4m3(h · (1/scale)), round to nearest even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ditq.kernels.reference import (
    NORMS,
    Modulation,
    Norm,
    Residual,
    activate,
    modulated,
    normalized,
    residual_added,
    smoothed_by_reciprocal,
)
from ditq.kernels.triton import interpreted
from ditq.kernels.triton.lowrank import append_lowrank_codes, check_lowrank
from ditq.kernels.triton.producers import (
    concat_rows,
    inv_std,
    load_rows,
    residual_sum,
    token_concat_rows,
    transformed,
)
from ditq.kernels.triton.rounding import rounded
from ditq.quant.primitives import FP8_MAX, SCALE_FLOOR, fp8_cast, fp8_scale

__all__ = ["quantize_rows_fp8", "quantize_rows_fp8_reference"]

ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}  # kernel codes of `reference.INPUT_ACTIVATIONS`
NORM_CODES = {"layer": 1, "rms": 2, "rms_cast": 3}  # of `reference.NORMS`; 0: no norm
# The one-pass kernel's launch (`quantize_rows_fp8`): (elements one program holds at most, rows × padded width;
# elements per thread, which sets its warps: as few as hold the rows at about that many)
UNSMOOTHED_LAUNCH = (4096, 72)
SMOOTHED_LAUNCH = (9216, 36)
MAX_RESIDENT = 16384  # wider rows (padded) take the multi-pass kernel: registers would spill
MULTI_PASS_BLOCKS = (16, 128)  # its (rows per program, K block), 4 warps
_FP8_MAX = tl.constexpr(FP8_MAX)
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)


@triton.jit
def _row_scale(amax):
    return tl.maximum(amax * (1.0 / _FP8_MAX), _SCALE_FLOOR)


@triton.jit
def _store_codes(codes, h, scale, rows, cols, row_ok, K, stride_cm, EMULATE: tl.constexpr):
    inverse = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)  # once per row (see `fp8_cast`)
    q = tl.minimum(tl.maximum(h * inverse[:, None], -_FP8_MAX), _FP8_MAX)
    q = rounded(q, tl.float8e4nv, EMULATE).to(tl.float8e4nv)
    tl.store(codes + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], q,
             mask=row_ok[:, None] & (cols < K)[None, :])  # fmt: skip


@triton.jit
def _input_tile(x, second, rows, cols, row_ok, split, period, K, stride_xm, stride_sm, SECOND_ACT: tl.constexpr,
                CONCAT: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """A (rows, cols) tile of the pre-pass's input in x's dtype: x's rows, or (CONCAT 1) cat([x, SECOND_ACT(second)],
    -1) with x's `split` columns first, or (2) cat([x, second], 1) per sample of `period` rows, `split` of them x's."""
    if CONCAT == 1:
        return concat_rows(x, second, rows, cols, row_ok, split, K, stride_xm, stride_sm, SECOND_ACT, EMULATE)
    if CONCAT == 2:
        return token_concat_rows(x, second, rows, cols, row_ok, split, period, K, stride_xm, stride_sm)
    return load_rows(x, rows, cols, row_ok, K, stride_xm)


@triton.jit
def _rows_one_pass_kernel(
    x, inv_smooth, shift, scale_mod, codes, scales, M, K, tokens, eps, stride_xm, stride_cm, stride_mod,
    norm_weight, norm_bias, update, gate, x_out, stride_um, stride_om, second, split, stride_sm,
    ACT: tl.constexpr, NORM: tl.constexpr, MODULATE: tl.constexpr, NORM_WEIGHT: tl.constexpr,
    NORM_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, EMULATE: tl.constexpr, ONE_SAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, RESIDUAL: tl.constexpr,
    SECOND_ACT: tl.constexpr, CONCAT: tl.constexpr,
):  # fmt: skip
    """BLOCK_M whole rows per program: columns [0, HEAD) and [HEAD, HEAD + TAIL), both powers of two.
    RESIDUAL: x is first replaced by x + gate · update (1) or x + update (2), which is also written to `x_out`.
    CONCAT 1: the rows are cat([x, SECOND_ACT(second)], -1), `split` = x's columns; 2: cat([x, second], 1) per
    sample, `split` = x's tokens per sample and `tokens` the sample's tokens in both (the rows' period)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    head_cols = tl.arange(0, HEAD)
    head_x = _input_tile(x, second, rows, head_cols, row_ok, split, tokens, K, stride_xm, stride_sm, SECOND_ACT,
                         CONCAT, EMULATE)  # fmt: skip
    if RESIDUAL != 0:
        head_x = residual_sum(head_x, update, gate, x_out, rows, head_cols, row_ok, K, tokens,
                              stride_um, stride_om, stride_mod, RESIDUAL, EMULATE, ONE_SAMPLE,
                              BLOCK_M)  # fmt: skip
    if TAIL > 0:
        tail_cols = HEAD + tl.arange(0, TAIL)
        tail_x = _input_tile(x, second, rows, tail_cols, row_ok, split, tokens, K, stride_xm, stride_sm, SECOND_ACT,
                             CONCAT, EMULATE)  # fmt: skip
        if RESIDUAL != 0:
            tail_x = residual_sum(tail_x, update, gate, x_out, rows, tail_cols, row_ok, K, tokens,
                                  stride_um, stride_om, stride_mod, RESIDUAL, EMULATE, ONE_SAMPLE,
                                  BLOCK_M)  # fmt: skip
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = mean
    if NORM == 1:  # both tiles are in registers: mean first, then the centred sum of squares
        total = tl.sum(head_x.to(tl.float32), axis=1)
        if TAIL > 0:
            total += tl.sum(tail_x.to(tl.float32), axis=1)
        mean = total / K
        centred = tl.where((head_cols < K)[None, :], head_x.to(tl.float32) - mean[:, None], 0.0)
        m2 = tl.sum(centred * centred, axis=1)
        if TAIL > 0:
            centred = tl.where((tail_cols < K)[None, :], tail_x.to(tl.float32) - mean[:, None], 0.0)
            m2 += tl.sum(centred * centred, axis=1)
        rstd = inv_std(m2, K, eps)
    if NORM > 1:  # RMS: the sum of squares (0 outside)
        squares = tl.sum(head_x.to(tl.float32) * head_x.to(tl.float32), axis=1)
        if TAIL > 0:
            squares += tl.sum(tail_x.to(tl.float32) * tail_x.to(tl.float32), axis=1)
        rstd = inv_std(squares, K, eps)
    head = transformed(head_x, mean, rstd, shift, scale_mod, norm_weight, norm_bias, inv_smooth, rows,
                       head_cols, row_ok, K, tokens, stride_mod, ACT, NORM, MODULATE, NORM_WEIGHT,
                       NORM_BIAS, HAS_SMOOTH, EMULATE, ONE_SAMPLE, BLOCK_M)  # fmt: skip
    amax = tl.max(tl.abs(head), axis=1)
    if TAIL > 0:
        tail = transformed(tail_x, mean, rstd, shift, scale_mod, norm_weight, norm_bias, inv_smooth, rows,
                           tail_cols, row_ok, K, tokens, stride_mod, ACT, NORM, MODULATE, NORM_WEIGHT,
                           NORM_BIAS, HAS_SMOOTH, EMULATE, ONE_SAMPLE, BLOCK_M)  # fmt: skip
        amax = tl.maximum(amax, tl.max(tl.abs(tail), axis=1))
    scale = _row_scale(amax)
    tl.store(scales + rows, scale, mask=row_ok)
    _store_codes(codes, head, scale, rows, head_cols, row_ok, K, stride_cm, EMULATE)
    if TAIL > 0:
        _store_codes(codes, tail, scale, rows, tail_cols, row_ok, K, stride_cm, EMULATE)


@triton.jit
def _rows_multi_pass_kernel(
    x, inv_smooth, shift, scale_mod, codes, scales, M, K: tl.constexpr, tokens, eps, stride_xm, stride_cm, stride_mod,
    norm_weight, norm_bias,
    ACT: tl.constexpr, NORM: tl.constexpr, MODULATE: tl.constexpr, NORM_WEIGHT: tl.constexpr,
    NORM_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, EMULATE: tl.constexpr, ONE_SAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """For rows too wide to hold, walks K once per step: (NORM) the rows' mean and variance, merged chunk by
    chunk (Chan et al.), or their sum of squares (RMS); the row absmax; the codes. K is a compile-time constant
    (a layer's width; also what Triton's CPU interpreter needs for a loop bound)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rk = tl.arange(0, BLOCK_K)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = mean
    if NORM == 1:
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = load_rows(x, rows, k0 + rk, row_ok, K, stride_xm).to(tl.float32)
            n_seen = k0 * 1.0
            n_chunk = tl.minimum(K - k0, BLOCK_K) * 1.0
            chunk_mean = tl.sum(v, axis=1) / n_chunk
            centred = tl.where((k0 + rk < K)[None, :], v - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            mean += delta * (n_chunk / (n_seen + n_chunk))
            m2 += tl.sum(centred * centred, axis=1) + delta * delta * (n_seen * n_chunk / (n_seen + n_chunk))
        rstd = inv_std(m2, K, eps)
    if NORM > 1:
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = load_rows(x, rows, k0 + rk, row_ok, K, stride_xm).to(tl.float32)
            squares += tl.sum(v * v, axis=1)
        rstd = inv_std(squares, K, eps)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        h = transformed(load_rows(x, rows, k0 + rk, row_ok, K, stride_xm), mean, rstd, shift,
                        scale_mod, norm_weight, norm_bias, inv_smooth, rows, k0 + rk, row_ok, K, tokens,
                        stride_mod, ACT, NORM, MODULATE, NORM_WEIGHT, NORM_BIAS, HAS_SMOOTH, EMULATE,
                        ONE_SAMPLE, BLOCK_M)  # fmt: skip
        amax = tl.maximum(amax, tl.max(tl.abs(h), axis=1))
    scale = _row_scale(amax)
    tl.store(scales + rows, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        h = transformed(load_rows(x, rows, k0 + rk, row_ok, K, stride_xm), mean, rstd, shift,
                        scale_mod, norm_weight, norm_bias, inv_smooth, rows, k0 + rk, row_ok, K, tokens,
                        stride_mod, ACT, NORM, MODULATE, NORM_WEIGHT, NORM_BIAS, HAS_SMOOTH, EMULATE,
                        ONE_SAMPLE, BLOCK_M)  # fmt: skip
        _store_codes(codes, h, scale, rows, k0 + rk, row_ok, K, stride_cm, EMULATE)


def quantize_rows_fp8(
    x: torch.Tensor,
    inv_smooth: torch.Tensor | None = None,
    activation: str = "none",
    modulation: Modulation | None = None,
    *,
    norm: Norm | None = None,
    residual: Residual | None = None,
    residual_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
    second: torch.Tensor | None = None,
    first_tokens: int = 0,
    row_elements: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes (M, K [+ 2R]), float32 scales (M, 1)) of h = activation(x), norm(x) or
    modulate(norm(x), shift, scale), [· inv_smooth], inv_smooth (K,) the float32 reciprocal of SVDQuant's
    smoothing (`ditq.kernels.fp8` says why a product). `norm` None with a modulation: adaLN's LayerNorm without
    affine (`modulation.eps`).

    `second` (M, K₂) in x's dtype: h = cat([x, activation(second)], -1) instead, K = x's columns + K₂ (FLUX's
    single blocks feed their out projection cat([attention, GELU(mlp)]): the pre-pass reads both parts once and
    computes the GELU, where a concatenation would be written and read again). With `first_tokens` T₁ > 0 the
    concatenation is of tokens instead (never both): second (N·T₂, K) holds each of x's N samples' T₂ more tokens,
    the rows are cat([x (N, T₁, K), second (N, T₂, K)], 1), and the activation, norm or modulation applies to them
    (FLUX's single blocks normalize cat([text, image]) tokens; a modulation's `tokens` must be T₁ + T₂). Rows too
    wide to hold in registers are concatenated by PyTorch first.

    `residual`: x is first replaced by x + gate·update (a gate row per sample of the modulation's tokens, or of
    `residual.tokens` without one) or x + update, the block's residual add, which is written to `residual_out`
    (contiguous (M, K) in x's dtype): one pass over x fewer than adding it apart.
    `out`: an e4m3 (M, ≥ K) tensor, unit column stride, whose first K columns receive the codes (the FP8 path
    appends SVDQuant's low-rank activations behind them); it is returned as the codes.
    `lowrank` = (L1_q (K, R) e4m3, scale (1, R) float32): SVDQuant's P = (X_q · L1_q) · scale then fills the
    codes' last 2R columns, twice (the kernel of `ditq.kernels.triton.lowrank`; `out`, if given, is (M, K + 2R)).
    Launch of the one-pass kernel: `row_elements` (rows × padded width held per program at most) and `num_warps`
    (None: `UNSMOOTHED_LAUNCH`'s or `SMOOTHED_LAUNCH`'s). The defaults are from sweeps on an H200 at DiT-XL/2's batch-64
    inputs (`bench/bench_prepass.py` sweeps them; `bench/results/prepass_variants_h200.json` and
    `prepass_smoothed_grid_h200.json`). Unsmoothed: 2 rows of 1,152 in one warp, 1 row of 4,608 in two; a row in
    one warp reduces without shared memory (4 rows in 4 warps took 13% longer for LayerNorm + modulate).
    Smoothed: 8 rows of 1,152 in 8 warps, 2 rows of 4,608 in 8: fc2's GELU input's best while smoothing divided
    (163 µs against 258 at the unsmoothed launch); at 1,152 one launch for three inputs whose bests differ (up
    to 8.5 µs faster each), chosen while smoothing still divided rather than multiplied.
    """
    norm = norm or (None if modulation is None else Norm("layer", modulation.eps))
    m, k, token_period = _check_operands(x, inv_smooth, activation, modulation, out, norm, residual, residual_out,
                                         second, first_tokens)  # fmt: skip
    rank = 0 if lowrank is None else check_lowrank(k, *lowrank)
    concat, split, period, second_act = 0, 0, 1, "none"
    if second is not None and sum(row_tiles(k)) > MAX_RESIDENT:  # the multi-pass kernel reads one tensor
        x, activation = joined(x, second, activation, first_tokens)
        second = None
    elif second is not None:
        second = second if second.stride(-1) == 1 else second.contiguous()
        if first_tokens:
            concat, split, period = 2, first_tokens, token_period
        else:
            concat, split, second_act, activation = 1, x.shape[1], activation, "none"
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty(m, k + 2 * rank, dtype=torch.float8_e4m3fn, device=x.device) if out is None else out
    if rank and codes.shape[1] != k + 2 * rank:
        raise ValueError(f"out must have {k} + 2·{rank} columns with a rank-{rank} branch, got {codes.shape[1]}")
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:  # an empty batch: nothing to launch
        return codes, scales
    shift, scale_mod, gate = _sample_rows(modulation, residual, x)
    weight, bias = (None, None) if norm is None else (norm.weight, norm.bias)  # x in their place: never read
    common = dict(ACT=ACTIVATIONS[activation], NORM=0 if norm is None else NORM_CODES[norm.kind],
                  MODULATE=modulation is not None, NORM_WEIGHT=weight is not None, NORM_BIAS=bias is not None,
                  HAS_SMOOTH=inv_smooth is not None, EMULATE=interpreted())  # fmt: skip
    tokens = _sample_period(modulation, residual, period)
    head, tail = row_tiles(k)
    one_pass = head + tail <= MAX_RESIDENT
    if residual is not None and not one_pass:  # the multi-pass kernel reads x once per step: add it first
        x = residual_out.copy_(residual_added(x, residual, tokens))
    args = (x, x if inv_smooth is None else inv_smooth, shift, scale_mod, codes, scales, m, k, tokens,
            0.0 if norm is None else float(norm.eps), x.stride(0), codes.stride(0), shift.stride(0),
            x if weight is None else weight, x if bias is None else bias)  # fmt: skip
    if one_pass:
        block_m, warps = one_pass_launch(m, k, inv_smooth is not None, row_elements)
        update, x_new = (x, x) if residual is None else (residual.update.contiguous(), residual_out)
        second = x if second is None else second
        wrap_triton(_rows_one_pass_kernel)[(triton.cdiv(m, block_m),)](
            *args, update, gate, x_new, update.stride(0), x_new.stride(0), second, split, second.stride(0),
            ONE_SAMPLE=_one_sample(modulation, block_m), BLOCK_M=block_m, HEAD=head, TAIL=tail,
            RESIDUAL=0 if residual is None else 2 if residual.gate is None else 1,
            SECOND_ACT=ACTIVATIONS[second_act], CONCAT=concat, num_warps=num_warps or warps, **common,
        )  # fmt: skip
    else:
        block_m, block_k = MULTI_PASS_BLOCKS
        wrap_triton(_rows_multi_pass_kernel)[(triton.cdiv(m, block_m),)](
            *args, ONE_SAMPLE=_one_sample(modulation, block_m), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
            **common,
        )  # fmt: skip
    if rank:
        append_lowrank_codes(codes, *lowrank)
    return codes, scales


def joined(x: torch.Tensor, second: torch.Tensor, activation: str, first_tokens: int) -> tuple[torch.Tensor, str]:
    """(the rows `quantize_rows_fp8` quantizes with a `second` part, the activation left to apply to them)."""
    if not first_tokens:
        return torch.cat([x, activate(second, activation)], dim=-1), "none"
    samples, k = x.shape[0] // first_tokens, x.shape[1]
    parts = (x.reshape(samples, first_tokens, k), second.reshape(samples, -1, k))
    return torch.cat(parts, dim=1).reshape(-1, k), activation


def one_pass_launch(m: int, k: int, smoothed: bool, row_elements: int | None = None) -> tuple[int, int]:
    """The one-pass kernel's default launch for m rows of k: (rows per program, warps), both powers of two
    (`quantize_rows_fp8` says where they come from)."""
    head, tail = row_tiles(k)
    default_elements, per_thread = SMOOTHED_LAUNCH if smoothed else UNSMOOTHED_LAUNCH
    fits = max(1, (row_elements or default_elements) // (head + tail))
    block_m = min(1 << (fits.bit_length() - 1), triton.next_power_of_2(m))
    return block_m, min(8, triton.next_power_of_2(triton.cdiv(block_m * (head + tail), 32 * per_thread)))


def row_tiles(k: int) -> tuple[int, int]:
    """The one-pass kernel's two power-of-two column tiles for rows of k: (head, tail), tail 0 for a power of two."""
    head = 1 << (k.bit_length() - 1)
    return head, triton.next_power_of_2(k - head) if k > head else 0


def _gated(residual: Residual | None) -> bool:
    return residual is not None and residual.gate is not None


def _sample_period(modulation: Modulation | None, residual: Residual | None, default: int = 1) -> int:
    """The rows per row of the per-sample operands (shift, scale, gate): the modulation's tokens, else a gated
    residual's, else `default` (a token concatenation's period)."""
    if modulation is not None:
        return modulation.tokens
    return residual.tokens if _gated(residual) else default


def _sample_rows(modulation: Modulation | None, residual: Residual | None, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """shift, scale and gate (shift again without a gate; the gate in the place of all three without a
    modulation; x, never read, without either) with unit column stride and one row stride between them, as the
    kernel reads them; adaLN's chunks of one tensor already are (no copy)."""
    if modulation is None:
        gate = residual.gate.contiguous() if _gated(residual) else x
        return gate, gate, gate
    gate = residual.gate if _gated(residual) else modulation.shift
    rows = (modulation.shift, modulation.scale, gate)
    if any(t.stride(1) != 1 or t.stride(0) != rows[0].stride(0) for t in rows):
        return tuple(t.contiguous() for t in rows)
    return rows


def _one_sample(modulation: Modulation | None, block_m: int) -> bool:
    """Whether every program's `block_m` rows are tokens of one sample (one row of shift, scale and gate for all)."""
    return modulation is not None and modulation.tokens % block_m == 0


def _check_operands(
    x: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    activation: str,
    modulation: Modulation | None,
    out: torch.Tensor | None,
    norm: Norm | None = None,
    residual: Residual | None = None,
    residual_out: torch.Tensor | None = None,
    second: torch.Tensor | None = None,
    first_tokens: int = 0,
) -> tuple[int, int, int]:
    """(M, K, tokens per sample of a token concatenation (T₁ + T₂; else 1)), or a ValueError naming what the
    kernel would read or write wrongly."""
    period = 1
    if x.ndim != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_rows_fp8 takes a 2-D float x (tokens, channels), got {x.dtype} {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    m, k = x.shape
    if second is not None and first_tokens:
        samples = m // first_tokens
        if first_tokens < 0 or m % first_tokens or second.ndim != 2 or second.shape[1] != k or second.dtype != x.dtype:
            raise ValueError(f"a token concatenation takes x of whole samples of first_tokens={first_tokens} rows and "
                             f"second {x.dtype} (rows, {k}), got x {tuple(x.shape)}, second {second.dtype} "
                             f"{tuple(second.shape)}")  # fmt: skip
        if (second.shape[0] % samples if samples else second.shape[0]) or residual is not None:
            raise ValueError(f"second's {second.shape[0]} rows must be whole tokens of x's {samples} samples, and "
                             "a token concatenation takes no residual")  # fmt: skip
        period = first_tokens + (second.shape[0] // samples if samples else 0)  # tokens per sample: T₁ + T₂
        if modulation is not None and modulation.tokens != period:
            raise ValueError(f"modulation.tokens={modulation.tokens} must be the concatenation's {period} tokens per "
                             "sample")  # fmt: skip
        m += second.shape[0]
    elif second is not None:
        if second.ndim != 2 or second.shape[0] != m or second.shape[1] == 0 or second.dtype != x.dtype:
            raise ValueError(f"second must be {x.dtype} ({m}, K₂ ≥ 1) like x's rows, got {second.dtype} "
                             f"{tuple(second.shape)}")  # fmt: skip
        if norm is not None or modulation is not None or residual is not None:
            raise ValueError("a concatenation (second) takes no norm, modulation or residual")
        k += second.shape[1]
    elif first_tokens:
        raise ValueError(f"first_tokens={first_tokens} needs a second part")
    if inv_smooth is not None and (tuple(inv_smooth.shape) != (k,) or not inv_smooth.is_contiguous()):
        raise ValueError(f"inv_smooth must be contiguous ({k},), got {tuple(inv_smooth.shape)}")
    if out is not None and (out.dtype != torch.float8_e4m3fn or out.ndim != 2 or out.shape[0] != m
                            or out.shape[1] < k or out.stride(1) != 1):  # fmt: skip
        raise ValueError(f"out must be e4m3 ({m}, >= {k}) with unit column stride, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")  # fmt: skip
    if activation != "none" and (norm is not None or residual is not None):
        raise ValueError("a norm or a residual takes activation 'none' (the activation would come first), "
                         f"got {activation!r}")  # fmt: skip
    if norm is not None:
        _check_norm(norm, x)
    if modulation is not None:
        if modulation.tokens < 1 or m % modulation.tokens:
            raise ValueError(f"{m} rows are not whole samples of modulation.tokens={modulation.tokens}")
        samples = m // modulation.tokens
        per_sample = [("modulation shift", modulation.shift), ("modulation scale", modulation.scale)]
        gate = [] if residual is None or residual.gate is None else [("residual gate", residual.gate)]
        for name, t in per_sample + gate:
            if tuple(t.shape) != (samples, k) or t.dtype != x.dtype:
                raise ValueError(f"{name} must be ({samples}, {k}) in {x.dtype} for {m} rows of "
                                 f"{modulation.tokens} tokens, got {t.dtype} {tuple(t.shape)}")  # fmt: skip
    if residual is not None:
        if _gated(residual) and modulation is None:
            if residual.tokens < 1 or m % residual.tokens:
                raise ValueError(f"a gated residual reads its gate per sample: without a modulation, its tokens "
                                 f"must divide the {m} rows, got tokens={residual.tokens}")  # fmt: skip
            if tuple(residual.gate.shape) != (m // residual.tokens, k) or residual.gate.dtype != x.dtype:
                raise ValueError(f"residual gate must be ({m // residual.tokens}, {k}) in {x.dtype} for {m} rows of "
                                 f"{residual.tokens} tokens, got {residual.gate.dtype} "
                                 f"{tuple(residual.gate.shape)}")  # fmt: skip
        if residual.update.shape != x.shape or residual.update.dtype != x.dtype:
            raise ValueError(f"residual update must be {x.dtype} {tuple(x.shape)} like x, got "
                             f"{residual.update.dtype} {tuple(residual.update.shape)}")  # fmt: skip
        if (residual_out is None or residual_out.shape != x.shape or residual_out.dtype != x.dtype
                or not residual_out.is_contiguous()):  # fmt: skip
            got = None if residual_out is None else f"{residual_out.dtype} {tuple(residual_out.shape)}"
            raise ValueError(f"residual_out must be contiguous {x.dtype} {tuple(x.shape)} with a residual, got {got}")
    return m, k, period


def _check_norm(norm: Norm, x: torch.Tensor) -> None:
    """A ValueError naming what of `norm` the kernel cannot apply to x's rows."""
    if norm.kind not in NORMS:
        raise ValueError(f"norm {norm.kind!r} is not one of {NORMS}")
    if norm.kind == "rms" and norm.bias is not None:
        raise ValueError("norm 'rms' takes no bias (F.rms_norm has none; 'rms_cast' adds one)")
    for name, t in (("norm weight", norm.weight), ("norm bias", norm.bias)):
        if t is not None and (tuple(t.shape) != (x.shape[1],) or t.dtype != x.dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous ({x.shape[1]},) in {x.dtype}, got {t.dtype} "
                             f"{tuple(t.shape)}")  # fmt: skip


def quantize_rows_fp8_reference(
    x: torch.Tensor,
    inv_smooth: torch.Tensor | None = None,
    activation: str = "none",
    modulation: Modulation | None = None,
    residual: Residual | None = None,
    norm: Norm | None = None,
    second: torch.Tensor | None = None,
    first_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in PyTorch, as the FP8 backend computes it without the kernel (with a residual, of the sum
    `residual_added` returns)."""
    if second is not None:
        x, activation = joined(x, second, activation, first_tokens)
    if residual is not None:
        x = residual_added(x, residual, _sample_period(modulation, residual))
    if modulation is not None:
        h = modulated(x, modulation, norm)
    else:
        h = activate(x, activation) if norm is None else normalized(x, norm)
    h = smoothed_by_reciprocal(h, inv_smooth)
    scales = fp8_scale(h)
    return fp8_cast(h, scales), scales

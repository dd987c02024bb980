"""y = x · Ŵᵀ (+ bias) straight from packed 2–4-bit codes, for the few-token GEMMs that are bound by weight bytes.

At M ≤ 128 rows (the adaLN modulation Linears see one row per sample; small batches) a GEMM streams its
weights once and does little arithmetic, so reading 4-bit (or ternary 2-bit) codes instead of bf16 weights
is what makes it faster. Each program owns a (BLOCK_M, BLOCK_N) output tile and walks K: it loads packed
bytes of BLOCK_N weight rows (contiguous along K), splits them into codes in registers, and multiplies the
activation tile by the integer codes — exact in bf16 — so the scale (and zero point) is applied once per
group of K to the fp32 partial sum, or once at the end for per-channel scales:

    acc[m, n] = Σ_groups s[n, g] · Σ_{k ∈ g} x[m, k] · (q[n, k] − z[n, g])

Works for any activation spec: the activations are fake-quantized by ordinary ops before the call (under
`torch.compile` fused into their producer). Reads the canonical packing of `ditq.quant.packing`.

Given FP8 e4m3 activation codes and their per-row scales instead (W4A8-FP8: the FP8 backends' pre-pass
output), the codes are converted to e4m3 in registers — symmetric |q| ≤ 8 is exact there — and the tile
product runs on FP8 tensor cores; the row scale joins the channel scale in the epilogue:

    y[m, n] = s_x[m] · Σ_groups s[n, g] · Σ_{k ∈ g} x_q[m, k] · q[n, k]

so the weights stay 2–4-bit in memory and are never expanded to an 8-bit copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ditq.kernels.triton import FP8_K_STEP, interpreted
from ditq.quant.packing import packed_cols, slot_bits

__all__ = ["effective_split", "lowbit_linear", "lowbit_linear_reference"]

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _unpack_tile(byte, SLOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K // per_byte) uint8 → (BLOCK_N, BLOCK_K) int32 codes in column order."""
    mask: tl.constexpr = (1 << SLOT) - 1
    if SLOT == 4:
        codes = tl.join(byte & mask, byte >> 4)
    else:  # four codes per byte: join(join(c0, c2), join(c1, c3)) flattens to c0, c1, c2, c3
        codes = tl.join(tl.join(byte & mask, (byte >> 4) & mask), tl.join((byte >> 2) & mask, byte >> 6))
    return tl.reshape(codes, (BLOCK_N, BLOCK_K)).to(tl.int32)


@triton.jit
def _lowbit_gemm_kernel(
    x,
    x_scale,
    packed,
    scales,
    zeros,
    bias,
    out,
    M,
    N,
    K: tl.constexpr,
    n_bytes,
    n_groups,
    stride_xm,
    stride_om,
    stride_os,
    SLOT: tl.constexpr,
    OFFSET: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_XSCALE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """GROUP = 0: one scale per output channel; else K-columns per scale group, a multiple of BLOCK_K. K is a
    compile-time constant (a layer's width; also what Triton's CPU interpreter needs for a loop bound).
    FP32_DOT: multiply in IEEE float32 (float32 inputs, and the interpreter, whose bf16 dot is wrong).
    HAS_XSCALE: x holds e4m3 codes with one scale per row; the codes are multiplied as e4m3 (no zero points).
    SPLIT_K > 1: program (·, ·, s) sums the s-th of SPLIT_K runs of K steps into its own float32 slice of `out`
    (stride `stride_os`), scaled (every term is linear in it), with the bias in slice 0 only."""
    PER_BYTE: tl.constexpr = 8 // SLOT
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // PER_BYTE)
    rk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rm < M, rn < N
    x_rows = x + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = packed + rn.to(tl.int64)[:, None] * n_bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    SPAN: tl.constexpr = (K + BLOCK_K * SPLIT_K - 1) // (BLOCK_K * SPLIT_K) * BLOCK_K  # K columns per split
    split = tl.program_id(2)
    for step in range(0, SPAN, BLOCK_K):
        k0 = split * SPAN + step
        a = tl.load(x_rows + (k0 + rk)[None, :], mask=row_ok[:, None] & (k0 + rk < K)[None, :], other=0.0)
        byte = tl.load(
            w_rows + (k0 // PER_BYTE + rb)[None, :],
            mask=col_ok[:, None] & (k0 // PER_BYTE + rb < n_bytes)[None, :],
            other=0,
        )
        q = _unpack_tile(byte, SLOT, BLOCK_N, BLOCK_K) - OFFSET  # (BLOCK_N, BLOCK_K)
        w = q.to(tl.float32)
        if HAS_ZEROS:
            g = 0 if GROUP == 0 else k0 // GROUP
            w -= tl.load(zeros + rn * n_groups + g, mask=col_ok & (k0 < K), other=0.0).to(tl.float32)[:, None]
        if FP32_DOT:  # e4m3 codes and small integers are exact in float32
            part = tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee", out_dtype=tl.float32)
        else:
            part = tl.dot(a, tl.trans(w.to(a.dtype)), out_dtype=tl.float32)
        if GROUP == 0:
            acc += part
        else:
            s = tl.load(scales + rn * n_groups + k0 // GROUP, mask=col_ok & (k0 < K), other=0.0).to(tl.float32)
            acc += part * s[None, :]
    if GROUP == 0:
        acc *= tl.load(scales + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_XSCALE:
        acc *= tl.load(x_scale + rm, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=col_ok & (split == 0), other=0.0).to(tl.float32)[None, :]
    tl.store(
        out + split.to(tl.int64) * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :],
        acc.to(out.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def lowbit_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    offset: int,
    group_size: int | None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    split_k: int = 1,
) -> torch.Tensor:
    """x (M, K) · Ŵᵀ + bias in x's dtype; Ŵ = scales · (codes − offset − zeros) from the packed uint8 codes.
    With `x_scale` (M, 1) float32, x holds e4m3 codes of x_scale⁻¹ · x, multiplied on FP8 tensor cores, and the
    output is `out_dtype`.

    `split_k` > 1 splits K's steps over up to that many programs per output tile, each writing a float32 partial
    that one reduction sums (in a fixed order: deterministic): more weight bytes in flight when there are few rows,
    for one more launch. Every program gets the same number of steps, so fewer programs than asked when they do
    not divide (9 steps in 4 → 3 programs of 3; `effective_split`). 1 by default: no GPU timing shows a gain yet
    (`bench/bench_weight_bound.py` sweeps it).

    The default launch config is the best of a sweep at DiT-XL/2's few-row shapes on an H100
    (`bench/results/lowbit_tuning_h100.json`): 32 output channels per program, K blocks of 256 for K ≥ 4096 and
    of 128 below (never more than the largest power of two dividing the group size), 4 warps, 3 stages. On e4m3
    codes, K blocks of 128, and of more than 64 rows, tiles of 128 rows × 64 channels (the best launch at
    512–16,384 rows on an H200, `bench/results/w4a8_gemm_h200.md`). Its FP8 products accumulate as Triton's
    `tl.dot` lets them by default on sm_90 (`max_num_imprecise_acc_default` = 2³⁰): in the tensor cores' reduced
    precision over the whole K loop, where cuBLAS's `_scaled_mm` without fast accumulation promotes to float32;
    within the tests' tolerance (1e-3 relative, H200).
    """
    m, k, n = _check_operands(x, qweight, scales, zeros, bias, bits, group_size, x_scale)
    if x_scale is not None and out_dtype is None:
        raise ValueError("e4m3 activation codes need an out_dtype (float32, bfloat16 or float16)")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in FLOATS:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if x_scale is not None and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
        raise ValueError("e4m3 activation codes need FP8 tensor cores (compute capability 8.9+)")
    if x_scale is not None and block_k is not None and block_k < FP8_K_STEP:
        raise ValueError(f"e4m3 activation codes need K blocks of at least {FP8_K_STEP}, got block_k={block_k}")
    block_k = block_k or (256 if k >= 4096 and x_scale is None else 128)  # e4m3 codes: 256 was never timed
    if group_size:
        block_k = min(block_k, group_size & -group_size)  # a power of two dividing the group: ≥ 16 here
    x = x if x.stride(-1) == 1 else x.contiguous()
    x_scale = None if x_scale is None else x_scale.reshape(m).contiguous()  # one float per row, in row order
    if split_k < 1:
        raise ValueError(f"split_k must be at least 1, got {split_k}")
    split_k = effective_split(k, block_k, split_k)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    partials = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    many_codes = x_scale is not None and m > 64
    block_m = block_m or (128 if many_codes else max(16, min(64, triton.next_power_of_2(m))))
    block_n = block_n or (64 if many_codes else 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)  # rows on axis 0: no 65,535-block limit
    wrap_triton(_lowbit_gemm_kernel)[grid](
        x, scales if x_scale is None else x_scale, qweight, scales, scales if zeros is None else zeros,
        x if bias is None else bias, partials, m, n, k, qweight.shape[1], scales.shape[1], x.stride(0), n,
        m * n, SLOT=slot_bits(bits), OFFSET=offset, GROUP=group_size or 0, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, HAS_XSCALE=x_scale is not None,
        FP32_DOT=x.dtype == torch.float32 or interpreted(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out if split_k == 1 else out.copy_(partials.sum(0))


def effective_split(k: int, block_k: int, split_k: int) -> int:
    """How many programs `split_k` gives K's steps of `block_k` once each takes an equal share: none is idle."""
    steps = triton.cdiv(k, block_k)
    return triton.cdiv(steps, triton.cdiv(steps, split_k))


def _check_operands(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    x_scale: torch.Tensor | None,
) -> tuple[int, int, int]:
    """(M, K, N), or a ValueError naming the operand that does not fit: the kernel would read it wrongly."""
    codes = x_scale is not None
    if x.dtype == torch.float8_e4m3fn and not codes:
        raise ValueError("e4m3 activation codes need their row scales (x_scale)")
    if x.ndim != 2 or x.dtype not in ((torch.float8_e4m3fn,) if codes else FLOATS):
        kind = "e4m3 codes (with x_scale)" if codes else "float"
        raise ValueError(f"lowbit_linear takes a 2-D {kind} x (tokens, channels), got {x.dtype} {tuple(x.shape)}")
    if codes and (x_scale.dtype != torch.float32 or x_scale.numel() != x.shape[0]):
        raise ValueError(f"x_scale must be {x.shape[0]} float32 row scales, got {x_scale.dtype} {tuple(x_scale.shape)}")
    if codes and zeros is not None:
        raise ValueError("e4m3 activation codes take symmetric weights only (zeros must be None)")
    if codes and group_size is not None and group_size % FP8_K_STEP:
        raise ValueError(f"e4m3 activation codes need group sizes that are multiples of {FP8_K_STEP}, got {group_size}")
    if slot_bits(bits) == 8:
        raise ValueError(f"lowbit_linear takes 2–4-bit codes; got bits={bits}")
    m, k = x.shape
    if qweight.dtype != torch.uint8 or qweight.ndim != 2 or not qweight.is_contiguous():
        raise ValueError(
            f"qweight must be a contiguous 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n, n_bytes = qweight.shape
    if n_bytes != packed_cols(k, bits):
        raise ValueError(
            f"qweight has {n_bytes} bytes per row; {k} {bits}-bit codes need {packed_cols(k, bits)}"
        )
    if group_size is not None and (group_size % 16 or k % group_size):
        raise ValueError(f"group_size={group_size} must be a multiple of 16 that divides K={k}")
    groups = k // group_size if group_size else 1
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and (tuple(t.shape) != (n, groups) or not t.is_contiguous()):
            raise ValueError(
                f"{name} must be contiguous ({n}, {groups}) for group_size={group_size}, got {tuple(t.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return m, k, n


def lowbit_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same with the dequantized weight Ŵ (N, K), in float32."""
    y = x.float() @ weight.float().t()
    return (y if bias is None else y + bias.float()).to(x.dtype)

"""SVDQuant's low-rank activations for the FP8 GEMM, from the input's e4m3 codes, in one kernel.

    codes (M, K + 2R): X_q in [0, K) ──► P = (X_q · L1_q) · scale per rank column ──► e4m3 P into [K, K + R)
                                                                                  and into [K + R, K + 2R)

One program holds BLOCK_M rows' (BLOCK_M, R) accumulator and walks K with FP8 tensor-core dots. It replaces a
cuBLAS GEMM of N = R and the casts and copies around it: inside a compiled forward those small launches, one
set per layer, left the GPU idle (DiT-XL/2 SVDQuant at batch 64: 42–48 ms for about 30 ms of kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ditq.kernels.triton import interpreted
from ditq.kernels.triton.rounding import rounded
from ditq.quant.primitives import FP8_MAX

__all__ = ["append_lowrank_codes", "append_lowrank_codes_reference", "check_lowrank"]

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _lowrank_codes_kernel(
    codes, down, down_scale, M, stride_cm, K: tl.constexpr, R: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """K is a compile-time constant (a layer's width; also what Triton's CPU interpreter needs for a loop
    bound). EMULATE: fp32 dots and integer rounding, for the interpreter."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rk, rr = tl.arange(0, BLOCK_K), tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + rk
        a = tl.load(codes + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :],
                    mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)  # fmt: skip
        b = tl.load(down + cols[:, None] * R + rr[None, :], mask=(cols < K)[:, None], other=0.0)  # (BLOCK_K, R)
        if EMULATE:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    p = acc * tl.load(down_scale + rr)[None, :]
    p = rounded(tl.minimum(tl.maximum(p, -_FP8_MAX), _FP8_MAX), tl.float8e4nv, EMULATE).to(tl.float8e4nv)
    out = codes + rows.to(tl.int64)[:, None] * stride_cm + K + rr[None, :]
    tl.store(out, p, mask=row_ok[:, None])
    tl.store(out + R, p, mask=row_ok[:, None])


def append_lowrank_codes(
    codes: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    *,
    block_m: int = 128,
    block_k: int = 256,
    num_warps: int = 4,
    num_stages: int = 3,
) -> None:
    """Fill the last 2·R columns of `codes` (M, K + 2R) e4m3 with e4m3((X_q · L1_q) · `down_scale`), twice;
    X_q = its first K columns, `down` = L1_q (K, R) e4m3, `down_scale` (1, R) float32, R a power of two ≥ 16.
    The launch (`block_m`, `block_k`, `num_warps`, `num_stages`) is the best of a sweep on an H200 at 16,384 rows,
    rank 32 (`bench/bench_lowrank_gemm.py --sweep`, `bench/results/lowrank_sweep_h200.md`: 8.7 µs at K = 1,152
    and 34.4 µs at 4,608, against 10.1 and 41.0 µs for the launch before)."""
    k = down.shape[0]
    rank = check_lowrank(k, down, down_scale)
    if (
        codes.dtype != torch.float8_e4m3fn
        or codes.ndim != 2
        or codes.shape[1] != k + 2 * rank
        or codes.stride(1) != 1
    ):
        raise ValueError(f"codes must be e4m3 (M, {k} + 2·{rank}) with unit column stride, got {codes.dtype} "
                         f"{tuple(codes.shape)}")  # fmt: skip
    m = codes.shape[0]
    if m == 0:
        return
    wrap_triton(_lowrank_codes_kernel)[(triton.cdiv(m, block_m),)](
        codes, down, down_scale.contiguous(), m, codes.stride(0), K=k, R=rank, EMULATE=interpreted(),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def check_lowrank(k: int, down: torch.Tensor, down_scale: torch.Tensor) -> int:
    """The rank R of a branch over K = k input columns, or a ValueError naming what the kernels would misread."""
    if (down.dtype != torch.float8_e4m3fn or down.ndim != 2 or down.shape[0] != k or down.shape[1] < 16
            or down.shape[1] & (down.shape[1] - 1) or not down.is_contiguous()):  # fmt: skip
        raise ValueError(f"down must be contiguous e4m3 ({k}, R) with R a power of two >= 16, got {down.dtype} "
                         f"{tuple(down.shape)}")  # fmt: skip
    rank = down.shape[1]
    if tuple(down_scale.shape) != (1, rank) or down_scale.dtype != torch.float32:
        raise ValueError(
            f"down_scale must be float32 (1, {rank}), got {down_scale.dtype} {tuple(down_scale.shape)}"
        )
    return rank


def append_lowrank_codes_reference(codes: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor) -> None:
    """The same in PyTorch (float32 products of the e4m3 values, which are exact)."""
    k, rank = down.shape
    p = (codes[:, :k].float() @ down.float()) * down_scale
    p = p.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    codes[:, k : k + rank] = p
    codes[:, k + rank :] = p

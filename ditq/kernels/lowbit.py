"""The `"lowbit"` backend: GEMMs that read the packed 2–4-bit codes themselves (Triton), weights never expanded.

For few-token GEMMs (adaLN modulation, small batches) the weight bytes are the cost, and this path reads a
quarter (int4) or an eighth (ternary) of bf16's. Any activation spec works: smoothing, activation
quantization and the low-rank branch are the oracle's own ops around the kernel (`linear_with`), so under
`torch.compile` they fuse with their neighbours. Runs on CUDA GPUs with bf16 tensor cores (sm_80+: also
the Ampere path) and on the CPU under `TRITON_INTERPRET=1` (tests). The `"fp8"` backend sends its few-row
calls here too (`LOWBIT_MAX_ROWS`).
"""

from __future__ import annotations

import torch

from ditq.kernels.reference import linear_with, smoothed_by_reciprocal
from ditq.kernels.triton import device_support, kernel_op
from ditq.quant.packing import signed_offset
from ditq.quant.qlinear import QuantLinear

__all__ = ["LOWBIT_MAX_ROWS", "code_offset", "lowbit_forward", "lowbit_gemm", "lowbit_support"]

# Few-row GEMMs are weight-bound; at 512 rows this kernel is 2–3× slower than cuBLAS (H100).
LOWBIT_MAX_ROWS = 128
MIN_CAPABILITY = (8, 0)


def _lowbit_fake(x, qweight, scales, zeros, bias, bits, offset, group_size, x_scale=None, out_dtype=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=out_dtype or x.dtype)


@kernel_op("ditq::lowbit_gemm", fake=_lowbit_fake)
def lowbit_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    offset: int,
    group_size: int,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x (..., K) · Ŵᵀ + bias from packed codes; Ŵ = scales · (codes − offset − zeros); group_size 0 = per channel.
    With `x_scale` (rows, 1), x holds e4m3 codes (W4A8-FP8 on FP8 tensor cores) and the output is `out_dtype`."""
    from ditq.kernels.triton.lowbit_gemm import lowbit_linear

    k = x.shape[-1]
    y = lowbit_linear(x.reshape(-1, k), qweight, scales, zeros, bias, bits=bits, offset=offset,
                      group_size=group_size or None, x_scale=x_scale, out_dtype=out_dtype)  # fmt: skip
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def lowbit_forward(m: QuantLinear, x: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """m(x) through the lowbit kernel. `inv_smooth` (float32 (in,), the FP8 backends' few-row route): smooth by
    that product in float32 instead of dividing by `m.input_smooth`, as the FP8 backends smooth; the quantized input
    then meets the kernel in x's dtype, and the low-rank branch runs in float32."""
    spec = m.spec
    offset = code_offset(m)
    bias = None if m.bias is None else m.bias.to(x.dtype)

    def matmul(h_q: torch.Tensor) -> torch.Tensor:
        return lowbit_gemm(h_q.to(x.dtype), m.qweight, m.scales, m.zeros, bias, spec.w_bits, offset,
                           spec.group_size or 0)  # fmt: skip

    h = smoothed_by_reciprocal(x, inv_smooth)
    smooth = m.input_smooth if inv_smooth is None else None
    y = linear_with(matmul, h, smooth, m.lowrank_down, m.lowrank_up, m.act_scale, m.act_zero, spec)
    return y.to(x.dtype)


def code_offset(m: QuantLinear) -> int:
    """What the kernels subtract from `m`'s stored codes: the signed offset of symmetric codes, else 0."""
    spec = m.spec
    return signed_offset(spec.w_bits, spec.w_format == "ternary") if spec.symmetric else 0


def lowbit_support(m: QuantLinear) -> str | None:
    """None when the lowbit kernel can run `m`, else why not."""
    spec = m.spec
    unsupported = device_support(m.qweight.device, MIN_CAPABILITY, "bf16 tensor cores", "Triton")
    if unsupported:
        return unsupported
    if spec.w_bits > 4 or spec.code_bits != spec.w_bits:
        return "weights must be int2–int4 (or ternary), served at their stored bits"
    if spec.group_size is not None and spec.group_size % 16:
        return "group sizes must be multiples of 16"
    return None

"""W4A8-FP8 on Hopper: int2–int4 or ternary weights expanded to FP8 e4m3, per-token FP8 activations, cuBLAS FP8.

    x ──(one Triton pass: ÷smooth, row absmax, e4m3 codes)──► X_q, s_x ┐
    packed codes ──(Triton: exact e4m3 expansion)──► W_q ────────────────┼─► _scaled_mm(X_q, W_qᵀ, s_x, s_w) + b
    (x ÷ smooth) · L1 · L2  (low-rank branch, bf16) ─────────────────────┘

Per-channel weight scales only: |q| ≤ 8 is exact in e4m3 and the scale goes to the GEMM's `scale_b`
(per-group scales need a fused kernel). Two backends: `"fp8"` expands the codes on every call (weights stay
4-bit in memory; the expansion costs a few µs per layer), `"fp8-cached"` expands once in
`prepare_for_inference` (8-bit weights in memory, no per-call expansion). Both run on CUDA devices with FP8
tensor cores (sm_89+), and on the CPU under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ditq.kernels import ops
from ditq.quant.qlinear import QuantLinear

__all__ = ["fp8_linear", "fp8_support"]

MIN_CAPABILITY = (8, 9)


@torch.library.custom_op("ditq::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_fp8: torch.Tensor | None,
    scale_w: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    spec: str,
) -> torch.Tensor:
    """y = QuantLinear(x) through an FP8 GEMM; `weight_fp8` (N, K) when expanded ahead, else from `qweight`."""
    from ditq.kernels.triton.act_quant import quantize_rows_fp8
    from ditq.kernels.triton.expand import expand_to_fp8

    s = ops.parse_spec(spec)
    n_out, k = scale_w.shape[1], x.shape[-1]
    x2 = x.reshape(-1, k)
    x_q, scale_x = quantize_rows_fp8(x2, smooth)  # (M, K) e4m3, (M, 1)
    if weight_fp8 is None:
        weight_fp8 = expand_to_fp8(qweight, s.w_bits, k, ternary=s.w_format == "ternary")  # (N, K)
    fused_bias = bias is not None and x.dtype in (torch.bfloat16, torch.float16)
    y = torch._scaled_mm(x_q, weight_fp8.t(), scale_a=scale_x, scale_b=scale_w,
                         bias=bias.to(x.dtype) if fused_bias else None, out_dtype=x.dtype)  # (M, N)
    if bias is not None and not fused_bias:
        y = y + bias.to(x.dtype)
    if lowrank_down is not None:
        h = x2 if smooth is None else x2 / smooth.to(x.dtype)
        y = y + (h @ lowrank_down.to(x.dtype)) @ lowrank_up.to(x.dtype)
    return y.reshape(*x.shape[:-1], n_out)


@fp8_linear.register_fake
def _(x, qweight, weight_fp8, scale_w, bias, smooth, lowrank_down, lowrank_up, spec):
    return x.new_empty((*x.shape[:-1], scale_w.shape[1]))


def fp8_support(m: QuantLinear) -> str | None:
    """None when the FP8 backends can run `m`, else why not."""
    spec = m.spec
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    device = m.qweight.device
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
            return "FP8 tensor cores need compute capability 8.9+"
    elif not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"no FP8 kernels on {device.type}"
    if spec.w_format == "int" and not (spec.symmetric and spec.w_bits <= 4 and spec.code_bits == spec.w_bits):
        return "weights must be symmetric int2–int4 (or ternary), served at their stored bits"
    if spec.group_size is not None:
        return "per-group weight scales need the fused kernel; per-channel only"
    if (spec.a_bits, spec.a_format, spec.a_group_size, spec.a_dynamic) != (8, "fp8", None, True):
        return "activations must be dynamic per-token FP8"
    if m.in_features % 16 or m.out_features % 16:
        return "FP8 GEMMs need in/out features divisible by 16"
    return None


def per_call_forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return fp8_linear(x, m.qweight, None, m.fp8_scale_w, m.bias, m.smooth, m.lowrank_down, m.lowrank_up, m.spec_json)


def cached_forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return fp8_linear(x, m.qweight, m.weight_fp8, m.fp8_scale_w, m.bias, m.smooth, m.lowrank_down, m.lowrank_up,
                      m.spec_json)


def weight_scale(m: QuantLinear) -> dict[str, torch.Tensor]:
    """The per-channel scales as cuBLAS's row-wise `scale_b` (1, N)."""
    return {"fp8_scale_w": m.scales.reshape(1, m.out_features).float().contiguous()}


def expanded_weight(m: QuantLinear) -> dict[str, torch.Tensor]:
    from ditq.kernels.triton.expand import expand_to_fp8

    ternary = m.spec.w_format == "ternary"
    return weight_scale(m) | {"weight_fp8": expand_to_fp8(m.qweight, m.spec.w_bits, m.in_features, ternary=ternary)}

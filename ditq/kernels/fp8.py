"""W4A8-FP8 on Hopper: int2–int4 or ternary weights expanded to FP8 e4m3, per-token FP8 activations, cuBLAS FP8.

    x ──(÷smooth, row absmax, e4m3 codes: ordinary ops)──► X_q, s_x ───┐
    packed codes ──(Triton op `ditq::expand_fp8`: exact e4m3)──► W_q ──┼─► _scaled_mm(X_q, W_qᵀ, s_x, s_w) + b
    (x ÷ smooth) · L1 · L2  (low-rank branch, in x's dtype) ──────────┘

The activation quantization is left as ordinary PyTorch ops on purpose: under `torch.compile` they fuse
into the kernel that produces x (LayerNorm + adaLN modulate, ...), so quantizing costs no extra pass over
the activations — a separate quantization kernel (the first version of this backend, and torchao's float8)
re-reads every activation once more, which cost more than the FP8 GEMMs saved. The exceptions are the
producers inductor fuses badly with a row reduction (`ditq.kernels.fusion` moves them): a layer's
`input_activation` (an MLP's GELU moved into its second Linear) and a DiT block's LayerNorm + adaLN modulate
(`fp8_linear` with a `Modulation`). There the Triton op `ditq::quantize_rows_fp8` applies the producer, the smoothing
and the row scale in one read of each row (several, with a low-rank down-projection on the way).
Per-channel weight scales only: |q| ≤ 8 is exact in e4m3 and the scale goes to the GEMM's `scale_b`
(per-group scales need a fused kernel). Two backends: `"fp8"` expands the codes on every call (weights stay
2–4-bit in memory; the expansion costs a few µs per layer), `"fp8-cached"` expands once in
`prepare_for_inference` (8-bit weights in memory, no per-call expansion). `"fp8"` sends calls of at most
`LOWBIT_MAX_ROWS` rows, bound by weight bytes, to the `"lowbit"` kernel instead, which reads the packed codes
directly (activations fake-quantized to the same FP8 values) rather than expanding them. Both run on CUDA devices with FP8
tensor cores (sm_89+), and on the CPU under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import torch

from ditq.kernels.lowbit import LOWBIT_MAX_ROWS, lowbit_forward
from ditq.kernels.reference import Modulation
from ditq.kernels.triton import device_support
from ditq.quant.primitives import fp8_cast, fp8_scale
from ditq.quant.qlinear import QuantLinear

__all__ = ["FP8_BACKENDS", "expand_fp8", "fp8_linear", "fp8_support", "quantize_rows", "uses_few_row_path"]

MIN_CAPABILITY = (8, 9)
FP8_BACKENDS = ("fp8", "fp8-cached")


@torch.library.custom_op("ditq::expand_fp8", mutates_args=())
def expand_fp8(qweight: torch.Tensor, bits: int, n_cols: int, ternary: bool) -> torch.Tensor:
    """(N, n_cols) float8_e4m3fn codes from packed uint8 (N, packed_cols) symmetric int or ternary codes."""
    from ditq.kernels.triton.expand import expand_to_fp8

    return expand_to_fp8(qweight, bits, n_cols, ternary=ternary)


@expand_fp8.register_fake
def _(qweight, bits, n_cols, ternary):
    return qweight.new_empty((qweight.shape[0], n_cols), dtype=torch.float8_e4m3fn)


@torch.library.custom_op("ditq::quantize_rows_fp8", mutates_args=())
def quantize_rows(
    x: torch.Tensor,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    activation: str,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    tokens: int = 1,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 codes (M, K), float32 row scales (M, 1), down (M, rank; rank 0 without L1)) of
    h = activation(x), or modulate(LayerNorm(x), shift, scale) with a shift, [/ smooth], x (M, K), by the
    Triton pre-pass."""
    from ditq.kernels.triton.rowquant import quantize_rows_fp8

    modulation = None if shift is None else Modulation(shift, scale, tokens, eps)
    codes, scales, down = quantize_rows_fp8(x, smooth, lowrank_down, activation, modulation)
    return codes, scales, x.new_empty((x.shape[0], 0)) if down is None else down


@quantize_rows.register_fake
def _(x, smooth, lowrank_down, activation, shift=None, scale=None, tokens=1, eps=0.0):
    rank = 0 if lowrank_down is None else lowrank_down.shape[1]
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32),
            x.new_empty((x.shape[0], rank)))  # fmt: skip


def fp8_linear(m: QuantLinear, x: torch.Tensor, modulation: Modulation | None = None) -> torch.Tensor:
    """y = m(x), or m(modulate(LayerNorm(x), shift, scale)) with a `modulation`, through one FP8 GEMM with
    row-wise scales on both sides; `m` runs on an FP8 backend."""
    k = x.shape[-1]
    down_weight = None if m.lowrank_down is None else m.lowrank_down.to(x.dtype)
    if m.input_activation is None and modulation is None:  # ordinary ops, fused by the compiler into x's producer
        h = (x if m.smooth is None else x / m.smooth.to(x.dtype)).reshape(-1, k)  # (M, K)
        scale_x = fp8_scale(h)  # (M, 1) float32
        codes = fp8_cast(h, scale_x)
        down = None if down_weight is None else h @ down_weight  # (M, rank)
    else:
        codes, scale_x, down = quantize_rows(x.reshape(-1, k), m.smooth, down_weight, m.input_activation or "none",
                                             *(modulation or ()))  # fmt: skip
    fused_bias = m.bias is not None and x.dtype in (torch.bfloat16, torch.float16)
    y = torch._scaled_mm(
        codes,
        _weight_codes(m).t(),
        scale_a=scale_x,
        scale_b=m.fp8_scale_w,
        bias=m.bias.to(x.dtype) if fused_bias else None,
        out_dtype=x.dtype,
    )  # (M, N)
    if m.bias is not None and not fused_bias:
        y = y + m.bias.to(x.dtype)
    if m.lowrank_up is not None:  # one GEMM that reads y as its C: no separate (M, N) product to add
        y = torch.addmm(y, down, m.lowrank_up.to(x.dtype))
    return y.reshape(*x.shape[:-1], m.out_features)


def fp8_support(m: QuantLinear) -> str | None:
    """None when the FP8 backends can run `m`, else why not."""
    spec = m.spec
    unsupported = device_support(m.qweight.device, MIN_CAPABILITY, "FP8 tensor cores", "FP8")
    if unsupported:
        return unsupported
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
    if uses_few_row_path(m, x):
        return lowbit_forward(m, x)
    return fp8_linear(m, x)


def uses_few_row_path(m: QuantLinear, x: torch.Tensor) -> bool:
    """Whether the "fp8" backend hands `m(x)` to the lowbit kernel: few-token GEMMs are bound by weight bytes,
    and reading the packed codes directly beats expanding them first (H100, adaLN 64×1152×6912: lowbit
    15.7 µs; expansion 16.4 µs + FP8 GEMM 12.7 µs)."""
    return m.backend == "fp8" and x.numel() <= LOWBIT_MAX_ROWS * x.shape[-1]


def weight_scale(m: QuantLinear) -> dict[str, torch.Tensor]:
    """The per-channel scales as cuBLAS's row-wise `scale_b` (1, N)."""
    return {"fp8_scale_w": m.scales.reshape(1, m.out_features).float().contiguous()}


def expanded_weight(m: QuantLinear) -> dict[str, torch.Tensor]:
    return weight_scale(m) | {"weight_fp8": _expanded(m)}


def _weight_codes(m: QuantLinear) -> torch.Tensor:
    """The layer's e4m3 weight: kept by "fp8-cached", expanded per call by "fp8"."""
    return m.weight_fp8 if m.backend == "fp8-cached" else _expanded(m)


def _expanded(m: QuantLinear) -> torch.Tensor:
    """The layer's codes as e4m3 (N, K)."""
    return expand_fp8(m.qweight, m.spec.w_bits, m.in_features, m.spec.w_format == "ternary")

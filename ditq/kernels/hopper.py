"""The `"fp8-gluon"` backend's GEMM on Hopper (sm_90): the Gluon W4A8 kernel, reading the layer's codes 2–4-bit.

`"fp8-gluon"` is the `"fp8"` backend with this GEMM where it can run; a backend of its own because the kernel,
exact on an H100, runs at 0.64–0.76× cuBLAS FP8 there (`docs/results.md`; its CPU tests run its float64
reference). `prepare_for_inference(model,
"fp8-gluon")` gives each layer this kernel can run, on a CUDA device of compute capability
9.0, its codes re-packed in the kernel's layout (`ditq.kernels.triton.wgmma_codes`) as the non-persistent buffer
`qweight_wgmma`: the same bytes as `qweight`, which checkpoints keep in the canonical layout. All its calls
then multiply those codes on the FP8 tensor cores (`ditq.kernels.fp8`), converted to e4m3 in registers: no
expansion per call, no 8-bit copy. Few-row calls too, though the lowbit kernel would take them on other GPUs:
it reads only the canonical layout, and keeping both layouts on the device would hold the codes twice; so
`qweight` is parked in host memory while the re-packed codes serve (`QuantLinear.park_codes`).

The kernel runs symmetric int2–int4 or ternary codes with per-channel scales or groups of 64 or 128 columns, K a
multiple of 128; per channel it sums all of K on the tensor cores, so only for layers prepared with fast
accumulation (the default). SVDQuant layers (a low-rank branch) keep the expansion and cuBLAS, where the branch
rides in the GEMM as more columns of K; every other layer takes the `"fp8"` path.

`ditq::gluon_w4a8_gemm` is an opaque custom op with a fake for shapes: `torch.library.triton_op` traces Triton
kernels through their TTIR and rebuilds TMA descriptors without a shared-memory layout, which a Gluon kernel does
not fit. On the CPU it computes the kernel's float64 reference (`gluon_w4a8_reference`), so the backend's whole
path runs in tests on a device whose capability reads 9.0 (`device_capability`).
"""

from __future__ import annotations

import torch

from ditq.kernels.triton.wgmma_codes import K_BLOCK, repack_for_wgmma
from ditq.quant.qlinear import QuantLinear

__all__ = ["WGMMA_CODES", "device_capability", "gluon_support", "gluon_w4a8_gemm", "wgmma_codes"]

WGMMA_CODES = "qweight_wgmma"  # the kernel buffer holding the re-packed codes
CAPABILITY = (9, 0)  # wgmma, TMA and setmaxnreg: sm_90a
GROUP_SIZES = (None, 64, 128)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device; None for another device."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def gluon_support(m: QuantLinear, fast_accumulation: bool) -> str | None:
    """None when the Gluon GEMM can run `m`, a layer the FP8 backends run, else why not. Per channel it sums all
    of K on the tensor cores, as cuBLAS's fast accumulation does: not for a layer prepared without it."""
    if device_capability(m.qweight.device) != CAPABILITY:
        return "the Gluon GEMM needs compute capability 9.0"
    if m.spec.group_size is None and not fast_accumulation:
        return "per channel, the Gluon GEMM accumulates on the tensor cores (fast accumulation)"
    if m.lowrank_up is not None:
        return "a low-rank branch rides in cuBLAS's FP8 GEMM"
    if m.spec.group_size not in GROUP_SIZES:
        return "the Gluon GEMM takes per-channel scales or groups of 64 or 128"
    if m.in_features % K_BLOCK:
        return f"the Gluon GEMM needs in_features divisible by {K_BLOCK}"
    return None


def wgmma_codes(m: QuantLinear) -> dict[str, torch.Tensor]:
    """`m`'s codes in the kernel's layout, under `WGMMA_CODES`."""
    return {WGMMA_CODES: repack_for_wgmma(m.qweight, m.spec.w_bits, m.in_features)}


@torch.library.custom_op("ditq::gluon_w4a8_gemm", mutates_args=(), device_types="cpu")
def gluon_w4a8_gemm(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    ternary: bool,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(M, N) `out_dtype`: e4m3 codes x (M, K) with row scales x_scale (M, 1) times the weights whose codes `packed`
    holds re-packed, with float32 scales (N, 1) or (N, K / group_size); group_size 0 = per channel; + bias (N,).
    The CPU's: the kernel's float64 reference."""
    from ditq.kernels.triton.gluon_w4a8 import gluon_w4a8_reference

    y = gluon_w4a8_reference(x, x_scale, packed, scales, bias, bits=bits, ternary=ternary,
                             group_size=group_size or None)  # fmt: skip
    return y.to(out_dtype)


@gluon_w4a8_gemm.register_kernel("cuda")
def _(x, x_scale, packed, scales, bias, bits, ternary, group_size, out_dtype):
    from ditq.kernels.triton.gluon_w4a8 import gluon_w4a8_linear

    return gluon_w4a8_linear(x, x_scale, packed, scales, bias, bits=bits, ternary=ternary,
                             group_size=group_size or None, out_dtype=out_dtype)  # fmt: skip


@gluon_w4a8_gemm.register_fake
def _(x, x_scale, packed, scales, bias, bits, ternary, group_size, out_dtype):
    return x.new_empty((x.shape[0], packed.shape[0]), dtype=out_dtype)

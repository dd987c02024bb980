"""Where the pre-pass's LayerNorm + modulate codes part from PyTorch's: the kernel, the eager reference and a
float64 LayerNorm rounded the same way, with and without a modulation, and with the kernel's rounding done by
integer arithmetic (its interpreter path) instead of the GPU's casts. Prints one line per case.

    python bench/prepass_rounding.py

On an H200 (2026-12-03) the GPU casts put 3.8% of the codes one e4m3 step off the reference whenever the
modulation was not trivial, and the integer rounding put none: the compiler had fused round(round(h·g) + b) into
one bf16 FMA. The pre-pass now turns fp fusion off when it modulates (`ditq.kernels.triton.rowquant`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditq.kernels.reference import Modulation
from ditq.kernels.triton import rowquant
from ditq.kernels.triton.rowquant import quantize_rows_fp8, quantize_rows_fp8_reference
from ditq.models.dit import modulate
from ditq.quant.primitives import fp8_cast, fp8_scale


def differing(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() != b.float()).float().mean())


def compare(m: int, k: int, tokens: int, seed: int, trivial: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16) * 2 + 1
    shift, scale = (
        torch.randn(m // tokens, k, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "ab"
    )
    if trivial:
        shift, scale = shift * 0, scale * 0
    mod = Modulation(shift, scale, tokens, 1e-6)
    ref_codes, ref_scales, _ = quantize_rows_fp8_reference(x, None, "none", mod)
    codes, scales = quantize_rows_fp8(x, None, "none", mod)
    xf = x.double()
    mean = xf.mean(-1, keepdim=True)
    ln = ((xf - mean) / torch.sqrt(((xf - mean) ** 2).mean(-1, keepdim=True) + 1e-6)).float().bfloat16()
    h64 = modulate(ln.unflatten(0, (-1, tokens)), shift, scale).flatten(0, 1)
    codes64 = fp8_cast(h64, fp8_scale(h64))
    rowquant.interpreted = lambda: True  # integer rounding (the interpreter's path) on the GPU
    try:
        emulated, _ = quantize_rows_fp8(x, None, "none", mod)
    finally:
        rowquant.interpreted = lambda: False
    print(
        f"{m}×{k}, modulation {'zero' if trivial else 'random'}: kernel≠ref codes {differing(codes, ref_codes):.2e} "
        f"(scales {differing(scales, ref_scales):.2e}); kernel≠f64 {differing(codes, codes64):.2e}; ref≠f64 "
        f"{differing(ref_codes, codes64):.2e}; torch LN≠f64 LN {differing(F.layer_norm(x, (k,), eps=1e-6), ln):.2e}; "
        f"integer rounding≠ref {differing(emulated, ref_codes):.2e}"
    )


if __name__ == "__main__":
    for shape in ((14, 48, 7, 48), (16384, 1152, 256, 0)):
        compare(*shape, trivial=False)
        compare(*shape, trivial=True)

"""The PyTorch oracle for `QuantLinear`: what every fast kernel must compute (the EMULATED path).

    h   = x / smooth                                  (if the spec smooths)
    h_q = fake-quant(h) per the spec's activation part (if a_bits)
    y   = h_q @ dequantized_weight().T + bias + (h @ lora_down) @ lora_up   (low-rank branch if rank)

Matmuls run in x.dtype; quantization parameters are computed in float32 (see `ditq.quant.primitives`).
The low-rank branch reads the smoothed but *unquantized* activations, as in SVDQuant.
Activation fake-quant passes gradients straight through, so the oracle is also differentiable in x.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ditq.quant.primitives import fake_quantize, fp8_cast, fp8_dequantize, fp8_scale, straight_through

if TYPE_CHECKING:
    from ditq.quant.qlinear import QuantLinear

__all__ = ["emulated", "quantize_activations", "quant_linear_reference"]


def quantize_activations(h: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    """Fake-quantize the (already smoothed) input per `module.spec`; returns h's dtype and shape.

    Dynamic scales are per token (`a_group_size=None`) or per token per channel group; static scales
    come from the `act_scale` (and, asymmetric, `act_zero`) buffers: shape (1,) = one per tensor,
    (in // a_group_size,) = one per channel group shared by all tokens. FP8 is symmetric by nature
    (scale = absmax / 448), so `a_symmetric` does not apply to it.
    """
    spec = module.spec
    if spec.a_bits is None:
        return h
    if spec.a_format == "fp8":
        scale = fp8_scale(h, spec.a_group_size) if spec.a_dynamic else module.act_scale
        return straight_through(h, fp8_dequantize(fp8_cast(h, scale), scale, h.dtype))
    qparams = None if spec.a_dynamic else (module.act_scale, module.act_zero)
    return fake_quantize(h, spec.a_bits, spec.a_group_size, spec.a_symmetric, qparams=qparams)


def quant_linear_reference(x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    """y = QuantLinear(x) by dequantize-then-matmul in x.dtype: smoothing, act quant, low-rank branch."""
    h = x if module.smooth is None else x / module.smooth.to(x.dtype)  # (..., in)
    h_q = quantize_activations(h, module)  # (..., in)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    y = F.linear(h_q, module.dequantized_weight(dtype=x.dtype), bias)  # (..., out)
    if module.spec.rank > 0:
        y = y + (h @ module.lora_down.to(x.dtype)) @ module.lora_up.to(x.dtype)  # (..., out)
    return y


emulated = quant_linear_reference
"""The EMULATED kernel preference runs exactly the reference."""

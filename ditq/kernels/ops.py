"""Quantized matmuls as `torch.library` custom ops: tensors and plain scalars in, a fake twin for tracing.

`torch.compile(fullgraph=True)` and CUDA graphs see each op as one opaque node whose output shape comes
from its fake implementation; the op body is the reference (`ditq.kernels.reference`). The spec travels
as its JSON text (`QuantLinear.spec_json`), a plain string, so no Python object crosses the boundary.
"""

from __future__ import annotations

import functools
import json

import torch

from ditq.kernels.reference import linear_reference
from ditq.quant.qlinear import dequantize_weight
from ditq.quant.spec import QuantSpec

__all__ = ["parse_spec", "quant_linear"]


@functools.cache
def parse_spec(text: str) -> QuantSpec:
    """The spec an op's `spec` string describes, parsed once per distinct spec."""
    return QuantSpec.from_dict(json.loads(text))


@torch.library.custom_op("ditq::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero: torch.Tensor | None,
    spec: str,
) -> torch.Tensor:
    """y = QuantLinear(x) from packed codes by dequantize-then-matmul (the oracle)."""
    s = parse_spec(spec)
    weight = dequantize_weight(qweight, scales, zeros, s, x.shape[-1], x.dtype)
    return linear_reference(x, weight, bias, smooth, lowrank_down, lowrank_up, act_scale, act_zero, s)


@quant_linear.register_fake
def _(x, qweight, scales, zeros, bias, smooth, lowrank_down, lowrank_up, act_scale, act_zero, spec):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, _bias, smooth, lowrank_down, lowrank_up, _as, _az, spec = inputs
    ctx.save_for_backward(qweight, scales, zeros, smooth, lowrank_down, lowrank_up)
    ctx.spec, ctx.in_features = spec, x.shape[-1]


def _backward(ctx, grad: torch.Tensor):
    """Straight-through in x: d/dx of (x/s)·Ŵᵀ + (x/s)·L1·L2, activation rounding passed through."""
    qweight, scales, zeros, smooth, lowrank_down, lowrank_up = ctx.saved_tensors
    s = parse_spec(ctx.spec)
    grad_h = grad @ dequantize_weight(qweight, scales, zeros, s, ctx.in_features, grad.dtype)  # (..., in)
    if lowrank_down is not None:
        grad_h = grad_h + (grad @ lowrank_up.to(grad.dtype).T) @ lowrank_down.to(grad.dtype).T
    grad_x = grad_h if smooth is None else grad_h / smooth.to(grad.dtype)
    return (grad_x,) + (None,) * 10


quant_linear.register_autograd(_backward, setup_context=_setup_context)

"""The PyTorch oracle for quantized linears: what every fast kernel must compute (the EMULATED path).

    h   = x / smooth                                  (if the spec smooths)
    h_q = fake-quant(h) per the spec's activation part (if a_bits)
    y   = h_q @ Ŵᵀ + bias + (h @ lowrank_down) @ lowrank_up   (low-rank branch if rank)

Matmuls run in x.dtype; quantization parameters are computed in float32 (see `ditq.quant.primitives`).
The low-rank branch reads the smoothed but *unquantized* activations, as in SVDQuant. Layers of one
input group share smooth, activation quantization and down-projection, so `group_linear` computes all
their outputs from one quantized input and one down-projection. Functions here take plain tensors and a
`QuantSpec`; `ditq.kernels.ops` wraps them as `torch.library` custom ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ditq.models.dit import modulate
from ditq.quant.qlinear import QuantLinear, quantize_activations
from ditq.quant.spec import QuantSpec

__all__ = [
    "INPUT_ACTIVATIONS",
    "Modulation",
    "NORMS",
    "Norm",
    "Residual",
    "activate",
    "group_linear",
    "linear_reference",
    "linear_with",
    "modulated",
    "normalized",
    "quantize_activations",
    "residual_added",
    "smoothed_by_reciprocal",
]

# the activations the FP8 input pre-pass can apply to x before quantizing it (`ditq.kernels.fusion` folds them in)
INPUT_ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu")


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero: torch.Tensor | None,
    spec: QuantSpec,
) -> torch.Tensor:
    """y for a dense (dequantized) weight Ŵ (out, in): smoothing, activation quant, low-rank branch."""
    bias = None if bias is None else bias.to(x.dtype)
    return linear_with(lambda h_q: F.linear(h_q, weight.to(x.dtype), bias), x, smooth, lowrank_down, lowrank_up,
                       act_scale, act_zero, spec)  # fmt: skip


def linear_with(
    matmul: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero: torch.Tensor | None,
    spec: QuantSpec,
) -> torch.Tensor:
    """The oracle around any `matmul` of the quantized input (h_q ↦ h_q·Ŵᵀ + bias): what a kernel backend
    that multiplies by the packed weight itself reuses for smoothing, activations and the low-rank branch."""
    h = x if smooth is None else x / smooth.to(x.dtype)  # (..., in)
    y = matmul(quantize_activations(h, spec, act_scale, act_zero))  # (..., out)
    if lowrank_down is not None:
        y = y + (h @ lowrank_down.to(x.dtype)) @ lowrank_up.to(x.dtype)  # (..., out)
    return y


def group_linear(x: torch.Tensor, members: Sequence[QuantLinear]) -> list[torch.Tensor]:
    """Outputs of every layer of one input group from ONE smoothed, quantized input and ONE down-projection.

    Equal to calling each member on `x`; raises if the members do not share what the group shares.
    """
    if not members:
        raise ValueError("an input group needs at least one layer")
    lead = members[0]
    group = lead.spec.input_group
    for m in members[1:]:
        if (m.spec.input_group != group or _act_part(m.spec) != _act_part(lead.spec)
                or m.smoothing_folded != lead.smoothing_folded):  # fmt: skip
            raise ValueError(f"layers of input group {group!r} must share its id, activation quantization and "
                             "folded smoothing")  # fmt: skip
        for name in ("smooth", "lowrank_down", "act_scale", "act_zero"):
            a, b = getattr(lead, name), getattr(m, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise ValueError(f"layers of input group {group!r} hold different {name!r} tensors")
    h = x if lead.input_smooth is None else x / lead.input_smooth.to(x.dtype)  # (..., in), once
    h_q = quantize_activations(h, lead.spec, lead.act_scale, lead.act_zero)  # once
    down = None if lead.lowrank_down is None else h @ lead.lowrank_down.to(x.dtype)  # (..., rank), once
    outputs = []
    for m in members:
        bias = None if m.bias is None else m.bias.to(x.dtype)
        y = F.linear(h_q, m.dequantized_weight(x.dtype), bias)  # (..., out_m)
        if down is not None:
            y = y + down @ m.lowrank_up.to(x.dtype)
        outputs.append(y)
    return outputs


def smoothed_by_reciprocal(x: torch.Tensor, inv_smooth: torch.Tensor | None) -> torch.Tensor:
    """x · inv_smooth (float32 (in,)) in float32, or x without one: the FP8 backends' smoothing, within one step
    of x's dtype of the x / smooth the other backends compute (`ditq.kernels.fp8` says why). Not rounded back to
    x's dtype: `torch.compile` would drop that rounding inside a fused kernel (inductor keeps 16-bit
    intermediates in float32), so eager, compiled and the pre-pass could not all give the same codes."""
    return x if inv_smooth is None else x * inv_smooth


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """x through one of `INPUT_ACTIVATIONS` (None = none), in x's dtype: the pre-pass's reference."""
    if activation in (None, "none"):
        return x
    if activation not in INPUT_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {INPUT_ACTIVATIONS}")
    if activation == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")


def _act_part(spec: QuantSpec) -> tuple:
    return (spec.a_bits, spec.a_format, spec.a_group_size, spec.a_symmetric, spec.a_dynamic, spec.smooth)


NORMS = ("layer", "rms", "rms_cast")


class Norm(NamedTuple):
    """A normalization of each row (K): `kind` "layer" is F.layer_norm and "rms" F.rms_norm (torch.nn.RMSNorm,
    no bias): normalized and scaled in float32, rounded to x's dtype once; "rms_cast" is RMSNorm written as
    plain ops (diffusers' RMSNorm): normalized in float32 and cast to x's dtype, then × weight and + bias as ops
    of x's dtype, each rounded. `weight`, `bias`: (K,) in x's dtype, or None."""

    kind: str
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def normalized(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """norm(x) over the last dimension, in x's dtype, rounded where the module computing it rounds."""
    k = x.shape[-1]
    if norm.kind == "layer":
        return F.layer_norm(x, (k,), norm.weight, norm.bias, norm.eps)
    if norm.kind == "rms":
        return F.rms_norm(x, (k,), norm.weight, norm.eps)
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    h = h if norm.weight is None else h * norm.weight
    return h if norm.bias is None else h + norm.bias


class Modulation(NamedTuple):
    """adaLN's input transform, modulate(LayerNorm(x), shift, scale): LayerNorm without affine over each row
    (unless another `Norm` comes with it), then x·(1 + scale) + shift with `shift`, `scale` (samples, K) per
    sample of `tokens` consecutive rows."""

    shift: torch.Tensor
    scale: torch.Tensor
    tokens: int
    eps: float


def modulated(x: torch.Tensor, modulation: Modulation, norm: Norm | None = None) -> torch.Tensor:
    """modulate(norm(x), shift, scale) for x (samples · tokens, K), as the zoo's DiT block computes it; `norm`
    None: adaLN's LayerNorm without affine."""
    h = normalized(x, norm or Norm("layer", modulation.eps))
    h = h.unflatten(0, (-1, modulation.tokens))  # (samples, tokens, K)
    return modulate(h, modulation.shift, modulation.scale).flatten(0, 1)


class Residual(NamedTuple):
    """A block's residual update, x + gate·update (a DiT block's), or x + update without a gate (a model that
    gates the update before the add): `update` shaped like x, `gate` (samples, K) per sample of a `Modulation`'s
    tokens or, where no modulation follows the add (PixArt's cross-attention reads the sum as it is), of `tokens`."""

    update: torch.Tensor
    gate: torch.Tensor | None = None
    tokens: int = 0


def residual_added(x: torch.Tensor, residual: Residual, tokens: int) -> torch.Tensor:
    """x + gate·update for x (samples · tokens, K), as the zoo's DiT block computes it; x + update without a gate."""
    if residual.gate is None:
        return x + residual.update
    update = residual.update.unflatten(0, (-1, tokens))  # (samples, tokens, K)
    return (x.unflatten(0, (-1, tokens)) + residual.gate.unsqueeze(1) * update).flatten(0, 1)

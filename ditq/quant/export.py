"""`export_served`: a nested (MatQuant) model as deployed, each layer packed at the width it serves.

A nested `QuantLinear` keeps B-bit codes q (`spec.stored_bits`) and serves their r most significant bits,
S(q, r) = k · 2^(B−r) with k in the signed r-bit range (`slice_codes`), times the shared scale s. Exported,
the layer is a plain r-bit `QuantLinear` holding k and s · 2^(B−r): the same weight, bit for bit, since
scaling by a power of two is exact in floating point (s is at least the smallest normal of its dtype and
|k| ≥ 1 wherever the weight is not 0, so neither product is subnormal; an overflowing scale is refused).
Its codes pack into r-bit slots, so the file is small, and the kernel backends that read packed int2–int4
codes (`lowbit`, `fp8`, `fp8-cached`) run it as they run any layer quantized at r bits.
"""

from __future__ import annotations

import torch
from torch import nn

from ditq.checks import naming_layer
from ditq.quant.fakequant import FakeQuantLinear
from ditq.quant.modules import install
from ditq.quant.primitives import slice_codes
from ditq.quant.qlinear import QuantLinear
from ditq.quant.served import standalone_spec

__all__ = ["export_served", "served_layer"]

_CARRIED_BUFFERS = ("bias", "smooth", "lowrank_down", "lowrank_up", "act_scale", "act_zero")


def export_served(model: nn.Module) -> nn.Module:
    """Replace, in place, every nested `QuantLinear` of `model` by the plain `QuantLinear` of the slice it
    serves (`served_layer`); returns the model. Choose the widths first (`ditq.load(path, bits=...)` or
    `ditq.set_served_bits`). The new layers run the reference backend until `prepare_for_inference`.

    Raises ValueError, before changing anything, when a nested layer is still a `FakeQuantLinear` (convert the
    model first), when no layer is nested, or when a layer's scales overflow at its served width.
    """
    training = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)
                and m.spec.stored_bits is not None]
    if training:
        raise ValueError(f"layer {training[0]!r} is a FakeQuantLinear (quantization-aware training); "
                         "ditq.convert the model before exporting it")
    nested = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)
              and m.spec.stored_bits is not None}
    if not nested:
        raise ValueError(f"{type(model).__name__} has no nested layer (spec.stored_bits set) to export")
    built = {}
    for name, layer in nested.items():
        with naming_layer(f"layer {name!r}"):
            built[name] = served_layer(layer)
    install(model, built)
    return model


@torch.no_grad()
def served_layer(layer: QuantLinear) -> QuantLinear:
    """The plain `QuantLinear` (stored bits = served bits) computing what nested `layer` serves, bit for bit:
    codes S(q, r) / 2^(B−r), scales × 2^(B−r); every other buffer is the layer's own tensor."""
    spec = layer.spec
    plain_spec = standalone_spec(spec, spec.w_bits)
    step = 2 ** (spec.code_bits - spec.w_bits)
    scales = layer.scales * step  # exact: a power of two
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"its {layer.scales.dtype} scales overflow when multiplied by {step} for "
                         f"{spec.w_bits}-bit codes; store the scales as float32")
    sliced = slice_codes(layer.weight_codes(), spec.code_bits, spec.w_bits, extra_precision=spec.extra_precision)
    codes = torch.div(sliced, step, rounding_mode="floor").to(torch.int8)  # fits: at most 2^(r−1) in units
    plain = QuantLinear(layer.in_features, layer.out_features, plain_spec,
                        bias=layer.bias is not None, device=layer.scales.device)
    plain.set_codes(codes, scales)
    for name in _CARRIED_BUFFERS:  # the same tensors: layers of an input group keep sharing theirs
        plain.register_buffer(name, getattr(layer, name))
    return plain.train(layer.training)

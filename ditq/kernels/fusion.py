"""Moving an MLP's GELU into its second Linear, so an FP8 backend applies it while quantizing that Linear's input.

Under `torch.compile` the GELU between two GEMMs fuses with the next GEMM's per-token absmax and FP8 cast into
one reduction kernel which, over rows wider than 1,024, reads each row twice and computes the GELU twice; the
Triton pre-pass (`ditq.kernels.triton.rowquant`) applies it while reading the row once. Only blocks whose
forward is known are rewritten: the zoo's `Mlp` (fc2(act(fc1(x)))) and diffusers' `FeedForward` whose first
module is its `GELU` (proj, then gelu; PixArt, FLUX, SD3) with dropout 0. Outputs stay equal: the activation
becomes an identity and the Linear after it takes the activation as `QuantLinear.input_activation`, which
every backend honours.
"""

from __future__ import annotations

from torch import nn

from ditq.models.dit import Mlp
from ditq.quant.qlinear import QuantLinear

__all__ = ["fuse_input_activations"]

_GELU_NAMES = {"none": "gelu", "tanh": "gelu_tanh"}


def fuse_input_activations(model: nn.Module) -> int:
    """Rewrite every recognised GELU MLP of `model` whose second Linear is a QuantLinear; returns how many."""
    fused = 0
    for module in list(model.modules()):
        if isinstance(module, Mlp) and _fusable(module.act, module.fc2):
            module.fc2.input_activation = _GELU_NAMES[module.act.approximate]
            module.act = nn.Identity()
            fused += 1
        elif _is_diffusers_gelu_feed_forward(module):
            gelu, _dropout, out = module.net[:3]
            out.input_activation = _GELU_NAMES[gelu.approximate]
            module.net[0] = gelu.proj
            fused += 1
    return fused


def _fusable(activation: nn.Module, linear: nn.Module) -> bool:
    return (
        isinstance(activation, nn.GELU)
        and activation.approximate in _GELU_NAMES
        and isinstance(linear, QuantLinear)
        and linear.input_activation is None
    )


def _is_diffusers_gelu_feed_forward(module: nn.Module) -> bool:
    """diffusers' FeedForward: net = [GELU(proj, approximate), Dropout, Linear, ...], applied in order."""
    net = getattr(module, "net", None)
    if type(module).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) < 3:
        return False
    gelu, dropout, out = net[:3]
    return (
        type(gelu).__module__ == "diffusers.models.activations"
        and type(gelu).__name__ == "GELU"
        and getattr(gelu, "approximate", None) in _GELU_NAMES
        and isinstance(dropout, nn.Dropout)
        and dropout.p == 0
        and isinstance(out, QuantLinear)
        and out.input_activation is None
    )

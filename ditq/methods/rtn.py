"""Round-to-nearest (RTN): the baseline every other method must beat.

Weights are quantized once from their own range (optionally with a clipping search against the layer's
calibration inputs); activations are quantized per token (or token group) on the fly, or with one static
scale from calibration when `a_dynamic=False`. The clipping search uses the layer's calibration rows when
`calib` is given, else the weight error alone. `rtn_linear` is also what `api.requantize` uses for a
module given a bare `QuantSpec`.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.calib import CalibData
from ditq.quant.clip_search import clip_search
from ditq.quant.primitives import compute_qparams, fp8_scale
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import RTN
from ditq.registry import register_method


@register_method(RTN)
def quantize_rtn(model: nn.Module, targets: dict[str, RTN], calib: CalibData | None) -> dict[str, nn.Module]:
    layers = {name: (model.get_submodule(name), recipe.spec(), recipe.clip_search) for name, recipe in targets.items()}
    for name, (linear, spec, search) in layers.items():  # every check before any (slow) quantization
        check_rtn(name, linear, spec, calib, search)
    return {
        name: rtn_linear(name, linear, spec, calib, search)
        for name, (linear, spec, search) in tqdm(layers.items(), desc="RTN", leave=False, disable=len(layers) < 50)
    }


def check_rtn(name: str, linear: nn.Linear, spec: QuantSpec, calib: CalibData | None, search: bool) -> None:
    """Raise, naming the layer, if `rtn_linear` could not quantize `linear` with `spec`."""
    if spec.rank or spec.smooth:
        raise ValueError(f"{name}: round-to-nearest makes no low-rank branch or smoothing (rank/smooth in {spec})")
    try:
        spec.check_fits(linear.in_features, linear.out_features)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    static = spec.a_bits is not None and not spec.a_dynamic
    if static and calib is None:
        raise ValueError(f"{name}: static activation scales (a_dynamic=False) need calibration data: pass calib=")
    if not bool(torch.isfinite(linear.weight).all()):
        raise ValueError(f"{name}: weight holds NaN or infinite values; quantizing it would poison its scales")
    if calib is not None and (static or search):
        calib.require(name, rows=search)


def rtn_linear(
    name: str, linear: nn.Linear, spec: QuantSpec, calib: CalibData | None, search: bool = False
) -> QuantLinear:
    """`linear` quantized round-to-nearest per `spec`; `check_rtn` must have passed."""
    clip_ratio = None
    if search:
        x = None if calib is None else calib.inputs[name].to(linear.weight.device, linear.weight.dtype)
        clip_ratio = clip_search(linear.weight.detach(), spec.w_bits, spec.group_size, spec.symmetric, x=x)
    act_scale = None
    if spec.a_bits is not None and not spec.a_dynamic:
        act_scale = static_act_scale(calib.absmax[name], spec)
    return QuantLinear.from_linear(linear, spec, clip_ratio=clip_ratio, act_scale=act_scale)


def static_act_scale(absmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One symmetric scale per activation group (per tensor when `a_group_size` is None) from calibration."""
    row = absmax.reshape(1, -1).float()
    if spec.a_format == "fp8":
        scale = fp8_scale(row, spec.a_group_size)
    else:
        scale, _ = compute_qparams(row, spec.a_bits, spec.a_group_size, symmetric=True)
    return scale.reshape(-1)

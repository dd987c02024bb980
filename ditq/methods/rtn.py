"""Round-to-nearest (RTN): the baseline every other method must beat.

Weights are quantized once from their own range (optionally with a clipping search against the layer's
calibration inputs); activations are quantized per token (or token group) on the fly, or with one static
scale from calibration when `a_dynamic=False`.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.calib import CalibData
from ditq.quant.primitives import clip_search, compute_qparams, fp8_scale
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import RTN
from ditq.registry import register_method


@register_method(RTN)
def quantize_rtn(model: nn.Module, targets: dict[str, RTN], calib: CalibData | None) -> nn.Module:
    needs_calib = any(not r.a_dynamic for r in targets.values())
    if needs_calib and calib is None:
        raise ValueError("static activation scales (a_dynamic=False) need calibration data: pass calib=")
    for name, recipe in tqdm(targets.items(), desc="RTN", leave=False, disable=len(targets) < 50):
        linear = model.get_submodule(name)
        spec = recipe.spec()
        spec.check_fits(linear.in_features, linear.out_features)
        inputs = None
        if calib is not None and (recipe.clip_search or not spec.a_dynamic):
            calib.require(name)
            inputs = calib.inputs.get(name)
        clip_ratio = None
        if recipe.clip_search:
            x = inputs.to(linear.weight.device, linear.weight.dtype) if inputs is not None else None
            clip_ratio = clip_search(linear.weight.detach(), spec.w_bits, spec.group_size, spec.symmetric, x=x)
        act_scale = None if spec.a_dynamic else static_act_scale(calib.absmax[name], spec)
        model.set_submodule(name, QuantLinear.from_linear(linear, spec, clip_ratio=clip_ratio, act_scale=act_scale))
    return model


def static_act_scale(absmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One symmetric scale per activation group (per tensor when `a_group_size` is None) from calibration."""
    row = absmax.reshape(1, -1).float()
    if spec.a_format == "fp8":
        scale = fp8_scale(row, spec.a_group_size)
    else:
        scale, _ = compute_qparams(row, spec.a_bits, spec.a_group_size, symmetric=True)
    return scale.reshape(-1)

"""Per-layer view of a quantized model: how far each QuantLinear is from the Linear it replaced, and sizes."""

from __future__ import annotations

import torch
from torch import nn

from ditq.io import model_size_bytes
from ditq.quant.qlinear import QuantLinear

__all__ = ["layer_errors", "model_size_bytes"]


@torch.no_grad()
def layer_errors(
    fp_model: nn.Module, quant_model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, seed: int = 0
) -> list[dict[str, float | str | int]]:
    """For every QuantLinear: relative weight error, relative output error and output SQNR (dB).

    Output errors use `inputs[name]` (rows captured by `ditq.calibrate`) when given, else Gaussian rows —
    real activations are what matter, so pass calibration inputs when you have them.
    """
    fp_modules = dict(fp_model.named_modules())
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for name, q in quant_model.named_modules():
        if not isinstance(q, QuantLinear):
            continue
        fp = fp_modules.get(name)
        if not isinstance(fp, nn.Linear):
            raise ValueError(f"{name!r} is quantized but the full-precision model has no Linear there")
        w = fp.weight.float().cpu()
        x = inputs[name] if inputs and name in inputs else torch.randn(256, fp.in_features, generator=generator)
        x = x.to(fp.weight.device, fp.weight.dtype)
        ref = fp(x).float()
        out = q(x.to(next(q.buffers()).device)).float().to(ref.device)
        noise = (out - ref).pow(2).sum()
        rows.append(
            {
                "layer": name,
                "shape": f"{fp.out_features}x{fp.in_features}",
                "weight_rel_err": float((q.dequantized_weight().float().cpu() - w).norm() / w.norm()),
                "output_rel_err": float(noise.sqrt() / ref.norm()),
                "sqnr_db": float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-30))),
                "w_bits": q.spec.w_bits,
                "group_size": q.spec.group_size or 0,
            }
        )
    return rows

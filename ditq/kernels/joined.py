"""One FP8 GEMM for the layers that read one input: their e4m3 weights joined along the output rows.

Attention's q, k and v (FLUX's single blocks add the MLP's input projection) each run a GEMM on the same codes.
Three GEMMs of N columns launch three kernels (and cuBLAS's workspace memsets) and fill the GPU's last wave
three times; one of 3N columns does neither: at PixArt-Σ's 4,096 × 1,152 × 1,152, a GEMM fills 2.2 waves of
128² tiles on 132 SMs, the joined one 6.5. Where the architecture's adapter declares such a group
(`Adapter.gemm_groups`), `join_gemms` moves the group's e4m3 weights, scales and biases into one weight held by
its first layer; every layer keeps its own call, `ditq::fp8_gemm_rows` over its rows of that weight, so eager
runs and uncompiled graphs compute exactly what they did. The fusion pass (`ditq.kernels.fusion`) turns the
calls of one group on one input into one GEMM over their rows and column slices of its output. Calls stay
apart where a group's layers do not all read one input (a wrong declaration), and where a column slice, its rows
strided by the whole output's width, would not do for a reader: a view that needs the layer's own contiguous
output, or the graph's output.

Joined only where the cached backend keeps a plain e4m3 weight: per-channel scales, no low-rank branch (whose
activation operand differs per layer), one smoothing (one input pre-pass) and one accumulation mode. Like the
e4m3 weight, the joined bias is a copy made at prepare time. Any layer of a group dropping its kernel buffers
(new codes, loaded tensors, another backend) drops the whole group's. Offloading that moves one module at a time
to the GPU would leave the joined weight behind with the first layer: prepare such models with `join=False`.
"""

from __future__ import annotations

import torch
from torch import nn

from ditq.kernels.fp8 import cat_e4m3
from ditq.quant.qlinear import QuantLinear

__all__ = ["join_gemms"]

_MOVED = ("weight_fp8", "fp8_scale_w")  # each layer's, moved into the joined ones its group's first layer holds


@torch.no_grad()
def join_gemms(model: nn.Module, groups: list[tuple[str, ...]]) -> int:
    """Join the weights of each group of `model`'s layers (names) that all run "fp8-cached" with a plain e4m3
    weight and read their input alike; returns how many layers joined."""
    joined = 0
    for names in groups:
        layers = [model.get_submodule(name) for name in names]
        if len(layers) < 2 or not all(_joinable(m, layers[0]) for m in layers):
            continue
        _join(layers)
        joined += len(layers)
    return joined


def _joinable(m: nn.Module, first: nn.Module) -> bool:
    return (isinstance(m, QuantLinear) and m.backend == "fp8-cached" and m.spec.group_size is None
            and m.lowrank_up is None and m.gemm_group is None and m.in_features == first.in_features
            and m.fast_accumulation == first.fast_accumulation and m.weight_fp8.device == first.weight_fp8.device
            and getattr(m, "inv_smooth", None) is getattr(first, "inv_smooth", None))  # fmt: skip


def _join(layers: list[QuantLinear]) -> None:
    """The first layer holds the joined weight, scales and bias; each layer reads its rows of them."""
    first = layers[0]
    weight = cat_e4m3([m.weight_fp8 for m in layers], dim=0)
    scale = torch.cat([m.fp8_scale_w for m in layers], dim=1)
    biases = [m.bias for m in layers]
    like = next((b for b in biases if b is not None), None)
    bias = None if like is None else torch.cat([
        b.detach().to(like.dtype) if b is not None else like.new_zeros(m.out_features)
        for b, m in zip(biases, layers, strict=True)])  # fmt: skip
    start = 0
    for m in layers:
        for name in _MOVED:
            delattr(m, name)
        m.kernel_buffers = tuple(b for b in m.kernel_buffers if b not in _MOVED)
        m.gemm_group, m.gemm_rows = tuple(layers), (start, start + m.out_features)
        start += m.out_features
    for name, tensor in (("weight_fp8", weight), ("fp8_scale_w", scale), ("joined_bias", bias)):
        first.register_buffer(name, tensor, persistent=False)
    first.kernel_buffers += ("weight_fp8", "fp8_scale_w", "joined_bias")

"""Moving what produces a Linear's input into that Linear, so an FP8 backend computes it while quantizing it.

Two producers are moved, each where a compiler fuses it badly with the per-token absmax and FP8 cast that
follow (`ditq.kernels.triton.rowquant` says why and what it costs), and one input without a producer to fuse
into is sent to the pre-pass too:
- an MLP's GELU, into its second Linear: the zoo's `Mlp` (fc2(act(fc1(x)))) and diffusers' `FeedForward` whose
  first module is its `GELU` (proj, then gelu; PixArt, FLUX, SD3) with dropout 0. The activation becomes an
  identity and the Linear takes it as `QuantLinear.input_activation`, which every backend honours;
- a zoo `DiTBlock`'s two LayerNorm + adaLN modulate steps, into qkv and fc1: the block's forward hands x, shift
  and scale to the FP8 pre-pass when the Linear runs on an FP8 backend, and computes the norm as before
  otherwise (any backend, any mix of layers). The gated residual add before each norm goes in too: the
  attention's into fc1's pre-pass, the MLP's into the next block's qkv pre-pass (a zoo `DiT` whose blocks are
  rewritten carries it from block to block), so no pass over the residual stream is left between blocks;
- such a block's attention output, the input of its projection (input activation "none"): quantized in one
  read by the pre-pass where inductor made two kernels of the row absmax and the cast (DiT-XL/2 W4A8-FP8 at
  batch 64 on an H200: 1.35× bf16 against 1.30×, `bench/results/e2e_fp8_v12_models_h200.md`).
Only blocks whose forward is known are rewritten, and outputs stay equal. The rewrites stay when the backend is
switched (every backend computes the same outputs through them) and are not saved: parameter names are kept,
and a loaded model is the plain one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ditq.kernels.fp8 import FP8_BACKENDS, fp8_linear, fp8_linear_after_residual, uses_few_row_path
from ditq.kernels.reference import Modulation, Residual
from ditq.models.dit import DiT, DiTBlock, Mlp, modulate
from ditq.quant.qlinear import QuantLinear

__all__ = ["fuse_input_activations"]

_GELU_NAMES = {"none": "gelu", "tanh": "gelu_tanh"}


def fuse_input_activations(model: nn.Module) -> int:
    """Rewrite every recognised GELU MLP and DiT block of `model` whose Linears are QuantLinears; returns how
    many were rewritten."""
    fused = 0
    for module in list(model.modules()):
        if isinstance(module, Mlp) and _fusable(module.act, module.fc2):
            module.fc2.input_activation = _GELU_NAMES[module.act.approximate]
            module.act = nn.Identity()
            fused += 1
        elif _is_diffusers_gelu_feed_forward(module):
            gelu, _dropout, out = module.net[:3]
            out.input_activation = _GELU_NAMES[gelu.approximate]
            module.net[0] = Projection(gelu.proj)  # keeps the parameter names (net.0.proj.*): files still load
            fused += 1
        if type(module) is DiTBlock and any(isinstance(m, QuantLinear) for m in (module.attn.qkv, module.mlp.fc1)):
            module.__class__ = NormFusedDiTBlock
            if _takes_activation(module.attn.proj):
                module.attn.proj.input_activation = "none"
            fused += 1
    for module in model.modules():  # the model itself or a DiT inside a wrapper
        if type(module) is DiT and any(type(block) is NormFusedDiTBlock for block in module.blocks):
            module.__class__ = ResidualCarryingDiT
    return fused


class Projection(nn.Module):
    """diffusers' GELU module without its activation: `proj` alone, under the same name."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class NormFusedDiTBlock(DiTBlock):
    """A `DiTBlock` whose LayerNorm + modulate steps run inside qkv's and fc1's FP8 input pre-pass."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _added(*self.forward_deferred(x, c, None))

    def forward_deferred(
        self, x: torch.Tensor, c: torch.Tensor, pending: Residual | None
    ) -> tuple[torch.Tensor, Residual]:
        """(x, the MLP's gated update not yet added) from x + `pending` (the previous block's, or None): the
        add of each is left to the pre-pass of the Linear after it, which reads x once and writes the sum."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # 6 × (N, D)
        gates = () if pending is None else (pending.gate,)
        if _in_pre_pass(self.attn.qkv, x, shift_msa, scale_msa, *gates):
            modulation = Modulation(shift_msa, scale_msa, x.shape[1], self.norm1.eps)
            if pending is None:
                qkv = fp8_linear(self.attn.qkv, x, modulation)
            else:
                qkv, x = fp8_linear_after_residual(self.attn.qkv, x, pending, modulation)
        else:
            x = _added(x, pending)
            qkv = self.attn.qkv(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, 3·D)
        update = self.attn.attend(qkv)  # (N, T, D)
        if _in_pre_pass(self.mlp.fc1, x, shift_mlp, scale_mlp, gate_msa):
            modulation = Modulation(shift_mlp, scale_mlp, x.shape[1], self.norm2.eps)
            hidden, x = fp8_linear_after_residual(self.mlp.fc1, x, Residual(update, gate_msa), modulation)
        else:
            x = _added(x, Residual(update, gate_msa))  # (N, T, D)
            hidden = self.mlp.fc1(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, F)
        return x, Residual(self.mlp.fc2(self.mlp.act(hidden)), gate_mlp)


class ResidualCarryingDiT(DiT):
    """A zoo `DiT` that hands each rewritten block's MLP residual add to the next block's qkv pre-pass. A block
    with forward hooks is called as a module instead, so that its hooks run and see its complete output."""

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        pending = None
        for block in self.blocks:
            if type(block) is NormFusedDiTBlock and not _hooked(block):
                x, pending = block.forward_deferred(x, c, pending)
            else:
                x, pending = block(_added(x, pending), c), None
        return _added(x, pending)


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run forward hooks of its own or global ones."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)  # fmt: skip


def _added(x: torch.Tensor, residual: Residual | None) -> torch.Tensor:
    """x + gate·update for x (N, T, D) as the plain block adds it, or x when nothing is pending."""
    return x if residual is None else x + residual.gate.unsqueeze(1) * residual.update


def _in_pre_pass(linear: nn.Module, x: torch.Tensor, *per_sample: torch.Tensor) -> bool:
    """Whether linear(modulate(norm(x), shift, scale)) runs in the FP8 pre-pass: `linear` on an FP8 backend, not
    on its few-row route, and adaLN's tensors one (D,) row per sample in x's dtype (else the block computes as
    the plain one: broadcasting, promoting). Module hooks on `linear` do not run on the pre-pass path."""
    rows_per_sample = all(t.shape == (x.shape[0], x.shape[-1]) and t.dtype == x.dtype for t in per_sample)
    return (isinstance(linear, QuantLinear) and linear.backend in FP8_BACKENDS and rows_per_sample
            and not uses_few_row_path(linear, x))  # fmt: skip


def _fusable(activation: nn.Module, linear: nn.Module) -> bool:
    return (
        isinstance(activation, nn.GELU)
        and activation.approximate in _GELU_NAMES
        and _takes_activation(linear)
    )


def _takes_activation(linear: nn.Module) -> bool:
    """A QuantLinear without an input activation yet."""
    return isinstance(linear, QuantLinear) and linear.input_activation is None


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
        and _takes_activation(out)
    )

"""TerDiT (arXiv 2405.14854): ternary quantization-aware training of diffusion transformers, and deployment.

The algorithm, as the paper and its code do it (SPEC §5):

1. Every Linear of attention, feed-forward and adaLN modulation holds a full-precision latent W and serves
   Ŵ = α·W̃, W̃ = RoundClip(W/(γ+ε), −1, 1), γ = mean|W| (ε = 1e-6), α one learned scale per layer
   (initialised to γ) — `ditq.quant.fakequant.FakeQuantLinear`, identity STE. q, k and v keep their own
   γ/α where a model fuses them into one `qkv`. Embedders, the final layer and the norms stay FP.
2. Each block's adaLN output passes an RMSNorm (learnable gain, one RMS over the whole 6·D vector): the
   model option `adaln_norm=True` (DiT, Large-DiT, and the release's `LlamaDiT`).
3. Train with a large initial learning rate (5e-4 in the paper) reduced late in training
   (`TrainConfig(lr_schedule="step")`), from scratch or from FP weights (`init_from`).
4. Deploy: `ditq.qat.convert` packs W̃ into 2-bit codes with α as the per-row scale; `export_packed`
   writes that checkpoint. `load_released` reads the release's own files (HQQ's 2-bit row layout).

Presets: `terdit` (weight-only, as the paper) and `terdit-a8` (plus dynamic 8-bit per-token activations,
ours). The released-network adapter (`llama_dit`) is registered here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq import io
from ditq.adapters import RunFn, ZooAdapter, register_adapter
from ditq.models.loading import read_state_dict
from ditq.models.terdit import LlamaDiT
from ditq.qat import QAT, convert
from ditq.quant.modules import install
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import register_preset

__all__ = [
    "TERDIT",
    "TERDIT_A8",
    "TERDIT_SKIP",
    "export_packed",
    "load_released",
    "released_config",
    "unpack_hqq_2bit",
]

# FP by default: the embedders and the final layer (norms are not Linears and are never quantized).
TERDIT_SKIP = ("x_embedder*", "t_embedder*", "y_embedder*", "final_layer*")

# The adapter's skips with the adaLN modulation quantized: on zoo models, `TERDIT_SKIP`.
TERDIT = register_preset(
    "terdit", QAT(w_format="ternary", w_bits=2, learnable_scale=True, quantize_modulation=True)
)
TERDIT_A8 = register_preset(
    "terdit-a8", QAT(w_format="ternary", w_bits=2, learnable_scale=True, a_bits=8, quantize_modulation=True)
)


# --------------------------------------------------------------------------------------------
# The released network: adapter (ditq.save/load, calibration groups)
# --------------------------------------------------------------------------------------------


class LlamaDiTAdapter(ZooAdapter):
    """`LlamaDiT` keeps its blocks in `layers` and has separate q/k/v: groups of shared inputs differ."""

    def input_groups(self, model: nn.Module, run: RunFn | None = None) -> list[tuple[str, ...]]:
        depth = len(model.layers)
        groups = [(*(f"layers.{i}.adaLN_modulation.1" for i in range(depth)), "final_layer.adaLN_modulation.1")]
        for i in range(depth):
            groups += [tuple(f"layers.{i}.attention.w{p}" for p in "qkv")]
            groups += [(f"layers.{i}.feed_forward.w1", f"layers.{i}.feed_forward.w3")]
        return groups


register_adapter(
    LlamaDiTAdapter(
        LlamaDiT.arch, (*TERDIT_SKIP, "*adaLN_modulation*"), ("*adaLN_modulation*",), model_class=LlamaDiT
    )
)


# --------------------------------------------------------------------------------------------
# Released checkpoints: flat state dicts with HQQ-packed ternary weights
# --------------------------------------------------------------------------------------------


def unpack_hqq_2bit(packed: torch.Tensor) -> torch.Tensor:
    """HQQ's `2bit_u8` axis-0 layout → uint8 codes (4·R, C): byte (r, c) holds rows r, r+R, r+2R, r+3R of
    column c in bits [7:6], [5:4], [3:2], [1:0] (four contiguous row blocks, not interleaved rows)."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"packed ternary weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    return torch.cat([(packed >> shift) & 3 for shift in (6, 4, 2, 0)], dim=0)


def released_config(state: dict[str, torch.Tensor], **given: Any) -> dict[str, Any]:
    """`LlamaDiT` kwargs read from the tensor shapes, completed by `given` (input_size, patch_size,
    num_heads: not in the shapes; defaults 32, 2, 32 — the 256 px release). `model_args.pth` is never read:
    it is a pickle."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"not a TerDiT release: tensor {key!r} is missing")
        return state[key]

    hidden = need("x_embedder.weight").shape[0]
    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    patch = given.pop("patch_size", 2)
    in_channels = need("x_embedder.weight").shape[1] // (patch * patch)
    out_channels = need("final_layer.linear.weight").shape[0] // (patch * patch)
    config = dict(
        input_size=32, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=32, qk_norm="layers.0.attention.q_norm.weight" in state,
        adaln_norm="layers.0.adaLN_modulation.2.weight" in state,
        num_classes=need("y_embedder.embedding_table.weight").shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )  # fmt: skip
    return config | given


def load_released(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", **config: Any
) -> LlamaDiT:
    """A TerDiT release file (`consolidated_ema_ternary.00-of-01.pth`, read weights-only) as a `LlamaDiT`
    whose ternary Linears are ditq 2-bit `QuantLinear`s serving exactly α·(code − 1).

    Each ternary layer is `<name>.weight` (uint8, (out/4, in), HQQ layout, codes t+1 ∈ {0, 1, 2}) plus
    `<name>.alphas` (1,) and, for adaLN, `<name>.bias`. A negative α is served as |α| with the codes
    negated (ditq's scales are positive). Every other tensor must fit the network exactly.
    """
    state = read_state_dict(path)
    cfg = released_config(state, **config)
    with torch.device("meta"):
        model = LlamaDiT(**cfg)
    ternary = sorted(k.removesuffix(".alphas") for k in state if k.endswith(".alphas"))
    spec = QuantSpec(w_bits=2, w_format="ternary")
    for name in ternary:
        linear = model.get_submodule(name)
        packed = state.pop(f"{name}.weight")
        alpha = state.pop(f"{name}.alphas").float().reshape(())
        stored = unpack_hqq_2bit(packed)
        if tuple(stored.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{path}: {name}.weight unpacks to {tuple(stored.shape)}, the network needs "
                             f"{(linear.out_features, linear.in_features)}")
        if int(stored.max()) > 2:
            raise ValueError(f"{path}: {name}.weight holds the code 3, which is not a ternary value")
        codes = (stored.to(torch.int8) - 1) * (-1 if alpha < 0 else 1)
        module = QuantLinear(linear.in_features, linear.out_features, spec, bias=linear.bias is not None)
        scale = alpha.abs() if alpha != 0 else torch.tensor(1.0)
        module.set_codes(codes if alpha != 0 else torch.zeros_like(codes), scale.expand(linear.out_features, 1))
        if linear.bias is not None:
            module.bias.copy_(state.pop(f"{name}.bias"))
        install(model, {name: module.to(device)})
    expected = {k: v for k, v in model.state_dict().items() if v.is_meta}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: does not fit LlamaDiT {cfg}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, mis-shaped {shapes[:5]}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Deployment: the packed 2-bit checkpoint and its size
# --------------------------------------------------------------------------------------------


def export_packed(model: nn.Module, path: str | os.PathLike[str], *, info: dict[str, Any] | None = None,
                  float_dtype: torch.dtype = torch.float16) -> Path:
    """Convert a trained (prepared) ternary model in place to 2-bit codes + float32 scales and save it
    (FP layers in `float_dtype`); `ditq.load(path)` gives it back."""
    convert(model)
    return io.save(model, path, info=info, float_dtype=float_dtype)

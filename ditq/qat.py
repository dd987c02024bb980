"""Quantization-aware training: `prepare(model, QAT(...))` → train → `convert(model)`.

`prepare` swaps every Linear the recipe targets for a `FakeQuantLinear` (latent FP weights, straight-through
gradients); the model trains like any other and saves/loads with `ditq.save`/`ditq.load`. `convert` swaps
each `FakeQuantLinear` for the packed `QuantLinear` that serves the same weights. TerDiT (SPEC §5) is
`QAT(w_format="ternary", w_bits=2, learnable_scale=True)` (preset `terdit`, `ditq.methods.terdit`); a
fused Linear that a model declares in a module's `fused_linears` ({child name: parts}, e.g. DiT's
`qkv` in 3) gets one ternary scale per part (`split_fused`); MatQuant (SPEC §6) is
`QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2))` (preset `matquant`), trained on Σ_r λ_r · L(model at
r bits), λ_r the `nested_weights` (`ditq.training`), and served at any width (`set_served_bits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ditq.api import plan
from ditq.quant.fakequant import FakeQuantLinear, set_served_bits
from ditq.quant.modules import install, is_quantized
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import Needs, Recipe

__all__ = ["QAT", "FakeQuantLinear", "convert", "fused_linears", "prepare", "set_served_bits"]


@dataclass(frozen=True, kw_only=True)
class QAT(Recipe):
    """What a QAT run quantizes and how: weight format and bits, optional dynamic activation quant,
    a learnable scale, and the nested bit-widths one set of stored codes is trained to serve."""

    method: ClassVar[str] = "qat"
    w_bits: int = 4  # the served bit-width (2 for ternary)
    w_format: Literal["int", "ternary"] = "int"
    group_size: int | None = None
    symmetric: bool = True
    a_bits: int | None = None
    a_format: Literal["int", "fp8"] = "int"
    a_group_size: int | None = None
    a_symmetric: bool = True
    learnable_scale: bool = False
    stored_bits: int | None = None  # None = w_bits; MatQuant stores 8
    nested_bits: tuple = ()  # served bit-widths trained jointly, e.g. (8, 4, 2); () = w_bits alone
    nested_weights: tuple = ()  # λ_r, the loss weight of each of nested_bits; () = all 1
    extra_precision: bool = False  # the 2-bit slice keeps its top bucket (`QuantSpec.extra_precision`)
    split_fused: bool = True  # ternary: one γ/α per part of a fused Linear (q, k, v of `qkv`)

    def __post_init__(self) -> None:
        for name in ("nested_bits", "nested_weights"):
            if isinstance(getattr(self, name), list):  # JSON gives lists back
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()
        spec = self.spec()  # QuantSpec names bad bits, formats and group sizes
        if self.learnable_scale and self.w_format == "int" and not self.symmetric:
            raise ValueError("learnable_scale trains symmetric scales only; set symmetric=True")
        if self.nested_bits:
            self._check_nested(spec)
        check_nested_weights(self.nested_weights, self.nested_bits)

    def _check_nested(self, spec: QuantSpec) -> None:
        bits = self.nested_bits
        if self.w_format != "int":
            raise ValueError(
                f"nested_bits={bits} needs int weights; w_format={self.w_format!r} has one bit-width"
            )
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in bits) or len(set(bits)) != len(
            bits
        ):
            raise ValueError(f"nested_bits={bits!r} must be distinct ints")
        if not all(2 <= b <= spec.code_bits for b in bits):
            raise ValueError(
                f"nested_bits={bits} must lie in 2..{spec.code_bits} (the stored bits); set stored_bits "
                f"(e.g. stored_bits={max(bits)})"
            )
        if self.w_bits not in bits:
            raise ValueError(
                f"w_bits={self.w_bits} (the default served bit-width) must be one of nested_bits={bits}"
            )

    def spec(self) -> QuantSpec:
        return self.quant_spec()

    def needs(self) -> Needs:
        return "training"

    @property
    def served_bits(self) -> tuple[int, ...]:
        """The bit-widths a training step takes a loss at: `nested_bits`, or `w_bits` alone."""
        return self.nested_bits or (self.w_bits,)

    @property
    def served_weights(self) -> tuple[float, ...]:
        """λ_r of each of `served_bits`: `nested_weights`, or all 1."""
        return tuple(float(w) for w in self.nested_weights) or (1.0,) * len(self.served_bits)


def check_nested_weights(weights: tuple, bits: tuple) -> None:
    """Raise ValueError unless `weights` (λ_r) is empty or one finite positive number per width of `bits`."""
    if not weights:
        return
    if len(weights) != len(bits):
        raise ValueError(f"nested_weights={weights!r} must give one weight per width of nested_bits={bits!r}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
               for w in weights):
        raise ValueError(f"nested_weights={weights!r} must be finite numbers > 0")


def prepare(model: nn.Module, recipe: QAT) -> nn.Module:
    """Swap, in place, every Linear `recipe` targets for a `FakeQuantLinear` and return the model.

    All layers are built before the first swap, so an error leaves the model as it was.
    """
    if not isinstance(recipe, QAT):
        raise TypeError(f"recipe must be a ditq.qat.QAT, got {type(recipe).__name__}")
    if is_quantized(model):
        raise ValueError(
            f"{type(model).__name__} already holds quantized layers; prepare the full-precision model"
        )
    built = {}
    fused = fused_linears(model)
    for name, module_recipe in plan(model, recipe).items():
        linear = model.get_submodule(name)
        split = module_recipe.split_fused and module_recipe.w_format == "ternary"
        try:
            built[name] = FakeQuantLinear.from_linear(
                linear,
                module_recipe.spec(),
                learnable_scale=module_recipe.learnable_scale,
                chunks=fused.get(name, 1) if split else 1,
            )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    install(model, built)
    model.ditq_recipe = recipe.to_dict()
    return model


def fused_linears(model: nn.Module) -> dict[str, int]:
    """Name → number of equal output parts, for every Linear that fuses several projections (a module's
    `fused_linears` attribute, e.g. `{"qkv": 3}` on DiT's Attention)."""
    found = {}
    for name, module in model.named_modules():
        for child, parts in getattr(module, "fused_linears", {}).items():
            found[f"{name}.{child}" if name else child] = parts
    return found


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Swap, in place, every `FakeQuantLinear` for the packed `QuantLinear` serving the same weights.

    The spec (served and stored bits) is kept, so a nested layer stays convertible to its other slices.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no FakeQuantLinear; prepare it with ditq.qat.prepare first"
        )
    built = {}
    for name, fake in layers:
        packed = QuantLinear(
            fake.in_features,
            fake.out_features,
            fake.spec,
            bias=fake.bias is not None,
            device=fake.weight.device,
            dtype=fake.weight.dtype,
        )
        packed.set_codes(*fake.codes_and_scales())
        if fake.bias is not None:
            packed.bias.copy_(fake.bias)
        built[name] = packed
    install(model, built)
    return model

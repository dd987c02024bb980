"""Q-DiT (Chen et al., arXiv 2406.17343): group quantization with a group size per layer, GPTQ weights and
sample-wise dynamic activations.

The algorithm box, per quantized Linear l with group size g_l (the search in `ditq.search` picks the g_l):

    weights      W_l (out, in): GPTQ (`ditq.methods.gptq`) with H = mean x xᵀ over the layer's calibration
                 inputs (captured along the FP model's own sampling trajectories), asymmetric min/max grid,
                 one (scale, zero) per output row per g_l input channels (g_l = None: per output row).
                 Every layer gets its *own* g_l (the released code passed only the first one to GPTQ).
    activations  x (..., in): asymmetric, one (scale, zero) per token per g_l channels, computed at run time
                 from the tensor itself, so per sample and per timestep ("sample-wise dynamic"); the group is
                 the layer's weight group, as the paper couples them (`a_granularity="token"`: per token).
                 `a_dynamic=False` is the ablation: one scale (and zero) per channel group, calibrated once.

A recipe holds the default g (`group_size`) and the per-layer assignment as `overrides`
(`QDiT.with_groups({name: g})`), so a searched assignment is an ordinary recipe file for `ditq quantize`.
Inside `gptq_cache()` GPTQ results are memoised per (layer, spec): a search re-quantizes the same layers at
the same few group sizes hundreds of times with exactly the quantizer of the final model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.calib import CalibData
from ditq.checks import naming_layer
from ditq.methods.gptq import gptq, hessian
from ditq.quant.primitives import compute_qparams
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import Needs, Recipe, register_preset
from ditq.registry import register_method

__all__ = ["QDiT", "average_bits_per_weight", "gptq_cache", "qdit_linear", "static_act_qparams"]


@dataclass(frozen=True, kw_only=True)
class QDiT(Recipe):
    """Q-DiT: GPTQ weights at a per-layer group size, dynamic asymmetric per-token-group activations."""

    method: ClassVar[str] = "qdit"
    w_bits: int = 4
    group_size: int | None = 128  # the default g; per-layer g via overrides (`with_groups`)
    symmetric: bool = False
    a_bits: int | None = 8
    a_granularity: Literal["group", "token"] = "group"  # "group": the layer's weight group (the paper)
    a_symmetric: bool = False
    a_dynamic: bool = True
    gptq: bool = True  # False: round-to-nearest weights (the baseline of the ablation)
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec()  # bits, formats and group sizes validated by QuantSpec
        if self.block_size <= 0:
            raise ValueError(f"QDiT.block_size={self.block_size} must be a positive int")
        if not 0 <= self.damp <= 1:
            raise ValueError(f"QDiT.damp={self.damp} must lie in [0, 1]")

    def needs(self) -> Needs:
        """GPTQ reads each layer's calibration inputs, and static activation scales their ranges (here or in an
        override)."""
        return "calibration" if any(r.gptq or (r.a_bits is not None and not r.a_dynamic)
                                    for r in self.variants()) else "nothing"

    def spec(self) -> QuantSpec:
        act_group = self.group_size if self.a_granularity == "group" and self.a_bits is not None else None
        return QuantSpec(
            w_bits=self.w_bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            a_bits=self.a_bits,
            a_group_size=act_group,
            a_symmetric=self.a_symmetric if self.a_bits is not None else True,
            a_dynamic=self.a_dynamic,
        )

    @classmethod
    def with_groups(cls, groups: Mapping[str, int | None], **fields: Any) -> QDiT:
        """A recipe whose layer `name` uses group size `groups[name]` (None: per channel / per token).

        Names are exact module names (they contain no wildcard), so each override hits one layer.
        """
        if not isinstance(groups, Mapping):
            raise TypeError(f"groups must map module names to group sizes, got {type(groups).__name__}")
        odd = sorted(name for name in groups if not isinstance(name, str) or any(c in name for c in "*?[]"))
        if odd:
            raise ValueError(f"groups keys must be exact module names (no wildcards), got {odd}")
        overrides = dict(fields.pop("overrides", {}))
        overrides |= {name: {"group_size": g} for name, g in groups.items()}
        return cls(overrides=overrides, **fields)


# ---- GPTQ memo (only inside `gptq_cache()`) --------------------------------------------------------------

_CACHE: ContextVar[dict | None] = ContextVar("ditq_qdit_gptq_cache", default=None)


@contextmanager
def gptq_cache() -> Iterator[dict]:
    """Memoise Hessians and GPTQ codes per (layer, weight spec) while inside; the memo is dropped on exit.

    An entry is reused only for the very same weight tensor (unmodified) and calibration rows.
    """
    memo: dict = {}
    token = _CACHE.set(memo)
    try:
        yield memo
    finally:
        _CACHE.reset(token)


def _memo(key: tuple, sources: tuple[torch.Tensor, ...], compute: Any) -> Any:
    memo = _CACHE.get()
    if memo is None:
        return compute()
    stamp = tuple((id(t), t._version) for t in sources)
    hit = memo.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[2]
    value = compute()
    memo[key] = (stamp, sources, value)  # keeping `sources` alive keeps their ids unique
    return value


# ---- the method ------------------------------------------------------------------------------------------


@register_method(QDiT)
def quantize_qdit(model: nn.Module, targets: dict[str, QDiT], calib: CalibData | None) -> dict[str, nn.Module]:
    layers = {name: (model.get_submodule(name), recipe) for name, recipe in targets.items()}
    for name, (linear, recipe) in layers.items():  # every check before any (slow) GPTQ
        check_qdit(name, linear, recipe, calib)
    return {
        name: qdit_linear(name, linear, recipe, calib)
        for name, (linear, recipe) in tqdm(layers.items(), desc="Q-DiT", leave=False, disable=len(layers) < 50)
    }


def check_qdit(name: str, linear: nn.Linear, recipe: QDiT, calib: CalibData | None) -> None:
    """Raise, naming the layer, if `qdit_linear` could not quantize `linear` with `recipe`."""
    spec = recipe.spec()
    try:
        spec.check_fits(linear.in_features, linear.out_features)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if not bool(torch.isfinite(linear.weight).all()):
        raise ValueError(f"{name}: weight holds NaN or infinite values")
    static = spec.a_bits is not None and not spec.a_dynamic
    if recipe.gptq or static:
        why = "GPTQ (gptq=True)" if recipe.gptq else "static activation scales (a_dynamic=False)"
        if calib is None:
            raise ValueError(f"{name}: Q-DiT {why} needs calibration data: pass calib=")
        calib.require(name, rows=recipe.gptq or not spec.a_symmetric)


def qdit_linear(name: str, linear: nn.Linear, recipe: QDiT, calib: CalibData | None) -> QuantLinear:
    """`linear` quantized per `recipe` (its own group size); `check_qdit` must have passed."""
    spec = recipe.spec()
    act_scale = act_zero = None
    if spec.a_bits is not None and not spec.a_dynamic:
        act_scale, act_zero = static_act_qparams(name, calib, spec)
    module = QuantLinear.from_linear(linear, spec, act_scale=act_scale, act_zero=act_zero)
    if recipe.gptq:
        weight = linear.weight
        rows = calib.inputs[name]
        hyper = (spec.w_bits, spec.group_size, spec.symmetric, recipe.block_size, recipe.damp, recipe.act_order)
        with naming_layer(name):
            h = _memo(("hessian", name), (rows,), lambda: hessian(rows.to(weight.device)))
            codes, scales, zeros = _memo(
                ("gptq", name, hyper), (weight, rows),
                lambda: gptq(weight, h, spec, block_size=recipe.block_size, damp=recipe.damp,
                             act_order=recipe.act_order),
            )
        module.set_codes(codes, scales, zeros)
    return module


def static_act_qparams(name: str, calib: CalibData, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One activation (scale, zero) per channel group (per tensor for `a_group_size=None`), for all timesteps.

    Symmetric: from the per-channel absmax over everything calibration saw. Asymmetric: from the min/max of
    the layer's sampled calibration rows.
    """
    group = spec.a_group_size
    if spec.a_symmetric:
        absmax = calib.absmax[name].float()
        lo, hi = -absmax, absmax
    else:
        rows = calib.inputs[name].float()
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
    # Interleave each channel's (lo, hi) so that a group of 2g values holds exactly the g channels' extremes.
    extremes = torch.stack([lo, hi], dim=-1).reshape(1, -1)  # (1, 2·in)
    scale, zero = compute_qparams(extremes, spec.a_bits, None if group is None else 2 * group, spec.a_symmetric)
    return scale.reshape(-1), None if zero is None else zero.reshape(-1)


def average_bits_per_weight(model: nn.Module, recipe: Recipe) -> float:
    """Stored bits per weight of everything `recipe` quantizes in `model`, weighted by layer size.

    Codes, scales and zeros at their stored widths (`QuantSpec.bits_per_weight`); works for any recipe
    with a `spec()` (RTN, QDiT).
    """
    from ditq.api import plan  # api imports the methods package

    total = weights = 0.0
    for name, layer_recipe in plan(model, recipe).items():
        linear = model.get_submodule(name)
        size = linear.in_features * linear.out_features
        try:
            total += layer_recipe.spec().bits_per_weight(linear.in_features, linear.out_features) * size
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        weights += size
    return total / weights


register_preset("qdit-w4a8", QDiT(w_bits=4, a_bits=8, group_size=128))
register_preset("qdit-w6a8", QDiT(w_bits=6, a_bits=8, group_size=128))

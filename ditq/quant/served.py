"""Which slice each nested layer of a model serves (MatQuant, SPEC §6), and what that slice costs.

A nested layer (a `QuantLinear` or `FakeQuantLinear` whose `spec.stored_bits` is set) keeps one set of
int8 codes and serves its r most significant bits; `set_served_bits` / `ditq.io.apply_served_bits` move it
between slices. A served-bits plan maps layer-name patterns to widths, the first matching pattern winning,
as `ditq.load(path, bits=...)` reads it.

A slice is costed as a layer of its own (`standalone_spec`), not as the int8 checkpoint every slice is cut
from, in one of two ways (`COSTS`):

- "nominal" (the default): log2 of the slice's levels (r bits, log2 5 ≈ 2.32 for the extra-precision int2)
  plus the shared scales: the effective bits MatQuant's paper reports, the budget users compare widths by
  (int3 costs 3 bits, less than int4);
- "stored": its codes at their packed slot width plus the scales (`QuantSpec.bits_per_weight`), what the
  exported file takes (`ditq.export_served`): 5–7-bit codes take a byte and 3-bit codes four bits, so int6
  costs as much as int8 and int3 as much as int4.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Mapping
from dataclasses import replace
from fnmatch import fnmatchcase

from torch import nn

from ditq.quant.fakequant import FakeQuantLinear
from ditq.quant.packing import slot_bits
from ditq.quant.primitives import slice_range
from ditq.quant.qlinear import QuantLinear, served_spec
from ditq.quant.spec import QuantSpec

__all__ = ["COSTS", "average_bits", "exact_plan", "nested_layers", "served_widths", "slice_bits_per_weight",
           "standalone_spec"]

COSTS = ("nominal", "stored")


def nested_layers(model: nn.Module) -> dict[str, QuantLinear | FakeQuantLinear]:
    """Name → layer for every nested layer of `model`, in module order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (QuantLinear, FakeQuantLinear)) and module.spec.stored_bits is not None
    }


def served_widths(model: nn.Module, plan: Mapping[str, int] | None = None, *, complete: bool = False
                  ) -> dict[str, int]:
    """Name → served bits of every nested layer: now (`plan` None), or once `plan` is applied.

    Checks the plan as applying it would, without touching the model: every pattern must match a nested
    layer and every width must be a slice of the layer's stored codes (ValueError naming the culprit);
    `complete`: every nested layer must match a pattern, so the plan alone decides what is served.
    """
    layers = nested_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nested layer (spec.stored_bits set) to serve")
    widths = {name: layer.spec.w_bits for name, layer in layers.items()}
    if plan is None:
        return widths
    claimed: set[str] = set()
    for pattern, bits in plan.items():
        matched = [name for name in layers if fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"pattern {pattern!r} matches no nested layer of {type(model).__name__}")
        for name in matched:
            try:
                served_spec(layers[name].spec, bits)
            except ValueError as err:
                raise ValueError(f"pattern {pattern!r} → {bits!r}: layer {name!r}: {err}") from None
            if name not in claimed:  # the first matching pattern wins
                widths[name] = bits
                claimed.add(name)
    unclaimed = [name for name in layers if name not in claimed]
    if complete and unclaimed:
        raise ValueError(f"no pattern matches nested layers {unclaimed[:3]}{' …' if len(unclaimed) > 3 else ''}; "
                         "end the plan with a '*' pattern")
    return widths


def exact_plan(widths: Mapping[str, int]) -> dict[str, int]:
    """The served-bits plan that serves each named layer its width: names escaped into exact patterns."""
    return {glob.escape(name): bits for name, bits in widths.items()}


def standalone_spec(spec: QuantSpec, bits: int) -> QuantSpec:
    """The spec of the `bits`-bit slice of nested `spec` as a plain layer (`stored_bits` unset): its codes
    are the slice's own units, so an extra-precision int2 slice (levels −2..2) is a 3-bit layer."""
    served = served_spec(spec, bits)
    lo, hi = slice_range(bits, served.extra_precision)
    return replace(served, w_bits=(hi - lo).bit_length(), stored_bits=None, extra_precision=False)


def slice_bits_per_weight(spec: QuantSpec, bits: int, in_features: int, out_features: int,
                          cost: str = "nominal") -> float:
    """Bits per weight of the `bits`-bit slice of a nested layer as a layer of its own, by `cost` (`COSTS`)."""
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is not one of {COSTS}")
    alone = standalone_spec(spec, bits)
    stored = alone.bits_per_weight(in_features, out_features)
    if cost == "stored":
        return stored
    lo, hi = slice_range(bits, spec.extra_precision)
    return stored - slot_bits(alone.w_bits) + math.log2(hi - lo + 1)


def average_bits(model: nn.Module, widths: Mapping[str, int], cost: str = "nominal") -> float:
    """Bits per weight of `model`'s nested layers served at `widths` (every nested layer named), by `cost`
    (`COSTS`), averaged with each layer weighted by its number of weights."""
    layers = nested_layers(model)
    missing = sorted(set(layers) - set(widths))
    if missing:
        raise ValueError(f"widths lack nested layers {missing[:3]}{' …' if len(missing) > 3 else ''}")
    total = sum(
        slice_bits_per_weight(m.spec, widths[n], m.in_features, m.out_features, cost) * m.in_features * m.out_features
        for n, m in layers.items()
    )
    return total / sum(m.in_features * m.out_features for m in layers.values())

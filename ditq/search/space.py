"""The search space of Q-DiT's granularity allocation: one group size per quantized Linear, under a bit budget.

A genome is a tuple of group sizes (None = per channel), one per layer in `SearchSpace.names` order. A layer
only offers candidates that divide its input width, and a candidate that makes a single group (g = in) is the
same quantizer as per channel, so only per channel is kept. Its cost is the layer's exact stored bits per
weight (`QuantSpec.bits_per_weight`: codes, scales and zeros at their stored widths); a genome's cost is the
average over all its layers weighted by their number of weights, and must not exceed the budget: the same
average for a uniform baseline (`"g128"`) or a number of bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from torch import nn

from ditq.api import plan
from ditq.methods.qdit import QDiT

Genome = tuple[int | None, ...]
DEFAULT_CANDIDATES: tuple[int | None, ...] = (32, 64, 128, 256, None)
BUDGET_SLACK = 1e-9  # float rounding only: a uniform baseline is exactly within its own budget


def group_label(group: int | None) -> str:
    return "ch" if group is None else str(group)


def parse_group(text: str) -> int | None:
    """`"64"` → 64, `"ch"`/`"none"` → None (per channel)."""
    if text.strip().lower() in ("ch", "none", "channel", "per-channel"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"group size {text!r} must be a positive int or 'ch' (per channel)") from None
    if value <= 0:
        raise ValueError(f"group size {text!r} must be a positive int or 'ch' (per channel)")
    return value


def check_budget(budget: str | float) -> str | float:
    """`budget` when it is a uniform baseline (`"g<N>"`, `"ch"`) or a finite number of bits per weight > 0."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget={budget!r} must be a finite, positive number of bits per weight")
        return budget
    if not isinstance(budget, str) or not (budget.startswith("g") or budget in ("ch", "none")):
        raise ValueError(f"budget={budget!r} must be 'g<group size>' (e.g. 'g128'), 'ch' or bits per weight")
    if budget.startswith("g"):
        try:
            parse_group(budget[1:])
        except ValueError as err:
            raise ValueError(f"budget={budget!r}: {err}") from None
    return budget


@dataclass(frozen=True)
class SearchSpace:
    """Layers, their allowed group sizes, each choice's bits per weight, and the budget (average bits)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]  # weights per layer (in·out)
    choices: tuple[tuple[int | None, ...], ...]  # allowed group sizes per layer, finest first
    bits: tuple[dict[int | None, float], ...]  # bits per weight of each allowed choice
    budget: float  # the largest allowed average bits per weight
    base: QDiT  # the recipe every candidate shares (bits, GPTQ, activations)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        base: QDiT,
        candidates: Sequence[int | None] = DEFAULT_CANDIDATES,
        budget: str | float = "g128",
    ) -> SearchSpace:
        """The space of `base`'s layers in `model`; `budget` is `"g<N>"`, `"ch"` or average bits per weight."""
        if not isinstance(base, QDiT):
            raise TypeError(f"the search needs a QDiT base recipe, got {type(base).__name__}")
        if not candidates:
            raise ValueError("candidates must name at least one group size")
        for g in candidates:
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
                raise ValueError(f"candidate group size {g!r} must be a positive int or None (per channel)")
        base = replace(base, overrides=())
        names, sizes, choices, bits = [], [], [], []
        for name in plan(model, base):
            linear = model.get_submodule(name)
            in_f, out_f = linear.in_features, linear.out_features
            per_channel = None in candidates
            allowed: list[int | None] = [
                g for g in sorted({c for c in candidates if c is not None})
                if in_f % g == 0 and not (g == in_f and per_channel)  # g = in is per channel again
            ] + ([None] if per_channel else [])
            if not allowed:
                raise ValueError(f"layer {name!r} (in_features={in_f}): no candidate group size in "
                                 f"{[group_label(c) for c in candidates]} divides it")  # fmt: skip
            names.append(name)
            sizes.append(in_f * out_f)
            choices.append(tuple(allowed))
            bits.append({g: _bits(base, g, in_f, out_f) for g in allowed})
        space = cls(tuple(names), tuple(sizes), tuple(choices), tuple(bits), 0.0, base)
        limit = space.budget_bits(model, budget)
        cheapest = space.average_bits(tuple(min(c, key=lambda g, b=b: b[g]) for c, b in zip(choices, bits, strict=True)))
        if cheapest > limit + BUDGET_SLACK:
            raise ValueError(f"budget {budget!r} ({limit:.4f} bits per weight) is below the cheapest assignment "
                             f"({cheapest:.4f}); raise the budget or add coarser candidates")  # fmt: skip
        return replace(space, budget=limit)

    def budget_bits(self, model: nn.Module, budget: str | float) -> float:
        """Average bits per weight of a uniform baseline (`"g128"`, `"ch"`) or the number itself."""
        if not isinstance(check_budget(budget), str):
            return float(budget)
        group = None if budget in ("ch", "none") else parse_group(budget[1:])
        total = 0.0
        for name, size in zip(self.names, self.sizes, strict=True):
            linear = model.get_submodule(name)
            try:
                total += _bits(self.base, group, linear.in_features, linear.out_features) * size
            except ValueError as err:
                raise ValueError(f"budget {budget!r}: layer {name!r}: {err}") from None
        return total / sum(self.sizes)

    def average_bits(self, genome: Genome) -> float:
        self.check(genome)
        return sum(b[g] * n for b, g, n in zip(self.bits, genome, self.sizes, strict=True)) / sum(self.sizes)

    def within_budget(self, genome: Genome) -> bool:
        return self.average_bits(genome) <= self.budget + BUDGET_SLACK

    def check(self, genome: Genome) -> None:
        if len(genome) != len(self.names):
            raise ValueError(f"a genome needs {len(self.names)} group sizes, got {len(genome)}")
        for name, allowed, g in zip(self.names, self.choices, genome, strict=True):
            if g not in allowed:
                raise ValueError(f"layer {name!r}: group size {group_label(g)} is not one of "
                                 f"{[group_label(a) for a in allowed]}")  # fmt: skip

    def uniform(self, group: int | None) -> Genome:
        """Every layer at `group` (layers it cannot divide or that it spans fall back to per channel)."""
        return tuple(group if group in allowed else None if None in allowed else allowed[-1]
                     for allowed in self.choices)  # fmt: skip

    def assignment(self, genome: Genome) -> dict[str, int | None]:
        self.check(genome)
        return dict(zip(self.names, genome, strict=True))

    def genome(self, assignment: Mapping[str, int | None]) -> Genome:
        missing = sorted(set(self.names) - set(assignment))
        if missing:
            raise ValueError(f"assignment lacks layers {missing}")
        genome = tuple(assignment[name] for name in self.names)
        self.check(genome)
        return genome

    def recipe(self, genome: Genome) -> QDiT:
        """The searched assignment as a recipe `ditq quantize --recipe` accepts."""
        return QDiT.with_groups(self.assignment(genome), **_fields(self.base))


def genome_key(genome: Genome) -> str:
    """The fitness cache's key: group sizes in layer order, e.g. `128,64,ch`."""
    return ",".join(group_label(g) for g in genome)


def genome_from_key(key: str) -> Genome:
    return tuple(parse_group(part) for part in key.split(","))


def _bits(base: QDiT, group: int | None, in_f: int, out_f: int) -> float:
    return replace(base, group_size=group).spec().bits_per_weight(in_f, out_f)


def _fields(recipe: QDiT) -> dict:
    data = recipe.to_dict()
    data.pop("method")
    data.pop("overrides")
    if data["skip"] is not None:
        data["skip"] = tuple(data["skip"])
    return data

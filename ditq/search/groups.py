"""Q-DiT's granularity allocation: one group size per quantized Linear (None = per channel), under a budget.

A layer only offers candidates that divide its input width, and a candidate that makes a single group
(g = in) is the same quantizer as per channel, so only per channel is kept. The budget is a number of bits
per weight or a uniform baseline's average (`"g128"`, `"ch"`), which also seeds the first population. A
candidate is the FP model requantized with the genome's groups, exactly as `ditq quantize` builds it from
the recipe the search writes (GPTQ memoised per layer and group size while the search runs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from torch import nn

from ditq.api import plan, requantize
from ditq.calib import CalibData
from ditq.kernels import prepare_for_inference
from ditq.methods.qdit import QDiT, gptq_cache
from ditq.search.space import Gene, Genome, SearchSpace, check_bits_budget, gene_label, parse_gene

DEFAULT_CANDIDATES: tuple[int | None, ...] = (32, 64, 128, 256, None)


def check_budget(budget: str | float) -> str | float:
    """`budget` when it is a uniform baseline (`"g<N>"`, `"ch"`) or a finite number of bits per weight > 0."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        check_bits_budget(budget)
        return budget
    if not isinstance(budget, str) or not (budget.startswith("g") or budget in ("ch", "none")):
        raise ValueError(f"budget={budget!r} must be 'g<group size>' (e.g. 'g128'), 'ch' or bits per weight")
    if budget.startswith("g"):
        try:
            parse_gene(budget[1:])
        except ValueError as err:
            raise ValueError(f"budget={budget!r}: {err}") from None
    return budget


class GroupSearch:
    """The group-size space of `base`'s layers in `fp_model` and how a genome becomes a model to score.

    `calib` (GPTQ's inputs, static activation scales) is read only by `candidate`, so a caller may check the
    space against a saved search before calibrating, then set it.
    """

    output_file = "recipe.json"

    def __init__(
        self,
        fp_model: nn.Module,
        base: QDiT,
        candidates: Sequence[int | None] = DEFAULT_CANDIDATES,
        budget: str | float = "g128",
        *,
        calib: CalibData | None = None,
        backend: str = "dequantized",
    ) -> None:
        if not isinstance(base, QDiT):
            raise TypeError(f"the search needs a QDiT base recipe, got {type(base).__name__}")
        if not candidates:
            raise ValueError("candidates must name at least one group size")
        for g in candidates:
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
                raise ValueError(f"candidate group size {g!r} must be a positive int or None (per channel)")
        check_budget(budget)
        self.fp_model, self.base, self.calib, self.backend = fp_model, replace(base, overrides=()), calib, backend
        self.candidates, self.budget_given = tuple(candidates), budget
        names, sizes, choices, bits = [], [], [], []
        for name in plan(fp_model, self.base):
            linear = fp_model.get_submodule(name)
            in_f, out_f = linear.in_features, linear.out_features
            per_channel = None in candidates
            allowed: list[int | None] = [
                g for g in sorted({c for c in candidates if c is not None})
                if in_f % g == 0 and not (g == in_f and per_channel)  # g = in is per channel again
            ] + ([None] if per_channel else [])
            if not allowed:
                raise ValueError(f"layer {name!r} (in_features={in_f}): no candidate group size in "
                                 f"{[gene_label(c) for c in candidates]} divides it")  # fmt: skip
            names.append(name)
            sizes.append(in_f * out_f)
            choices.append(tuple(allowed))
            bits.append({g: self._bits(g, in_f, out_f) for g in allowed})
        self.names, self.sizes = tuple(names), tuple(sizes)
        self.space = SearchSpace(self.names, self.sizes, tuple(choices), tuple(bits), self._budget_bits(budget))

    def settings(self) -> dict[str, Any]:
        """What makes this search this one, beside the genetic algorithm's settings (a resume must match)."""
        return {"space": {"kind": "groups", "candidates": [gene_label(c) for c in self.candidates],
                          "budget": self.budget_given, "backend": self.backend},
                "base": self.base.to_dict()}  # fmt: skip

    def initial(self) -> list[Genome]:
        """The uniform baseline the budget names (if it fits), to seed the first population."""
        if not isinstance(self.budget_given, str):
            return []
        baseline = self.uniform(None if self.budget_given in ("ch", "none") else parse_gene(self.budget_given[1:]))
        return [baseline] if self.space.within_budget(baseline) else []

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        with gptq_cache():
            yield

    def candidate(self, genome: Genome) -> nn.Module:
        """The FP model with `genome`'s group sizes, built by `requantize` exactly as `ditq quantize` builds it."""
        model = requantize(self.fp_model, dict.fromkeys(self.names, self.recipe(genome)), self.calib)
        return prepare_for_inference(model, self.backend)

    def output(self, genome: Genome) -> dict[str, Any]:
        """The searched assignment as a recipe `ditq quantize --recipe` accepts."""
        return self.recipe(genome).to_dict()

    def recipe(self, genome: Genome) -> QDiT:
        return QDiT.with_groups(self.space.assignment(genome), **_fields(self.base))

    def uniform(self, group: Gene) -> Genome:
        """Every layer at `group` (layers it cannot divide or that it spans fall back to per channel)."""
        return tuple(group if group in allowed else None if None in allowed else allowed[-1]
                     for allowed in self.space.choices)  # fmt: skip

    def _budget_bits(self, budget: str | float) -> float:
        """Average bits per weight of a uniform baseline (`"g128"`, `"ch"`) or the number itself."""
        if not isinstance(budget, str):
            return float(budget)
        group = None if budget in ("ch", "none") else parse_gene(budget[1:])
        total = 0.0
        for name, size in zip(self.names, self.sizes, strict=True):
            linear = self.fp_model.get_submodule(name)
            try:
                total += self._bits(group, linear.in_features, linear.out_features) * size
            except ValueError as err:
                raise ValueError(f"budget {budget!r}: layer {name!r}: {err}") from None
        return total / sum(self.sizes)

    def _bits(self, group: Gene, in_f: int, out_f: int) -> float:
        return replace(self.base, group_size=group).spec().bits_per_weight(in_f, out_f)


def _fields(recipe: QDiT) -> dict:
    data = recipe.to_dict()
    data.pop("method")
    data.pop("overrides")
    if data["skip"] is not None:
        data["skip"] = tuple(data["skip"])
    return data

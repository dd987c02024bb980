"""A per-layer search space: one choice per layer, each choice's stored bits, and a budget on their average.

Two spaces share it: Q-DiT's group sizes (`ditq.search.groups`, a gene is a group size, None = per channel)
and MatQuant's served bit-widths (`ditq.search.bits`, a gene is a width). A genome is a tuple of genes, one
per layer in `SearchSpace.names` order. Its cost is the average over the layers of each choice's exact
stored bits per weight (`QuantSpec.bits_per_weight`: codes, scales and zeros at their stored widths),
weighted by the layers' numbers of weights; it must not exceed the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Gene = int | None
Genome = tuple[Gene, ...]
BUDGET_SLACK = 1e-9  # float rounding only: a uniform baseline is exactly within its own budget


def gene_label(gene: Gene) -> str:
    """A gene as the fitness cache's keys write it: the int, or "ch" for None (per channel)."""
    return "ch" if gene is None else str(gene)


def parse_gene(text: str) -> Gene:
    """`"64"` → 64, `"ch"`/`"none"` → None (per channel)."""
    if text.strip().lower() in ("ch", "none", "channel", "per-channel"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} must be a positive int or 'ch' (per channel)") from None
    if value <= 0:
        raise ValueError(f"{text!r} must be a positive int or 'ch' (per channel)")
    return value


def genome_key(genome: Genome) -> str:
    """The fitness cache's key: genes in layer order, e.g. `128,64,ch` or `8,4,2`."""
    return ",".join(gene_label(g) for g in genome)


def genome_from_key(key: str) -> Genome:
    return tuple(parse_gene(part) for part in key.split(","))


def check_bits_budget(budget: float) -> float:
    """`budget` when it is a finite number of bits per weight > 0."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r} must be a finite, positive number of bits per weight")
    return float(budget)


@dataclass(frozen=True)
class SearchSpace:
    """Layers, their allowed choices, each choice's bits per weight, and the budget (average bits)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]  # weights per layer (in·out)
    choices: tuple[tuple[Gene, ...], ...]  # allowed genes per layer, costliest first
    bits: tuple[dict[Gene, float], ...]  # bits per weight of each allowed choice
    budget: float  # the largest allowed average bits per weight
    what: str = "group size"  # what a gene is, for messages

    def __post_init__(self) -> None:
        cheapest = self.average_bits(tuple(min(c, key=b.__getitem__) for c, b in zip(self.choices, self.bits,
                                                                                       strict=True)))  # fmt: skip
        if cheapest > self.budget + BUDGET_SLACK:
            raise ValueError(f"a budget of {self.budget:.4f} bits per weight is below the cheapest assignment "
                             f"({cheapest:.4f}); raise the budget or add cheaper candidates")  # fmt: skip

    def average_bits(self, genome: Genome) -> float:
        self.check(genome)
        return sum(b[g] * n for b, g, n in zip(self.bits, genome, self.sizes, strict=True)) / sum(self.sizes)

    def within_budget(self, genome: Genome) -> bool:
        return self.average_bits(genome) <= self.budget + BUDGET_SLACK

    def check(self, genome: Genome) -> None:
        if len(genome) != len(self.names):
            raise ValueError(f"a genome needs {len(self.names)} genes ({self.what}s), got {len(genome)}")
        for name, allowed, g in zip(self.names, self.choices, genome, strict=True):
            if g not in allowed:
                raise ValueError(f"layer {name!r}: {self.what} {gene_label(g)} is not one of "
                                 f"{[gene_label(a) for a in allowed]}")  # fmt: skip

    def assignment(self, genome: Genome) -> dict[str, Gene]:
        self.check(genome)
        return dict(zip(self.names, genome, strict=True))

    def genome(self, assignment: Mapping[str, Gene]) -> Genome:
        missing = sorted(set(self.names) - set(assignment))
        if missing:
            raise ValueError(f"assignment lacks layers {missing}")
        genome = tuple(assignment[name] for name in self.names)
        self.check(genome)
        return genome


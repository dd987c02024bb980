"""Per-layer sensitivity and the allocation it implies: a cheap alternative to the evolutionary search.

    f₀ ← fitness(baseline)                                   (e.g. uniform int3, or g128 everywhere)
    for each layer ℓ and each other choice c of ℓ:
        Δ[ℓ, c] ← fitness(baseline with ℓ set to c) − f₀      (one evaluation per change)
    for a price μ ≥ 0 of one bit per weight (averaged over the model):
        gene[ℓ] ← argmin_c Δ[ℓ, c] + μ · bits(ℓ, c) · size(ℓ) / Σ sizes   (Δ[ℓ, baseline gene] = 0)
    μ ← the lowest price whose genome fits the budget (bisection; the cost falls as μ rises)
    while a single-layer change that fits the budget lowers the predicted fitness: make the best one
    return that genome, or the baseline if it fits and is predicted better

This is the Lagrangian relaxation of the multiple-choice knapsack "least total Δ under the budget", exact
where the price exhausts the budget; the greedy steps spend what it leaves over. The prediction is exact
when the layers' effects add up; how far they do not shows as the gap between the predicted fitness
(f₀ + Σ Δ) and the one measured. Mixed-precision allocation for DNNs (HAWQ and its successors) works on
this principle with Hessian traces; here Δ is measured directly with the search's own fitness. On a diffusion
model the teacher-forced `output` fitness adds up well (one step's errors are independent), but it does not
see errors compounding along the sampling chain; a sampled-chain fitness sees them and does not add up
(docs/results.md, MatQuant: measured both ways on DiT-MNIST). Sample the plan before trusting it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tqdm.auto import tqdm

from ditq.search.fitness import Fitness
from ditq.search.run import Search
from ditq.search.space import Gene, Genome, SearchSpace, genome_key

BISECTION_STEPS = 60  # halvings of the price interval: far below any difference in bits that matters


@dataclass(frozen=True)
class Sensitivity:
    """The baseline's fitness and, per layer, the fitness change of each single-layer change from it."""

    baseline: Genome
    fitness: float
    deltas: tuple[dict[Gene, float], ...]  # per layer: gene → Δ fitness (0 for the baseline's own gene)

    def predicted(self, genome: Genome) -> float:
        """The fitness of `genome` if the layers' effects added up."""
        return self.fitness + sum(d[g] for d, g in zip(self.deltas, genome, strict=True))


def measure_sensitivity(
    search: Search, fitness: Fitness, baseline: Genome, *, progress: bool = True
) -> Sensitivity:
    """Evaluate `baseline` and every genome that differs from it in one layer (Σ (choices − 1) + 1 evaluations)."""
    space = search.space
    space.check(baseline)
    changes = [(i, g) for i, allowed in enumerate(space.choices) for g in allowed if g != baseline[i]]
    deltas: tuple[dict[Gene, float], ...] = tuple({g: 0.0} for g in baseline)
    with search.evaluating():
        base = float(fitness(search.candidate(baseline)))
        for i, gene in tqdm(changes, desc="sensitivity", disable=not progress):
            changed = baseline[:i] + (gene,) + baseline[i + 1 :]
            deltas[i][gene] = float(fitness(search.candidate(changed))) - base
    if not all(math.isfinite(v) for v in (base, *(v for d in deltas for v in d.values()))):
        raise ValueError(f"a fitness near the baseline {genome_key(baseline)} is not finite: the allocation ranks "
                         "finite changes only (are the quantized model's outputs finite?)")  # fmt: skip
    return Sensitivity(baseline, base, deltas)


def allocate(space: SearchSpace, sensitivity: Sensitivity) -> Genome:
    """The genome the sensitivities predict best within `space.budget` (the module's algorithm)."""
    space.check(sensitivity.baseline)
    for name, allowed, delta in zip(space.names, space.choices, sensitivity.deltas, strict=True):
        if not set(allowed) <= set(delta):
            raise ValueError(f"layer {name!r}: the sensitivities measured {sorted(map(str, delta))}, not every choice "
                             f"of this space ({sorted(map(str, allowed))})")  # fmt: skip
    total = sum(space.sizes)

    def at_price(price: float) -> Genome:
        return tuple(
            min(allowed, key=lambda g, b=bits, d=delta, n=size: d[g] + price * b[g] * n / total)
            for allowed, bits, delta, size in zip(space.choices, space.bits, sensitivity.deltas, space.sizes,
                                                  strict=True)
        )  # fmt: skip

    genome = at_price(0.0)
    if not space.within_budget(genome):
        low, high = 0.0, 1.0
        while not space.within_budget(at_price(high)):  # at a high enough price every layer takes its cheapest
            low, high = high, 2 * high
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            low, high = (low, middle) if space.within_budget(at_price(middle)) else (middle, high)
        genome = _spend_what_is_left(space, sensitivity, at_price(high))
    baseline = sensitivity.baseline
    if space.within_budget(baseline) and sensitivity.predicted(baseline) < sensitivity.predicted(genome):
        return baseline
    return genome


def _spend_what_is_left(space: SearchSpace, sensitivity: Sensitivity, genome: Genome) -> Genome:
    """Greedy single-layer changes within the budget, the best predicted gain first, while one gains."""
    while True:
        options = [genome[:i] + (g,) + genome[i + 1 :] for i, allowed in enumerate(space.choices) for g in allowed]
        best = min((o for o in options if space.within_budget(o)), key=sensitivity.predicted)
        if sensitivity.predicted(best) >= sensitivity.predicted(genome):
            return genome
        genome = best


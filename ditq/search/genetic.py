"""Genetic operators over per-layer genomes; every genome they return lies in the space and within budget.

One generation, as in Q-DiT's search: keep the top-k genomes evaluated so far, breed `n_crossover` children
by uniform crossover of two random top-k parents and `n_mutation` by mutating one (each gene redrawn with
probability `prob`), refill with random genomes up to the population size. A child over budget is drawn
again (a few times) and then repaired: random genes move to their layer's next cheaper choice until the
genome fits. Children already evaluated or already in the new population are dropped. All randomness
comes from one numpy Generator, so a generation is a pure function of its state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ditq.search.space import Genome, SearchSpace, genome_key

DRAWS = 10  # draws of an operator before its last child is repaired instead


def random_genome(space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A uniformly drawn genome, redrawn (then repaired) until within budget."""
    return _within_budget(space, rng, lambda: tuple(c[rng.integers(len(c))] for c in space.choices))


def crossover(space: SearchSpace, a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
    """Each gene from parent a or b with probability ½; within budget."""
    return _within_budget(space, rng, lambda: tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)))


def mutate(space: SearchSpace, parent: Genome, rng: np.random.Generator, prob: float) -> Genome:
    """Each gene redrawn from its layer's choices with probability `prob`; within budget."""
    if not 0 < prob <= 1:
        raise ValueError(f"mutation probability {prob!r} must lie in (0, 1]")

    def draw() -> Genome:
        return tuple(c[rng.integers(len(c))] if rng.random() < prob else g for g, c in zip(parent, space.choices, strict=True))

    return _within_budget(space, rng, draw)


def repair(space: SearchSpace, genome: Genome, rng: np.random.Generator) -> Genome:
    """Move random genes to a cheaper choice (the next one that costs fewer bits) until within budget."""
    genome = list(genome)
    while not space.within_budget(tuple(genome)):
        cheaper = [i for i, g in enumerate(genome) if _next_cheaper(space, i, g) is not _NONE_LEFT]
        if not cheaper:  # SearchSpace.build guarantees the cheapest genome fits, so this cannot happen
            raise RuntimeError("no gene can be made cheaper, yet the genome is over budget")
        i = cheaper[rng.integers(len(cheaper))]
        genome[i] = _next_cheaper(space, i, genome[i])
    return tuple(genome)


def top_k(fitness: Mapping[str, float], k: int) -> list[str]:
    """The k keys of lowest fitness; ties broken by key, so the order never depends on insertion."""
    return sorted(fitness, key=lambda key: (fitness[key], key))[:k]


def next_population(
    space: SearchSpace,
    parents: Sequence[Genome],
    rng: np.random.Generator,
    *,
    size: int,
    n_crossover: int,
    n_mutation: int,
    prob: float,
    seen: set[str],
) -> list[Genome]:
    """Children of `parents` (crossover, then mutation), new to `seen`, refilled randomly up to `size`."""
    if not parents:
        raise ValueError("next_population needs at least one parent")
    children: list[Genome] = []
    keys = set(seen)

    def add(make: Callable[[], Genome], wanted: int) -> None:
        target = len(children) + wanted
        for _ in range(wanted * DRAWS):
            if len(children) >= min(target, size):
                return
            child = make()
            if genome_key(child) not in keys:
                keys.add(genome_key(child))
                children.append(child)

    def crossed() -> Genome:
        i, j = rng.choice(len(parents), size=2, replace=len(parents) < 2)
        return crossover(space, parents[i], parents[j], rng)

    add(crossed, n_crossover)
    add(lambda: mutate(space, parents[rng.integers(len(parents))], rng, prob), n_mutation)
    add(lambda: random_genome(space, rng), size - len(children))
    return children


_NONE_LEFT = object()


def _next_cheaper(space: SearchSpace, i: int, g: int | None) -> object:
    bits = space.bits[i]
    cheaper = [c for c in space.choices[i] if bits[c] < bits[g]]
    return max(cheaper, key=lambda c: bits[c]) if cheaper else _NONE_LEFT


def _within_budget(space: SearchSpace, rng: np.random.Generator, draw: Callable[[], Genome]) -> Genome:
    genome = draw()
    for _ in range(DRAWS - 1):
        if space.within_budget(genome):
            return genome
        genome = draw()
    return repair(space, genome, rng)

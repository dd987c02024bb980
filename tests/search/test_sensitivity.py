"""Allocation from per-layer sensitivities: single-layer changes measured, then the budget spent where they pay."""

import dataclasses
import itertools
import math
from contextlib import nullcontext

import pytest
import torch

import ditq
from ditq.qat import convert, prepare
from ditq.quant.served import average_bits, served_widths
from ditq.search import BitsSearch, FitnessSettings, allocate, measure_sensitivity
from ditq.search.fitness import OutputFitness
from ditq.search.space import SearchSpace
from tests.search.test_bits_search import NESTED
from tests.tiny import make_tiny_mnist_dit

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (4, 3, 2)


class Additive:
    """A search whose candidate is its genome and whose fitness adds one known value per layer and gene."""

    def __init__(self, sizes, budget, values):
        self.space = SearchSpace(tuple(f"l{i}" for i in range(len(sizes))), tuple(sizes),
                                 (WIDTHS,) * len(sizes), ({w: float(w) for w in WIDTHS},) * len(sizes),
                                 budget, what="width")  # fmt: skip
        self.values = values  # per layer: width → fitness contribution
        self.evaluated = []

    def evaluating(self):
        return nullcontext()

    def candidate(self, genome):
        self.evaluated.append(genome)
        return genome

    def fitness(self, genome):
        return sum(v[g] for v, g in zip(self.values, genome, strict=True))


def test_single_layer_changes_are_measured_once_each_and_predict_an_additive_fitness():
    values = [{4: 0.0, 3: 1.0, 2: 5.0}, {4: 0.9, 3: 1.0, 2: 1.2}, {4: 0.5, 3: 1.0, 2: 3.0}]
    search = Additive([100, 100, 100], 3.0, values)
    sensitivity = measure_sensitivity(search, search.fitness, (3, 3, 3), progress=False)
    assert len(search.evaluated) == 1 + 3 * 2 and len(set(search.evaluated)) == len(search.evaluated)
    assert sensitivity.fitness == 3.0
    assert sensitivity.deltas[0] == {3: 0.0, 4: -1.0, 2: 4.0}
    for genome in itertools.product(WIDTHS, repeat=3):
        assert sensitivity.predicted(genome) == pytest.approx(search.fitness(genome))


def test_the_budget_goes_where_a_bit_buys_the_most():
    """Layer 0 gains 1.0 from int4, layer 1 loses 0.2 at int2, layer 2 gains 0.5 / loses 2.0: at uniform int3's
    budget the best trade is layer 0 up, layer 1 down (predicted 3 − 1 + 0.2); with room for one more bit on a
    third of the weights, layer 2 goes up too."""
    values = [{4: 0.0, 3: 1.0, 2: 5.0}, {4: 0.9, 3: 1.0, 2: 1.2}, {4: 0.5, 3: 1.0, 2: 3.0}]
    search = Additive([100, 100, 100], 3.0, values)
    sensitivity = measure_sensitivity(search, search.fitness, (3, 3, 3), progress=False)
    assert allocate(search.space, sensitivity) == (4, 2, 3)
    for budget, expected in ((3 + 1 / 3, (4, 2, 4)), (4.0, (4, 4, 4))):  # 4.0: every layer's best width fits
        roomier = Additive([100, 100, 100], budget, values)
        sensitivity = measure_sensitivity(roomier, roomier.fitness, (3, 3, 3), progress=False)
        assert allocate(roomier.space, sensitivity) == expected


def test_the_allocation_fits_the_budget_and_no_single_change_within_it_is_predicted_better():
    """Random additive fitnesses and layer sizes: the allocation always fits; unless it falls back to the baseline
    (predicted better), no one-layer change that fits lowers its prediction (the greedy steps spent what the
    price left); and it is never predicted worse than the baseline."""
    rng = torch.Generator().manual_seed(0)
    baseline, moved = (3,) * 5, 0
    for _ in range(50):
        sizes = (torch.randint(1, 1000, (5,), generator=rng)).tolist()
        values = [dict(zip(WIDTHS, torch.rand(3, generator=rng).sort().values.tolist(), strict=True))
                  for _ in sizes]  # fmt: skip
        search = Additive(sizes, 3.0, values)
        sensitivity = measure_sensitivity(search, search.fitness, baseline, progress=False)
        genome = allocate(search.space, sensitivity)
        assert search.space.within_budget(genome)
        assert search.fitness(genome) <= search.fitness(baseline) + 1e-12
        if genome == baseline:
            continue
        moved += 1
        neighbours = [genome[:i] + (w,) + genome[i + 1 :] for i in range(5) for w in WIDTHS]
        fitting = [n for n in neighbours if search.space.within_budget(n)]
        assert min(map(search.fitness, fitting)) >= search.fitness(genome) - 1e-12
    assert moved > 10  # the check above ran


def test_sensitivities_of_another_space_are_refused_by_name():
    search = Additive([10, 10], 3.0, [{4: 0.0, 3: 1.0, 2: 2.0}] * 2)
    sensitivity = measure_sensitivity(search, search.fitness, (3, 3), progress=False)
    wider = Additive([10, 10], 3.0, [{4: 0.0, 3: 1.0, 2: 2.0}] * 2)
    wider.space = dataclasses.replace(wider.space, choices=((8, 4, 3, 2), WIDTHS), bits=({8: 8.0, 4: 4.0, 3: 3.0,
                                      2: 2.0}, wider.space.bits[1]))  # fmt: skip
    with pytest.raises(ValueError, match="layer 'l0': the sensitivities measured"):
        allocate(wider.space, sensitivity)
    three = Additive([10, 10, 10], 3.0, [{4: 0.0, 3: 1.0, 2: 2.0}] * 3)
    with pytest.raises(ValueError, match="a genome needs 3 genes"):
        allocate(three.space, sensitivity)


def test_a_fitness_that_is_not_finite_is_refused():
    search = Additive([10, 10], 3.0, [{4: 0.0, 3: 1.0, 2: math.inf}, {4: 0.0, 3: 1.0, 2: 2.0}])
    with pytest.raises(ValueError, match="not finite"):
        measure_sensitivity(search, search.fitness, (3, 3), progress=False)


def test_on_a_nested_model_the_allocation_serves_widths_of_its_checkpoint():
    """End to end on the tiny nested DiT: the `output` fitness scores each change, the plan fits uniform int3's
    budget, and the model comes back serving the widths it had."""
    fp = make_tiny_mnist_dit()
    nested = convert(prepare(make_tiny_mnist_dit(), NESTED))
    ditq.set_served_bits(nested, 4)
    uniform3 = average_bits(nested, dict.fromkeys(served_widths(nested), 3))
    search = BitsSearch(nested, widths=WIDTHS, budget=uniform3)
    fitness = OutputFitness(fp, FitnessSettings(samples=2, steps=2))
    sensitivity = measure_sensitivity(search, fitness, search.initial()[0], progress=False)
    assert search.initial()[0] == (3,) * len(search.space.names)
    assert all(set(d) == set(WIDTHS) for d in sensitivity.deltas)
    genome = allocate(search.space, sensitivity)
    assert search.space.within_budget(genome)
    assert sum(d[4] < 0 for d in sensitivity.deltas) > 0  # int4 somewhere lowers the output error of int3
    assert set(served_widths(nested).values()) == {4}

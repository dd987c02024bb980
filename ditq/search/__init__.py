"""Per-layer evolutionary searches (`ditq search`): Q-DiT's group sizes and MatQuant's served bit-widths; and the
cheap alternative, an allocation from measured single-layer sensitivities."""

from ditq.search.bits import BitsSearch
from ditq.search.cli import main
from ditq.search.fitness import FITNESSES, Fitness, FitnessSettings, make_fitness, spearman
from ditq.search.groups import DEFAULT_CANDIDATES, GroupSearch
from ditq.search.run import Search, SearchConfig, SearchResult, run_search
from ditq.search.sensitivity import Sensitivity, allocate, measure_sensitivity
from ditq.search.space import SearchSpace, genome_key

__all__ = [
    "DEFAULT_CANDIDATES",
    "FITNESSES",
    "BitsSearch",
    "Fitness",
    "FitnessSettings",
    "GroupSearch",
    "Search",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "Sensitivity",
    "allocate",
    "genome_key",
    "main",
    "make_fitness",
    "measure_sensitivity",
    "run_search",
    "spearman",
]

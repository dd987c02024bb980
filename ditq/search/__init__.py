"""Q-DiT's automatic granularity allocation: evolutionary search over per-layer group sizes (`ditq search`)."""

from ditq.search.cli import main
from ditq.search.fitness import FITNESSES, Fitness, FitnessSettings, make_fitness, spearman
from ditq.search.run import SearchConfig, SearchResult, quantize_candidate, run_search
from ditq.search.space import DEFAULT_CANDIDATES, SearchSpace, genome_key

__all__ = [
    "DEFAULT_CANDIDATES",
    "FITNESSES",
    "Fitness",
    "FitnessSettings",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "genome_key",
    "main",
    "make_fitness",
    "quantize_candidate",
    "run_search",
    "spearman",
]

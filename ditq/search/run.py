"""The evolutionary search over a per-layer space (Q-DiT's group sizes, MatQuant's served widths).

    population ← the space's baseline (e.g. g128 everywhere) + random genomes within budget
    for each generation:
        evaluate every new genome: build the model it describes (`search.candidate`: requantize the FP
            model with its group sizes, or serve the nested model's codes at its widths), sample, score
            (fitness cache keyed by the genome)
        parents ← top-k of everything evaluated so far
        population ← crossover and mutation children of the parents (within budget, unseen) + random refill
        save the state (atomically)
    best ← the genome of lowest fitness → `search.output_file` (a QDiT recipe, a served-bits plan)

A search (`GroupSearch`, `BitsSearch`) owns its space and how a genome becomes a model; this loop, the
genetic operators, the fitness cache and the saved state are shared. Evaluations are split over
torch.distributed ranks when a process group is up (rank r takes every r-th new genome; results are
all-gathered), so every rank selects the same parents and the search ends as it does in one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ditq.atomic import json_text, write_json
from ditq.checks import check_counts
from ditq.search.fitness import FITNESSES, Fitness, FitnessSettings, make_fitness
from ditq.search.genetic import next_population, random_genome, top_k
from ditq.search.space import Gene, Genome, SearchSpace, genome_from_key, genome_key
from ditq.search.state import (
    LOG_FILE,
    STATE_FILE,
    append_evaluation,
    load_evaluations,
    load_state,
    save_state,
)

RESULT_FILE = "result.json"


class Search(Protocol):
    """A space and how its genomes become models (`GroupSearch`, `BitsSearch`)."""

    space: SearchSpace
    output_file: str  # where the best genome's `output` is written

    def settings(self) -> dict[str, Any]: ...  # what a resumed search must match, beside the GA settings
    def initial(self) -> list[Genome]: ...  # baselines seeded into the first population
    def evaluating(self) -> AbstractContextManager[None]: ...  # held while candidates are built
    def candidate(self, genome: Genome) -> nn.Module: ...  # the model to score
    def output(self, genome: Genome) -> dict[str, Any]: ...  # the best genome as a file


@dataclass(frozen=True)
class SearchConfig:
    """The genetic algorithm's settings (Q-DiT used population 50, top 10, 25 + 25 children, 10 generations)."""

    generations: int = 4
    population: int = 16
    top_k: int = 4
    n_crossover: int = 6
    n_mutation: int = 6
    mutation_prob: float = 0.1
    fitness: str = "psnr"
    fitness_settings: FitnessSettings = field(default_factory=FitnessSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("generations", "population", "top_k"), what="search ")
        check_counts(self, ("n_crossover", "n_mutation", "seed"), minimum=0, what="search ")
        if self.top_k > self.population:
            raise ValueError(f"top_k={self.top_k} exceeds the population ({self.population})")
        if not 0 < self.mutation_prob <= 1:
            raise ValueError(f"mutation_prob={self.mutation_prob!r} must lie in (0, 1]")
        if self.fitness not in FITNESSES:
            raise ValueError(f"fitness {self.fitness!r} is not one of {FITNESSES}")


@dataclass(frozen=True)
class SearchResult:
    best: dict[str, Gene]  # layer → gene (group size, served width)
    best_key: str
    best_fitness: float
    best_bits: float  # average bits per weight of the best assignment
    budget_bits: float
    output: dict[str, Any]  # what `output_file` holds: the best genome as a recipe or a plan
    evaluations: int  # distinct genomes evaluated (over all runs of a resumed search)
    seconds: float  # wall time of the search (over all runs of a resumed search)
    history: list[dict[str, Any]]


def run_search(
    fp_model: nn.Module,
    search: Search,
    config: SearchConfig,
    out_dir: str | Path,
    *,
    fitness: Fitness | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search `search`'s space, scored against `fp_model`; resumes from `out_dir` when it holds this search.

    Writes `state.json`, `evaluations.jsonl`, `search.output_file` (the best genome) and `result.json`
    under `out_dir`. `fitness` replaces the built-in one named by `config.fitness`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    space = search.space
    settings = _settings(search, config, fitness)
    digest = _digest(settings)
    state, cache = saved_search(out, search, config, fitness)
    if state is None:
        rng = np.random.default_rng(config.seed)
        state = {"settings": settings, "generation": 0, "fitness": {}, "history": [], "seconds": 0.0,
                 "population": [genome_key(g) for g in _initial(search, config, rng)]}  # fmt: skip
    else:
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
    fitness = fitness or make_fitness(config.fitness, fp_model, config.fitness_settings)
    start, spent = time.perf_counter(), float(state["seconds"])
    population = [genome_from_key(k) for k in state["population"]]
    bar = tqdm(total=config.generations, initial=state["generation"], desc=f"search ({config.fitness})",
               disable=not progress or rank != 0)  # fmt: skip
    with search.evaluating():
        for generation in range(state["generation"], config.generations):
            pending = [g for g in population if genome_key(g) not in cache]
            cache |= _evaluate(search, pending, fitness, out, digest, generation)
            parents = top_k(cache, config.top_k)
            state["history"].append({"generation": generation, "best_key": parents[0],
                                     "best_fitness": cache[parents[0]], "evaluated": len(cache)})  # fmt: skip
            population = [] if generation + 1 == config.generations else next_population(
                space, [genome_from_key(k) for k in parents], rng, size=config.population,
                n_crossover=config.n_crossover, n_mutation=config.n_mutation, prob=config.mutation_prob,
                seen=set(cache),
            )  # fmt: skip
            state |= {"generation": generation + 1, "population": [genome_key(g) for g in population],
                      "fitness": cache, "rng": rng.bit_generator.state,
                      "seconds": spent + time.perf_counter() - start}  # fmt: skip
            if rank == 0:
                save_state(out, state)
            bar.update(1)
            bar.set_postfix(best=f"{cache[parents[0]]:.4g}", evaluated=len(cache))
    bar.close()
    best_key = top_k(cache, 1)[0]
    best = genome_from_key(best_key)
    result = SearchResult(
        best=space.assignment(best), best_key=best_key, best_fitness=cache[best_key],
        best_bits=space.average_bits(best), budget_bits=space.budget, output=search.output(best),
        evaluations=len(cache), seconds=float(state["seconds"]), history=state["history"],
    )  # fmt: skip
    if rank == 0:
        write_json(out / search.output_file, result.output, indent=1)
        summary = {k: v for k, v in asdict(result).items() if k != "output"}
        write_json(out / RESULT_FILE, summary | {"settings": settings}, indent=1)
    if world > 1:
        dist.barrier()
    return result


def saved_search(
    out: Path, search: Search, config: SearchConfig, fitness: Fitness | None = None
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """What `out` holds of this search: its state (None when there is none) and the fitness of every genome
    evaluated so far. A state of another search, or a damaged state or log, is a ValueError naming the file."""
    settings = _settings(search, config, fitness)
    digest = _digest(settings)
    state = load_state(out)
    cache: dict[str, float] = {}
    if state is not None:
        _check_same(out / STATE_FILE, state["settings"], settings)
        for key in (*state["population"], *state["fitness"]):
            _check_key(search.space, key, out / STATE_FILE)
        cache |= state["fitness"]
    for line, record in load_evaluations(out):
        if record["settings"] == digest:
            cache[_check_key(search.space, record["key"], f"{out / LOG_FILE} line {line}")] = float(record["fitness"])
    return state, cache


def _evaluate(
    search: Search, pending: list[Genome], fitness: Fitness, out: Path, digest: str, generation: int
) -> dict[str, float]:
    """Fitness of each pending genome; with several ranks each takes its share and all get every result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    found: dict[str, float] = {}
    for genome in pending[rank::world]:
        began = time.perf_counter()
        value = float(fitness(search.candidate(genome)))
        key = genome_key(genome)
        if not math.isfinite(value):
            raise ValueError(f"the fitness of candidate {key} is {value}: a search can only rank finite values "
                             "(are the quantized model's outputs finite?)")  # fmt: skip
        found[key] = value
        append_evaluation(out, {"settings": digest, "key": key, "fitness": value, "generation": generation,
                                "bits": search.space.average_bits(genome), "rank": rank,
                                "seconds": round(time.perf_counter() - began, 4)})  # fmt: skip
    if world > 1:
        gathered: list[dict[str, float] | None] = [None] * world
        dist.all_gather_object(gathered, found)
        found = {k: v for part in gathered for k, v in (part or {}).items()}
    return found


def _initial(search: Search, config: SearchConfig, rng: np.random.Generator) -> list[Genome]:
    """The search's baselines plus distinct random genomes."""
    population = search.initial()[: config.population]
    keys = {genome_key(g) for g in population}
    for _ in range(config.population * 20):
        if len(population) >= config.population:
            break
        genome = random_genome(search.space, rng)
        if genome_key(genome) not in keys:
            keys.add(genome_key(genome))
            population.append(genome)
    return population


def _settings(search: Search, config: SearchConfig, fitness: Fitness | None) -> dict[str, Any]:
    data = asdict(config)
    data["fitness"] = config.fitness if fitness is None else f"custom:{type(fitness).__name__}"
    return {"config": data, **search.settings(), "layers": list(search.space.names),
            "budget_bits": search.space.budget}  # fmt: skip


def _digest(settings: dict[str, Any]) -> str:
    """Marks the log lines of one search (same settings) in a shared `evaluations.jsonl`."""
    return hashlib.sha256(json_text(settings, what="the search settings", sort_keys=True).encode()).hexdigest()[:16]


def _check_key(space: SearchSpace, key: str, where: str | Path) -> str:
    """`key` if it names a genome of `space`; else a ValueError naming the file (and line) it came from."""
    try:
        space.check(genome_from_key(key))
    except ValueError as err:
        raise ValueError(f"{where}: candidate {key!r} is not one of this search's: {err}") from None
    return key


def _check_same(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """A resumed search must be the same search; name what differs."""
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    for part in sorted(k for k, v in now.items() if isinstance(v, dict)):
        was = saved[part] if isinstance(saved.get(part), dict) else {}
        for key in sorted(set(was) | set(now[part])):
            if was.get(key) != now[part].get(key):
                raise ValueError(f"{path}: the saved search has {part}.{key}={was.get(key)!r}, "
                                 f"this one {now[part].get(key)!r}; use another --out or the same settings")  # fmt: skip
    if saved != now:
        raise ValueError(f"{path}: the saved search ran on other layers or another budget; use another --out")

"""`ditq search`: find per-layer group sizes for Q-DiT and write them as a recipe for `ditq quantize`.

    ditq search --model DiT-MNIST --w-bits 4 --a-bits 8 --budget g128 --fitness psnr --generations 4 --out DIR
    ditq quantize --model DiT-MNIST --recipe DIR/recipe.json --out model.safetensors

Run it again with the same --out to resume a killed or interrupted search; under torchrun the fitness
evaluations are spread over the ranks (one GPU each).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ditq.atomic import check_output_dir
from ditq.cli_checks import (
    HelpFormatter,
    OneLineParser,
    device_arg,
    finite_float,
    rerun_command,
    run_command,
)
from ditq.search.fitness import FITNESSES, FitnessSettings
from ditq.search.space import check_budget, group_label, parse_group
from ditq.search.state import LOG_FILE, STATE_FILE

PROG = "ditq search"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="DiT-MNIST", help="zoo name or full-precision checkpoint")
    p.add_argument("--weights", default=None, help="official weights for a zoo model")
    p.add_argument("--out", type=Path, required=True, help="folder for state, log and recipe.json")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits of every searched layer")
    p.add_argument("--a-bits", type=_bits_or_none, default=8, help="activation bits or 'none'")
    p.add_argument("--budget", type=_budget, default="g128",
                   help="average bits per weight allowed: a uniform baseline's ('g128', 'ch') or a number")
    p.add_argument("--candidates", default="32,64,128,256,ch", help="group sizes to choose from ('ch': per channel)")
    p.add_argument("--fitness", choices=FITNESSES, default="psnr",
                   help="fid: FID of fixed-noise samples; psnr: their PSNR vs the FP samples; output: the final "
                        "output's error on the FP trajectories (cheapest)")
    p.add_argument("--fitness-samples", type=int, default=64, help="images per fitness evaluation")
    p.add_argument("--fitness-steps", type=int, default=25, help="DDIM steps of each fitness sample")
    p.add_argument("--cfg-scale", type=finite_float, default=1.5, help="classifier-free guidance scale of the samples")
    p.add_argument("--generations", type=int, default=4, help="generations of the genetic algorithm")
    p.add_argument("--population", type=int, default=16, help="candidates per generation")
    p.add_argument("--top-k", type=int, default=4, help="best candidates kept as parents")
    p.add_argument("--crossover", type=int, default=6, help="children by crossover per generation")
    p.add_argument("--mutation", type=int, default=6, help="children by mutation per generation")
    p.add_argument("--mutation-prob", type=finite_float, default=0.1, help="chance that a mutation changes each layer")
    p.add_argument("--no-gptq", action="store_true", help="round-to-nearest weights instead of GPTQ")
    p.add_argument("--static-acts", action="store_true", help="calibrated static activation scales (ablation)")
    p.add_argument("--calib-samples", type=int, default=16, help="images sampled to capture calibration inputs")
    p.add_argument("--calib-steps", type=int, default=25, help="DDIM steps of each calibration trajectory")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the search, its samples' noise and random zoo weights; calibration uses seed + 1")
    p.add_argument("--device", type=device_arg, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search from command-line flags; returns the exit code (2: bad input, 130: Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(build_parser(), argv, lambda args: _run(args, argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from ditq.bundled import open_model
    from ditq.calib import calibrate
    from ditq.methods.qdit import QDiT
    from ditq.search.run import SearchConfig, run_search, saved_search
    from ditq.search.space import SearchSpace
    from ditq.training.distributed import setup_distributed

    check_output_dir(args.out, "--out")
    candidates = tuple(parse_group(part) for part in args.candidates.split(","))
    base = QDiT(w_bits=args.w_bits, a_bits=args.a_bits, gptq=not args.no_gptq, a_dynamic=not args.static_acts)
    config = SearchConfig(
        generations=args.generations, population=args.population, top_k=args.top_k, n_crossover=args.crossover,
        n_mutation=args.mutation, mutation_prob=args.mutation_prob, candidates=candidates, budget=args.budget,
        fitness=args.fitness, seed=args.seed,
        fitness_settings=FitnessSettings(samples=args.fitness_samples, steps=args.fitness_steps,
                                         cfg_scale=args.cfg_scale, seed=args.seed),
    )  # fmt: skip
    env = setup_distributed(args.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING)
    try:
        model, source = open_model(args.model, weights=args.weights, seed=args.seed, device=env.device)
        if env.is_main:
            print(f"model: {source}")
        # the budget, the candidates and a saved state must fit this model and search before calibrating
        saved_search(args.out, SearchSpace.build(model, base, candidates, args.budget), base, config)
        calib = None
        if base.gptq or not base.a_dynamic:
            calib = calibrate(model, n_samples=args.calib_samples, steps=args.calib_steps, seed=args.seed + 1)
        result = run_search(model, base, config, args.out, calib=calib, progress=not args.no_progress)
    except KeyboardInterrupt:
        kept = [name for name in (STATE_FILE, LOG_FILE) if (args.out / name).is_file()]
        if not kept:
            raise
        if env.is_main:
            print(f"{PROG}: interrupted; finished evaluations are kept in {args.out} ({', '.join(kept)}); "
                  f"resume with: {rerun_command('search', argv)}", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        if env.owns_group:
            torch.distributed.destroy_process_group()
    if env.is_main:
        groups = ", ".join(f"{group_label(g)}: {list(result.best.values()).count(g)}"
                           for g in sorted(set(result.best.values()), key=lambda g: (g is None, g or 0)))  # fmt: skip
        print(f"best {args.fitness} fitness {result.best_fitness:.4f} at {result.best_bits:.4f} bits per weight "
              f"(budget {result.budget_bits:.4f}); layers per group size: {groups}")
        print(f"{result.evaluations} evaluations in {result.seconds:.1f} s; recipe: {args.out / 'recipe.json'}")
    return 0


def _bits_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "16") else int(text)


def _budget(text: str) -> str | float:
    try:
        budget: str | float = float(text)
    except ValueError:
        budget = text
    try:
        return check_budget(budget)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


"""`ditq search`: per-layer choices under a budget in bits per weight, found by a genetic algorithm.

Q-DiT's group sizes (`--space groups`), written as a recipe for `ditq quantize`:

    ditq search --model DiT-MNIST --w-bits 4 --a-bits 8 --budget g128 --fitness psnr --generations 4 --out DIR
    ditq quantize --model DiT-MNIST --recipe DIR/recipe.json --out model.safetensors

MatQuant's Mix'n'Match (`--space bits`): a served width per layer of one nested checkpoint, scored against
the full-precision --model, written as a served-bits plan for `ditq.load(path, bits=...)`:

    ditq search --space bits --checkpoint nested.safetensors --widths 8,6,4,3,2 --budget 3.0 --out DIR
    (--cost stored: budget the exported file's packed bits instead of the nominal widths)
    ditq.load("nested.safetensors", bits="DIR/plan.json")

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
from ditq.quant.served import COSTS, nested_layers
from ditq.search.bits import check_widths
from ditq.search.fitness import FITNESSES, FitnessSettings
from ditq.search.groups import check_budget
from ditq.search.space import gene_label, parse_gene
from ditq.search.state import LOG_FILE, STATE_FILE

PROG = "ditq search"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--space", choices=("groups", "bits"), default="groups",
                   help="groups: Q-DiT's group size per layer; bits: MatQuant's served width per nested layer")
    p.add_argument("--model", default="DiT-MNIST", help="zoo name or full-precision checkpoint")
    p.add_argument("--weights", default=None, help="official weights for a zoo model")
    p.add_argument("--out", type=Path, required=True, help="folder for state, log and recipe.json / plan.json")
    p.add_argument("--budget", type=_budget, default=None,
                   help="average bits per weight allowed: a number, or (groups) a uniform baseline's ('g128', "
                        "'ch'); default g128 for groups, required for bits")
    groups = p.add_argument_group("--space groups")
    groups.add_argument("--w-bits", type=int, default=4, help="weight bits of every searched layer")
    groups.add_argument("--a-bits", type=_bits_or_none, default=8, help="activation bits or 'none'")
    groups.add_argument("--candidates", default="32,64,128,256,ch",
                        help="group sizes to choose from ('ch': per channel)")
    groups.add_argument("--no-gptq", action="store_true", help="round-to-nearest weights instead of GPTQ")
    groups.add_argument("--static-acts", action="store_true", help="calibrated static activation scales (ablation)")
    groups.add_argument("--calib-samples", type=int, default=16, help="images sampled to capture calibration inputs")
    groups.add_argument("--calib-steps", type=int, default=25, help="DDIM steps of each calibration trajectory")
    bits = p.add_argument_group("--space bits")
    bits.add_argument("--checkpoint", type=Path, help="the nested (MatQuant) checkpoint whose slices are served")
    bits.add_argument("--widths", type=_widths, default=None,
                      help="widths to choose from, e.g. 8,6,4,3,2 (default: the checkpoint recipe's nested_bits)")
    bits.add_argument("--cost", choices=COSTS, default="nominal",
                      help="what a width costs against --budget: nominal, its bits + scales (int3: 3 bits, the "
                           "paper's effective bits); stored, its packed slot + scales (int3: 4 bits, as exported)")
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


GROUP_FLAGS = {"--w-bits": "w_bits", "--a-bits": "a_bits", "--candidates": "candidates", "--no-gptq": "no_gptq",
               "--static-acts": "static_acts", "--calib-samples": "calib_samples", "--calib-steps": "calib_steps"}
BITS_FLAGS = {"--checkpoint": "checkpoint", "--widths": "widths", "--cost": "cost"}


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from ditq.bundled import open_model
    from ditq.search.run import SearchConfig, run_search, saved_search
    from ditq.training.distributed import setup_distributed

    _check_space_flags(args)
    check_output_dir(args.out, "--out")
    config = SearchConfig(
        generations=args.generations, population=args.population, top_k=args.top_k, n_crossover=args.crossover,
        n_mutation=args.mutation, mutation_prob=args.mutation_prob, fitness=args.fitness, seed=args.seed,
        fitness_settings=FitnessSettings(samples=args.fitness_samples, steps=args.fitness_steps,
                                         cfg_scale=args.cfg_scale, seed=args.seed),
    )  # fmt: skip
    env = setup_distributed(args.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING)
    try:
        model, source = open_model(args.model, weights=args.weights, seed=args.seed, device=env.device)
        if env.is_main:
            print(f"model: {source}")
        # the budget, the choices and a saved state must fit this model and search before any long work
        search = _group_search(args, model) if args.space == "groups" else _bits_search(args, model, env.device)
        saved_search(args.out, search, config)
        if args.space == "groups" and (search.base.gptq or not search.base.a_dynamic):
            from ditq.calib import calibrate

            search.calib = calibrate(model, n_samples=args.calib_samples, steps=args.calib_steps, seed=args.seed + 1)
        result = run_search(model, search, config, args.out, progress=not args.no_progress)
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
        chosen = sorted(set(result.best.values()), key=lambda g: (g is None, g or 0))
        counts = ", ".join(f"{gene_label(g)}: {list(result.best.values()).count(g)}" for g in chosen)
        what = "group size" if args.space == "groups" else "width"
        print(f"best {args.fitness} fitness {result.best_fitness:.4f} at {result.best_bits:.4f} bits per weight "
              f"(budget {result.budget_bits:.4f}); layers per {what}: {counts}")
        print(f"{result.evaluations} evaluations in {result.seconds:.1f} s; "
              f"{'recipe' if args.space == 'groups' else 'plan'}: {args.out / search.output_file}")
    return 0


def _check_space_flags(args: argparse.Namespace) -> None:
    """Each space's flags belong to it: one given to the other space is an error, not silently ignored."""
    parser = build_parser()
    other = GROUP_FLAGS if args.space == "bits" else BITS_FLAGS
    given = [flag for flag, dest in other.items() if getattr(args, dest) != parser.get_default(dest)]
    if given:
        raise ValueError(f"{', '.join(given)} apply to --space {'groups' if args.space == 'bits' else 'bits'}")
    if args.space == "bits":
        if args.checkpoint is None:
            raise ValueError("--space bits needs --checkpoint (a nested MatQuant checkpoint)")
        if args.budget is None or isinstance(args.budget, str):
            raise ValueError(f"--space bits needs --budget in bits per weight (a number), got {args.budget!r}")


def _group_search(args: argparse.Namespace, model: torch.nn.Module):
    from ditq.methods.qdit import QDiT
    from ditq.search.groups import GroupSearch

    try:
        candidates = tuple(parse_gene(part) for part in args.candidates.split(","))
    except ValueError as err:
        raise ValueError(f"--candidates: {err}") from None
    base = QDiT(w_bits=args.w_bits, a_bits=args.a_bits, gptq=not args.no_gptq, a_dynamic=not args.static_acts)
    return GroupSearch(model, base, candidates, "g128" if args.budget is None else args.budget)


def _bits_search(args: argparse.Namespace, fp_model: torch.nn.Module, device: str):
    from ditq.io import load
    from ditq.search.bits import BitsSearch

    nested = load(args.checkpoint, device=device)
    for name, layer in nested_layers(nested).items():
        try:
            fp_layer = fp_model.get_submodule(name)
        except AttributeError:
            fp_layer = None
        if not isinstance(fp_layer, torch.nn.Linear) or (fp_layer.in_features, fp_layer.out_features) != (
            layer.in_features, layer.out_features,
        ):
            raise ValueError(f"--checkpoint {args.checkpoint}: layer {name!r} has no Linear of its shape in "
                             f"--model {args.model}; give the full-precision model it was quantized from")
    return BitsSearch(nested, args.widths, args.budget, cost=args.cost)


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


def _widths(text: str) -> tuple[int, ...]:
    try:
        return check_widths(tuple(int(part) for part in text.split(",")))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

"""MatQuant on DiT-MNIST: PSNR against full precision of one nested checkpoint served at uniform widths, at a
searched per-layer plan (Mix'n'Match), at a plan allocated from per-layer sensitivities (`ditq.search.sensitivity`:
each layer's one-width changes from uniform, scored by `--sensitivity-fitness`) and at per-timestep schedules
of the same average bits per weight.

Every row samples the same labels from the same noise as the FP model (DDIM, classifier-free guidance) and
reports the mean PSNR of its images against the FP images and the bits per weight of the served layers
(`ditq.quant.served`, nominal: the served width plus the scales). The search scores candidates on
other noise (`--fitness-seed`) than the rows are measured on. Without `--checkpoint` the nested model is
DiT-MNIST's int8 round to nearest (`QAT(w_bits=8, stored_bits=8, nested_bits=...)`, converted untrained), a
quick stand-in for a trained MatQuant checkpoint. Writes `<out>.json` (the rows `pareto_plot.py` draws)
and `<out>.md`.

    PYTHONPATH=. python bench/matquant_mix.py --out bench/results/matquant_mix_cpu --budget 3.0
    PYTHONPATH=. python bench/pareto_plot.py bench/results/matquant_mix_cpu.json bench/results/matquant_mix_cpu.png
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import ditq
from ditq.atomic import write_json, write_text
from ditq.bits_schedule import BitsSchedule
from ditq.bundled import open_model
from ditq.diffusion import sample_images
from ditq.eval.metrics import psnr
from ditq.io import apply_served_bits
from ditq.qat import QAT, convert, prepare
from ditq.quant.served import average_bits, served_widths
from ditq.search import (
    FITNESSES,
    BitsSearch,
    FitnessSettings,
    SearchConfig,
    allocate,
    make_fitness,
    measure_sensitivity,
    run_search,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="path stem of the .json and .md written")
    p.add_argument("--checkpoint", type=Path, help="a nested MatQuant checkpoint of DiT-MNIST (default: int8 RTN)")
    p.add_argument("--widths", default="8,6,4,3,2", help="served widths (rows, search choices)")
    p.add_argument("--group-size", type=int, default=None,
                   help="group size of the int8 RTN stand-in (default per channel)")
    p.add_argument("--budget", type=float, default=3.0, help="bits per weight of the searched plan and the schedules")
    p.add_argument("--samples", type=int, default=32, help="images per row")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0, help="noise of the measured images")
    p.add_argument("--fitness-samples", type=int, default=16, help="images per fitness evaluation of the search")
    p.add_argument("--fitness-seed", type=int, default=7, help="noise the search scores candidates on")
    p.add_argument("--sensitivity-samples", type=int, default=8,
                   help="images that score each single-layer change")
    p.add_argument("--sensitivity-fitness", choices=FITNESSES, default="output",
                   help="what scores a single-layer change: `output` (teacher-forced, one forward per step) or a "
                        "whole sampled chain (`psnr`, `fid`)")
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                   help="run the evolutionary search (its row costs the most)")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more were slower on a busy 2-core machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    started = time.perf_counter()

    fp, source = open_model("DiT-MNIST")
    if args.checkpoint is not None:
        nested, made = ditq.load(args.checkpoint), f"checkpoint {args.checkpoint}"
    else:
        recipe = QAT(w_bits=8, stored_bits=8, nested_bits=widths, group_size=args.group_size)
        made = f"int8 RTN of {source}, nested widths {widths}, group size {args.group_size or 'per channel'}"
        nested = convert(prepare(copy.deepcopy(fp), recipe))
    labels = torch.arange(args.samples) % int(fp.num_classes)

    def draw(model: torch.nn.Module, schedule: BitsSchedule | None = None) -> torch.Tensor:
        if schedule is None:
            return sample_images(model, labels, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
        with schedule.serving(model) as before_step:
            return sample_images(model, labels, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                                 before_step=before_step)  # fmt: skip

    reference = draw(fp)
    rows: list[dict] = []

    def row(name: str, kind: str, bits: float, images: torch.Tensor, **detail) -> None:
        values = psnr(images.numpy(), reference.numpy(), data_range=2.0)
        rows.append({"name": name, "kind": kind, "bits": bits, "psnr": float(values.mean()),
                     "psnr_min": float(values.min()), **detail})  # fmt: skip
        print(f"{name:<36} {bits:6.3f} bits/weight  PSNR {values.mean():6.2f} dB", flush=True)

    names = list(served_widths(nested))
    for width in widths:
        ditq.set_served_bits(nested, width)
        row(f"uniform int{width}", "uniform", average_bits(nested, dict.fromkeys(names, width)), draw(nested))

    search = BitsSearch(nested, widths, args.budget)
    if args.search:
        config = SearchConfig(generations=args.generations, population=args.population,
                              top_k=min(4, args.population), n_crossover=4, n_mutation=4, mutation_prob=0.2,
                              fitness="psnr", fitness_settings=FitnessSettings(samples=args.fitness_samples,
                              steps=args.steps, cfg_scale=args.cfg_scale, seed=args.fitness_seed))  # fmt: skip
        with tempfile.TemporaryDirectory() as work:
            result = run_search(fp, search, config, work, progress=False)
        apply_served_bits(nested, result.output)
        row(f"searched plan ({args.budget:g} budget)", "searched", result.best_bits, draw(nested),
            layers_per_width=per_width(result.output, widths), evaluations=result.evaluations, plan=result.output)

    name, bits, plan, detail = allocated_by_sensitivity(fp, nested, search, args)
    apply_served_bits(nested, plan)
    row(name, "allocated", bits, draw(nested), layers_per_width=per_width(plan, widths), plan=plan, **detail)

    for name, schedule in schedules(nested, widths, args.budget, args.steps).items():
        row(name, "schedule", schedule.average_bits(nested, args.steps), draw(nested, schedule),
            schedule=[[start, plan] for start, plan in schedule.entries],
            steps_per_entry=schedule.steps_served(args.steps))  # fmt: skip

    report = {"model": made, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}  # fmt: skip
    write_json(args.out.with_suffix(".json"), report, indent=1)
    write_text(args.out.with_suffix(".md"), markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and .md in {report['seconds']} s")


def per_width(plan: dict[str, int], widths: tuple[int, ...]) -> dict[str, int]:
    """How many layers a plan serves at each width."""
    served = list(plan.values())
    return {str(w): served.count(w) for w in widths}


def allocated_by_sensitivity(fp: torch.nn.Module, nested: torch.nn.Module, search: BitsSearch,
                             args: argparse.Namespace) -> tuple[str, float, dict[str, int], dict]:  # fmt: skip
    """The plan `ditq.search.sensitivity` allocates from uniform (the widest width within the budget), scoring each
    one-layer change by `args.sensitivity_fitness` on the search's noise: (row name, bits, plan, what it measured)."""
    uniform = search.initial()[0]
    fitness = make_fitness(args.sensitivity_fitness, fp, FitnessSettings(
        samples=args.sensitivity_samples, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.fitness_seed))
    sensitivity = measure_sensitivity(search, fitness, uniform, progress=False)
    allocated = allocate(search.space, sensitivity)
    relative = {name: {str(w): d / sensitivity.fitness for w, d in delta.items() if w != base}
                for name, delta, base in zip(search.space.names, sensitivity.deltas, uniform, strict=True)}  # fmt: skip
    detail = dict(evaluations=1 + sum(len(d) - 1 for d in sensitivity.deltas), relative_change=relative,
                  fitness={"name": args.sensitivity_fitness, "uniform": sensitivity.fitness,
                           "predicted": sensitivity.predicted(allocated)})  # fmt: skip
    name = f"allocated by {args.sensitivity_fitness} sensitivity ({args.budget:g} budget)"
    return name, search.space.average_bits(allocated), search.output(allocated), detail


def schedules(model: torch.nn.Module, widths: tuple[int, ...], budget: float, steps: int) -> dict[str, BitsSchedule]:
    """Two-entry schedules between the cheapest width and each costlier one that spend the budget on average
    (the switch rounded to a whole step, so the average lands at or under the budget): the cheap width at
    high noise first, and the other way round as a control. Widths of equal cost keep the widest."""
    names = list(served_widths(model))
    cost = {w: average_bits(model, dict.fromkeys(names, w)) for w in widths}
    low = min(widths, key=cost.__getitem__)
    highs = {cost[w]: w for w in sorted(widths) if cost[w] > budget}.values()  # the widest of each cost
    found = {}
    for high in sorted(highs, reverse=True):
        high_steps = int((budget - cost[low]) / (cost[high] - cost[low]) * steps)  # steps served at `high`
        if high_steps < 1:
            continue
        switch = (steps - high_steps) / steps
        found[f"int{low} → int{high} at {switch:g}"] = BitsSchedule([(0, low), (switch, high)])
        found[f"int{high} → int{low} at {high_steps / steps:g}"] = BitsSchedule([(0, high), (high_steps / steps, low)])
    return found


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# MatQuant Mix'n'Match and per-timestep widths on DiT-MNIST ({report['model']})", "",
             f"{s['samples']} images, DDIM {s['steps']} steps, cfg {s['cfg_scale']}, seed {s['seed']}; PSNR against "
             f"the FP images from the same noise; nominal bits per weight of the served layers (width + scales). "
             f"{report['seconds']} s.", "",
             "| row | bits/weight | PSNR dB (mean) | PSNR dB (worst image) |", "|---|---|---|---|"]  # fmt: skip
    for r in sorted(report["rows"], key=lambda r: r["bits"]):
        lines.append(f"| {r['name']} | {r['bits']:.3f} | {r['psnr']:.2f} | {r['psnr_min']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Q-DiT on the bundled DiT-MNIST: ablation rows at W4A8 / W3A8 / W6A8, search cost per fitness, proxy ranking.

    PYTHONPATH=. python scripts/gpu_qdit.py --out $OUT            # one H100, ~6 minutes
    PYTHONPATH=. python scripts/gpu_qdit.py --out /tmp/q --device cpu --tiny   # CPU smoke test

Rows (each with its average stored bits per weight): RTN g128 (asymmetric weights, so the same bits as
Q-DiT's budget; dynamic per-token activations), GPTQ g128 (static calibrated activations), dynamic only (GPTQ g128 + dynamic
per-token-group activations), search only (searched groups, static activations), Q-DiT (searched groups +
GPTQ + dynamic). The search is deliberately small so the script runs in minutes (population 12, 4 generations,
fitness on 64 samples at 25 steps; the paper: population 50, 10 generations, FID of 800 samples); the rows are
scored on >= 1,000 samples at 50 steps, so every searched recipe is also a 25 → 50-step transfer test.
"search only" reuses the assignment searched with dynamic activations. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import ditq
from ditq.api import shallow_clone
from ditq.atomic import json_text, write_text
from ditq.bundled import open_model
from ditq.eval.report import json_scores
from ditq.eval.runner import SampleSettings, evaluate
from ditq.methods.qdit import QDiT, average_bits_per_weight, gptq_cache
from ditq.recipes import RTN
from ditq.search import (
    FitnessSettings,
    GroupSearch,
    SearchConfig,
    make_fitness,
    run_search,
)
from ditq.search.fitness import spearman
from ditq.search.genetic import random_genome


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes")
    args = p.parse_args()
    tiny = args.tiny
    n = dict(eval_samples=16 if tiny else 1000, eval_steps=4 if tiny else 50, batch=16 if tiny else 500,
             fit_samples=4 if tiny else 64, fid_samples=8 if tiny else 256, fit_steps=3 if tiny else 25,
             generations=2 if tiny else 4, population=4 if tiny else 12, rho_candidates=4 if tiny else 32,
             calib_samples=2 if tiny else 16, calib_steps=3 if tiny else 25)  # fmt: skip
    bits_list = (4, 3) if tiny else (4, 3, 6)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "search_state"  # scratch, removed at the end (the 6-file limit)
    torch.manual_seed(0)
    fp, source = open_model("DiT-MNIST", device=args.device)
    calib = ditq.calibrate(fp, n_samples=n["calib_samples"], steps=n["calib_steps"], seed=1)
    report: dict = {"model": source, "settings": n, "searches": {}, "rows": {}, "spearman": {}}

    def fit_settings(fitness: str) -> FitnessSettings:
        samples = n["fid_samples"] if fitness == "fid" else n["fit_samples"]
        return FitnessSettings(samples=samples, steps=n["fit_steps"], seed=7, batch_size=512)

    def search(bits: int, fitness: str) -> QDiT:
        config = SearchConfig(generations=n["generations"], population=n["population"], top_k=4, n_crossover=4,
                              n_mutation=4, mutation_prob=0.15, fitness=fitness, fitness_settings=fit_settings(fitness),
                              seed=0)  # fmt: skip
        folder = work / f"w{bits}_{fitness}"
        shutil.rmtree(folder, ignore_errors=True)
        searched = GroupSearch(fp, QDiT(w_bits=bits, a_bits=8), calib=calib)
        result = run_search(fp, searched, config, folder, progress=False)
        report["searches"][f"W{bits}A8 {fitness}"] = {
            "seconds": round(result.seconds, 1), "evaluations": result.evaluations,
            "best_fitness": result.best_fitness, "best_bits": result.best_bits, "budget_bits": result.budget_bits,
            "groups": {str(g): list(result.best.values()).count(g) for g in set(result.best.values())},
            "assignment": result.best,
        }  # fmt: skip
        print(f"search W{bits}A8 {fitness}: {result.evaluations} evaluations, {result.seconds:.1f} s, "
              f"best {result.best_fitness:.4f}", flush=True)  # fmt: skip
        return searched.recipe(searched.space.genome(result.best))

    def rows_for(bits: int, searched: dict[str, QDiT]) -> dict[str, ditq.Recipe]:
        rows: dict[str, ditq.Recipe] = {
            f"W{bits}A8 RTN g128": RTN(w_bits=bits, group_size=128, symmetric=False, a_bits=8),
            f"W{bits}A8 GPTQ g128": QDiT(w_bits=bits, a_dynamic=False),
            f"W{bits}A8 dynamic only": QDiT(w_bits=bits),
        }
        for fitness, recipe in searched.items():
            label = "" if fitness == "psnr" else f" ({fitness} fitness)"
            if fitness == "psnr":
                rows[f"W{bits}A8 search only"] = QDiT.with_groups(_groups(recipe), w_bits=bits, a_dynamic=False)
            rows[f"W{bits}A8 Q-DiT{label}"] = recipe
        return rows

    started = time.perf_counter()
    recipes: dict[str, ditq.Recipe] = {}
    for bits in bits_list:
        fitnesses = ("psnr", "output", "fid") if bits == 4 else ("psnr",)
        recipes |= rows_for(bits, {f: search(bits, f) for f in fitnesses})

    # How well does each proxy rank candidates against the FID fitness? Random W4 genomes within budget.
    w4 = GroupSearch(fp, QDiT(w_bits=4, a_bits=8), budget="g128", calib=calib)
    rng = np.random.default_rng(1)
    genomes = [w4.uniform(128)] + [random_genome(w4.space, rng) for _ in range(n["rho_candidates"] - 1)]
    scores: dict[str, list[float]] = {f: [] for f in ("fid", "psnr", "output")}
    seconds = dict.fromkeys(scores, 0.0)
    fits = {f: make_fitness(f, fp, fit_settings(f)) for f in scores}
    with gptq_cache():
        for genome in genomes:
            model = w4.candidate(genome)
            for f, fitness in fits.items():
                began = time.perf_counter()
                scores[f].append(fitness(model))
                seconds[f] += time.perf_counter() - began
    report["spearman"] = {f: {"rho_vs_fid": spearman(scores[f], scores["fid"]), "candidates": len(genomes),
                              "seconds_per_eval": seconds[f] / len(genomes)} for f in ("psnr", "output")}  # fmt: skip
    print(f"spearman: {report['spearman']}  ({time.perf_counter() - started:.0f} s so far)", flush=True)

    # Score every row on >= 1,000 samples at 50 steps (seed 0), and the W4 rows again at seed 1 (spread).
    for seed in (0,) if tiny else (0, 1):
        chosen = recipes if seed == 0 else {k: v for k, v in recipes.items() if k.startswith("W4A8")}
        models = {"FP": fp}
        for label, recipe in chosen.items():
            models[label] = ditq.prepare_for_inference(ditq.quantize(shallow_clone(fp), recipe, calib), "dequantized")
        settings = SampleSettings(samples=n["eval_samples"], steps=n["eval_steps"], seed=seed, batch_size=n["batch"])
        results, _ = evaluate(models, settings)
        for label, row in results.items():
            if label == "settings":
                continue
            bits = 32.0 if label == "FP" else average_bits_per_weight(fp, chosen[label])
            report["rows"].setdefault(label, {})[f"seed{seed}"] = row | {"bits_per_weight": bits}
        print(f"evaluated seed {seed} ({time.perf_counter() - started:.0f} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(work, ignore_errors=True)
    json_path = args.out / "results.json"
    write_text(json_path, json_text(json_scores(report), what=str(json_path), indent=1, default=str) + "\n")
    table = _markdown(report)
    write_text(args.out / "results.md", table)
    print(table)


def _groups(recipe: QDiT) -> dict[str, int | None]:
    return {pattern: dict(changes)["group_size"] for pattern, changes in recipe.overrides}


def _markdown(report: dict) -> str:
    lines = ["| row | bits/weight | PSNR vs FP (dB) | SSIM | FID | class acc | PSNR seed 1 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, seeds in report["rows"].items():
        r, r1 = seeds["seed0"], seeds.get("seed1", {})
        psnr = f"{r['psnr_vs_fp']:.2f}" if "psnr_vs_fp" in r else "—"
        ssim = f"{r['ssim_vs_fp']:.4f}" if "ssim_vs_fp" in r else "—"
        psnr1 = f"{r1['psnr_vs_fp']:.2f}" if "psnr_vs_fp" in r1 else ("(FP)" if r1 else "")
        lines.append(f"| {label} | {r['bits_per_weight']:.4f} | {psnr} | {ssim} | {r['fid']:.3f} | "
                     f"{r['class_acc']:.4f} | {psnr1} |")  # fmt: skip
    lines += ["", "| search | evaluations | wall s | best fitness | bits/weight (budget) |", "|---|---|---|---|---|"]
    for label, s in report["searches"].items():
        lines.append(f"| {label} | {s['evaluations']} | {s['seconds']} | {s['best_fitness']:.4f} | "
                     f"{s['best_bits']:.4f} ({s['budget_bits']:.4f}) |")  # fmt: skip
    lines += ["", "| proxy | Spearman ρ vs FID fitness | candidates | s per evaluation |", "|---|---|---|---|"]
    for f, s in report["spearman"].items():
        lines.append(f"| {f} | {s['rho_vs_fid']:.3f} | {s['candidates']} | {s['seconds_per_eval']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

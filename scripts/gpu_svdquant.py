"""SVDQuant on the bundled DiT-MNIST (docs/results/svdquant/) and calibration time/memory at DiT-XL/2 size.

    PYTHONPATH=. python scripts/gpu_svdquant.py --out $OUT                 # the table, one H100, ~5 minutes
    PYTHONPATH=. python scripts/gpu_svdquant.py --out $OUT --timing-xl     # DiT-XL/2 (random weights) calibration
    PYTHONPATH=. python scripts/gpu_svdquant.py --out /tmp/s --device cpu --tiny [--timing-xl]   # CPU smoke test

Table: one calibration of the FP model (64 samples × 25 steps, seed 1) feeds every row; every row samples the
same 1,000 images (same labels, seeds and noise, 50 DDIM steps, cfg 1.5) and is scored by PSNR/SSIM against
the FP samples, class accuracy and FID (the FP model's FID at two more seeds gives the seed spread). Rows at
W4A4 (int4 per token group 64) and W4A8-FP8 (e4m3 per token), weights int4 symmetric g64, blocks only and
blocks + adaLN: RTN, SmoothQuant (searched α, no branch), low-rank only, SVDQuant, SVDQuant + GPTQ, at rank
32 and at the largest rank whose branch costs ≤ 10% of every layer's 4-bit bytes; the rank sweep; RTN W4A8
(int8 per token) g64 as the target to beat. Bits per weight count codes, scales, smoothing vectors and
low-rank factors (fp16) of the quantized layers, shared group tensors once; sizes are checkpoint bytes with
the rest in fp16. Writes results.json and results.md (or timing_xl.json / timing_xl.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import ditq
from ditq.api import plan, shallow_clone
from ditq.atomic import write_json, write_text
from ditq.bundled import open_model
from ditq.eval.features import load_feature_net, load_real_stats
from ditq.eval.report import json_scores
from ditq.eval.runner import SampleSettings, compare_pixels, draw, score
from ditq.io import model_size_bytes, stored_tensors
from ditq.methods.svdquant import SVDQuant, svdquant_quantize
from ditq.models import create
from ditq.recipes import RTN

A4 = {"a_bits": 4, "a_format": "int", "a_group_size": 64}
A8 = {"a_bits": 8, "a_format": "fp8", "a_group_size": None}
COVER = {"blocks": {}, "blocks+adaLN": {"quantize_modulation": True}}


def rows(r_small: int, alphas: tuple[float, ...]) -> list[tuple[str, str, str, object]]:
    """(row name, activations, coverage, recipe) in table order."""
    out = []
    for act, a in (("W4A4", A4), ("W4A8-FP8", A8)):
        for cover, selection in COVER.items():
            base = SVDQuant(alphas=alphas, **selection, **a)
            out += [
                ("RTN", act, cover, replace(base, smooth=False, rank=0)),
                ("SmoothQuant", act, cover, replace(base, rank=0)),
                ("low-rank only r32", act, cover, replace(base, smooth=False)),
                ("SVDQuant r32", act, cover, base),
                ("SVDQuant+GPTQ r32", act, cover, replace(base, gptq=True)),
            ]
            if cover == "blocks+adaLN":
                out += [(f"SVDQuant r{r_small}", act, cover, replace(base, rank=r_small)),
                        (f"SVDQuant+GPTQ r{r_small}", act, cover, replace(base, rank=r_small, gptq=True))]
        if act == "W4A4":
            base = SVDQuant(quantize_modulation=True, alphas=alphas, **a)
            out += [(f"SVDQuant r{r} (sweep)", act, "blocks+adaLN", replace(base, rank=r)) for r in (8, 16, 64)]
    for cover, selection in COVER.items():
        out.append(("RTN W4A8-int8 g64 (target)", "W4A8-int8", cover,
                    RTN(w_bits=4, group_size=64, a_bits=8, **selection)))
    return out


def small_rank(model: torch.nn.Module, recipe: SVDQuant) -> int:
    """Largest r whose branch (r·(in+out) fp16 values) is ≤ 10% of every quantized layer's 4-bit code bytes."""
    ranks = []
    for name in plan(model, recipe):
        lin = model.get_submodule(name)
        ranks.append(int(0.1 * 4 * lin.in_features * lin.out_features // (16 * (lin.in_features + lin.out_features))))
    return max(1, min(ranks))


def quantized_bits(model: torch.nn.Module) -> tuple[float, int]:
    """(bits per weight of the quantized layers as stored, their number of weights); shared tensors once."""
    tensors, _ = stored_tensors(model, torch.float16)
    names = [n for n, m in model.named_modules() if isinstance(m, ditq.quant.qlinear.QuantLinear)]
    weights = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
    prefixes = tuple(f"{n}." for n in names)
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items()
                 if (k.startswith(prefixes) and not k.endswith(".bias")) or k.startswith("input_groups."))
    return 8 * stored / max(weights, 1), weights


def table(args: argparse.Namespace) -> None:
    tiny = args.tiny
    alphas = (0.0, 0.5) if tiny else tuple(i / args.grid for i in range(args.grid))
    settings = SampleSettings(samples=16 if tiny else args.samples, steps=4 if tiny else 50, cfg_scale=1.5,
                              seed=0, batch_size=16 if tiny else 1000)
    torch.manual_seed(0)
    fp, source = open_model("DiT-MNIST", device=args.device)
    t0 = time.perf_counter()
    calib = ditq.calibrate(fp, n_samples=2 if tiny else 64, steps=3 if tiny else 25, seed=1,
                           rows_per_layer=128 if tiny else 2048)
    calib_capture_s = time.perf_counter() - t0
    fp16_bytes = model_size_bytes(fp, torch.float16)
    r_small = small_rank(fp, SVDQuant(quantize_modulation=True))
    net, real = load_feature_net(), load_real_stats()
    labels = settings.labels(fp.num_classes)
    fp_images, fp_seconds = draw(fp, settings)
    results = {"model": source, "settings": asdict(settings),
               "calibration": {"samples": calib.n_samples, "steps": calib.steps, "seconds": round(calib_capture_s, 1)},
               "fp16_bytes": fp16_bytes, "rank_10pct": r_small, "rows": []}
    fp_row = {"row": "FP", "act": "-", "cover": "-", "rank": 0, "bits_per_weight": 16.0, "size_bytes": fp16_bytes,
              "x_smaller": 1.0, **score(fp_images, labels, net, real), "sample_s": round(fp_seconds, 1)}
    fp_row["fid_seeds"] = [fp_row["fid"]] + [score(draw(fp, replace(settings, seed=s))[0], labels, net, real)["fid"]
                                             for s in (1, 2)]
    results["rows"].append(fp_row)
    print(f"FP: {source}; calibration {calib_capture_s:.1f}s; rank ≤10% bytes = {r_small}", flush=True)
    state_root = Path(tempfile.mkdtemp(prefix="svdq_state_"))
    try:
        for name, act, cover, recipe in rows(r_small, alphas):
            start = time.perf_counter()
            model = shallow_clone(fp)
            if isinstance(recipe, SVDQuant):  # one state dir per recipe-without-skip: blocks-only rows reuse units
                selection = ("skip", "quantize_modulation")
                unit_settings = {k: v for k, v in recipe.to_dict().items() if k not in selection}
                key = json.dumps(unit_settings, sort_keys=True)
                state = state_root / hashlib.sha256(key.encode()).hexdigest()[:16]
                chosen = svdquant_quantize(model, recipe, calib, state_dir=state, progress=False)
            else:
                ditq.quantize(model, recipe, calib)
                chosen = {}
            quant_s = time.perf_counter() - start
            ditq.prepare_for_inference(model, backend="dequantized")
            images, seconds = draw(model, settings)
            bpw, _ = quantized_bits(model)
            size = model_size_bytes(model, torch.float16)
            alphas_used = sorted({round(v["alpha"], 2) for v in chosen.values()}) if chosen else []
            row = {"row": name, "act": act, "cover": cover, "rank": getattr(recipe, "rank", 0),
                   "bits_per_weight": round(bpw, 3), "size_bytes": size, "x_smaller": round(fp16_bytes / size, 2),
                   **score(images, labels, net, real), **compare_pixels(images, fp_images),
                   "quantize_s": round(quant_s, 1), "sample_s": round(seconds, 1), "alphas_chosen": alphas_used,
                   "recipe": recipe.to_dict()}
            results["rows"].append(row)
            print(f"{name:28s} {act:9s} {cover:13s} PSNR {row['psnr_vs_fp']:.2f} acc {row['class_acc']:.4f} "
                  f"FID {row['fid']:.2f} bpw {bpw:.2f} ({quant_s:.1f}s + {seconds:.1f}s)", flush=True)
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", json_scores(results), indent=1)
    md = markdown(results, settings)
    write_text(args.out / "results.md", md)
    print(md)


def markdown(results: dict, settings: SampleSettings) -> str:
    fp = results["rows"][0]
    lines = [
        f"DiT-MNIST, {settings.samples} samples per row, {settings.steps} DDIM steps, cfg {settings.cfg_scale}, "
        f"same seeds and noise; calibration {results['calibration']['samples']} samples × "
        f"{results['calibration']['steps']} steps. FP FID over seeds 0/1/2: "
        + " / ".join(f"{f:.2f}" for f in fp["fid_seeds"]) + f"; FP class acc {fp['class_acc']:.4f}. "
        f"Rank whose branch is ≤ 10% of each layer's 4-bit bytes: {results['rank_10pct']}.",
        "",
        "| row | acts | layers | bits/weight | size (bytes) | × vs fp16 | PSNR vs FP | SSIM vs FP | class acc | FID |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"][1:]:
        lines.append(f"| {r['row']} | {r['act']} | {r['cover']} | {r['bits_per_weight']:.2f} | {r['size_bytes']:,} | "
                     f"{r['x_smaller']:.2f} | {r['psnr_vs_fp']:.2f} | {r['ssim_vs_fp']:.4f} | {r['class_acc']:.4f} | "
                     f"{r['fid']:.2f} |")
    return "\n".join(lines) + "\n"


def timing_xl(args: argparse.Namespace) -> None:
    """Calibration of DiT-XL/2 (random weights, perturbed so adaLN is not zero): capture, SVDQuant, peak memory."""
    tiny = args.tiny
    torch.manual_seed(0)
    model = create("DiT-S/2", depth=2, input_size=8) if tiny else create("DiT-XL/2")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(args.device).eval()
    cuda = torch.device(args.device).type == "cuda"
    report: dict = {"model": "DiT-S/2 depth 2 (tiny)" if tiny else "DiT-XL/2 (random weights)",
                    "device": torch.cuda.get_device_name() if cuda else "cpu"}
    t0 = time.perf_counter()
    sizes = {"n_samples": 2, "steps": 2, "rows_per_layer": 64} if tiny else {
        "n_samples": 32, "steps": 25, "rows_per_layer": 1024}
    calib = ditq.calibrate(model, **sizes, seed=1, progress=not tiny)
    report["calibration"] = sizes
    report["capture_s"] = round(time.perf_counter() - t0, 1)
    print(f"capture: {report['capture_s']} s", flush=True)
    variants = [("svdquant-w4a4", {}), ("svdquant-w4a4 + GPTQ", {"gptq": True}), ("svdquant-w4a8", {})]
    variants = [v for v in variants if args.xl_variants is None or v[0] in args.xl_variants.split(",")]
    for name, change in variants:
        preset = ditq.recipes.load_recipe(name.split(" ")[0])
        recipe = replace(preset, **change, **({"alphas": (0.0, 0.5)} if tiny else {}))
        quantized = shallow_clone(model)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        state = Path(tempfile.mkdtemp(prefix="svdq_xl_"))
        t0 = time.perf_counter()
        try:
            svdquant_quantize(quantized, recipe, calib, state_dir=state, progress=not tiny)
            if cuda:
                torch.cuda.synchronize()
        finally:
            shutil.rmtree(state, ignore_errors=True)
        seconds = time.perf_counter() - t0
        report[name] = {"seconds": round(seconds, 1), "layers": len(plan(model, recipe)),
                        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        print(f"{name}: {seconds:.1f}s, peak {report[name]['peak_gpu_gib']} GiB", flush=True)
        del quantized
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "timing_xl.json", report, indent=1)
    md = [f"{report['model']} on {report['device']}: calibration capture ({sizes['n_samples']} samples × "
          f"{sizes['steps']} steps, {sizes['rows_per_layer']} rows per layer) {report['capture_s']} s, then per "
          "recipe (a state file written per group, as a resumable run does):",
          "", "| recipe | layers | seconds | peak GPU memory (GiB) |", "|---|---|---|---|"]
    md += [f"| {n} | {report[n]['layers']} | {report[n]['seconds']} | {report[n]['peak_gpu_gib']} |" for n, _ in variants]
    write_text(args.out / "timing_xl.md", "\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--grid", type=int, default=20, help="α grid points in [0, 1) (the recipes' default is 20)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes")
    p.add_argument("--timing-xl", action="store_true", help="time calibration at DiT-XL/2 size instead of the table")
    p.add_argument("--xl-variants", help="comma-separated subset of the timed recipes (default: all three)")
    args = p.parse_args()
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    (timing_xl if args.timing_xl else table)(args)


if __name__ == "__main__":
    main()

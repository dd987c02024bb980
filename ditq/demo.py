"""The main job: quantize the bundled DiT-MNIST, sample it next to the full-precision model, report.

Writes `grid.png` (one FP row, one row per quantized model, same seeds and noise), the quantized
checkpoint, `report.json` and `report.md` into the output folder. It calibrates and quantizes through
`ditq.pipeline`, like `ditq quantize`, so its per-layer errors and sizes match what that command prints.
Everything runs on a laptop CPU in a minute or two.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ditq import io
from ditq.atomic import write_text
from ditq.bundled import open_model
from ditq.eval.runner import SampleSettings, evaluate
from ditq.grid import make_grid, save_image
from ditq.pipeline import CalibSettings, post_training_quantize
from ditq.recipes import Recipe, load_recipe

DEMO_RECIPE = "w4a8"


def run_demo(
    out_dir: str | Path = "out",
    *,
    recipe: Recipe | str = DEMO_RECIPE,
    model_ref: str = "DiT-MNIST",
    settings: SampleSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return the report it wrote."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    settings = settings or SampleSettings(samples=100, steps=25, cfg_scale=1.5, seed=0, batch_size=100)
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    torch.manual_seed(settings.seed)

    fp_model, source = open_model(model_ref)
    print(f"model: {source}")
    ptq = post_training_quantize(fp_model, recipe, settings=CalibSettings(seed=settings.seed + 1))
    label = _recipe_label(recipe)
    checkpoint = io.save(ptq.model, out_dir / "quantized.safetensors", float_dtype=ptq.float_dtype)
    sizes = {"fp": ptq.fp16_size_bytes, "quant": os.path.getsize(checkpoint)}

    results, images = evaluate({"fp": fp_model, "quant": ptq.model}, settings, progress=progress,
                               sizes=sizes)
    report = {
        "model": source,
        "recipe": recipe.to_dict(),
        "recipe_label": label,
        "samples": settings.samples,
        "settings": results.pop("settings"),
        "calibration": asdict(ptq.settings),
        "checkpoint": str(checkpoint),
        "fp": results["fp"],
        "quant": results["quant"],
        "compression": sizes["fp"] / sizes["quant"],
        "layers": ptq.layers,
        "seconds": round(time.perf_counter() - start, 1),
    }
    n_show = 2 * fp_model.num_classes  # samples are labelled 0, 1, …, 9, 0, 1, …: two of each digit
    save_image(make_grid([("FP16", images["fp"][:n_show]), (label, images["quant"][:n_show])]), out_dir / "grid.png")
    write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out_dir / "report.md", render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    s, c = report["settings"], report["calibration"]
    lines = [
        "# ditq demo report",
        "",
        f"- model: {report['model']}",
        f"- recipe: {report['recipe_label']} — `{json.dumps(report['recipe'])}`",
        f"- metrics from **{report['samples']} samples** per model ({s['sampler']}, {s['steps']} steps, "
        f"cfg {s['cfg_scale']}, seed {s['seed']}); FID is against all 10,000 real images in the bundled "
        "MNIST classifier's feature space, so it is noisy at this sample count: compare rows, not papers",
        f"- calibration: {c['samples']} samples × {c['steps']} steps (seed {c['seed']}), as `ditq quantize` does",
        f"- sizes: FP16 = the model's tensors in 16 bits; quantized = bytes on disk of `{report['checkpoint']}`",
        f"- wall time: {report['seconds']} s",
        "",
        "| model | size (bytes) | FID | class acc | IS | precision | recall | PSNR vs FP (dB) | SSIM vs FP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("fp", "quant"):
        r = report[name]
        vs_fp = f"{r['psnr_vs_fp']:.2f} | {r['ssim_vs_fp']:.3f}" if "psnr_vs_fp" in r else "— | —"
        lines.append(
            f"| {'FP16' if name == 'fp' else report['recipe_label']} | {r['size_bytes']:,} | {r['fid']:.2f} | "
            f"{r['class_acc']:.3f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {vs_fp} |"
        )
    lines += [
        "",
        f"Compression vs 16-bit: {report['compression']:.2f}× (bytes on disk)",
        "",
        "## Per-layer quantization error (inputs captured along FP sampling trajectories)",
        "",
        "| layer | shape | bits | group | weight rel. err | output rel. err | SQNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["layers"]:
        lines.append(
            f"| {row['layer']} | {row['shape']} | {row['w_bits']} | {row['group_size'] or 'ch'} | "
            f"{row['weight_rel_err']:.4f} | {row['output_rel_err']:.4f} | {row['sqnr_db']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _recipe_label(recipe: Recipe) -> str:
    data = recipe.to_dict()
    w, a, g = data.get("w_bits"), data.get("a_bits"), data.get("group_size")
    name = f"{recipe.method.upper()} W{w}A{a if a is not None else 16}"
    return name + (f" g{g}" if g else "")

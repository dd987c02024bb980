"""The main job: quantize the bundled DiT-MNIST, sample it next to the full-precision model, report.

The recipe is the best 4-bit one measured on this model (SVDQuant + GPTQ, W4A8-FP8: `docs/results.md`), with
RTN W4A8 beside it as the baseline, both from one calibration. Writes `grid.png` (FP, baseline and quantized
rows, same seeds and noise), the quantized checkpoint, `report.json` and `report.md` into the output folder.
It calibrates and quantizes through `ditq.pipeline`, like `ditq quantize`, so its per-layer errors and sizes
match what that command prints. With `progress` it prints one line per stage with the seconds it took; without,
it prints nothing. The whole demo is about 4.6 CPU-minutes of work, three quarters of it sampling 64 images from
each of the three models: 160 s on 2 idle cores of an AMD EPYC, and proportionally longer on a machine busy with
other work.

Threads are chosen per stage (`ditq.threads`): calibration samples on one thread, SVDQuant spreads its grid
points and the evaluation its models over the cores, one thread each, so a busy machine slows the demo in
proportion instead of stalling every op at a barrier.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ditq import io
from ditq.api import check_plan
from ditq.atomic import write_json, write_text
from ditq.bundled import open_model
from ditq.eval.report import json_scores, render_layer_table
from ditq.eval.runner import SampleSettings, check_scorable, draw_models, score_models
from ditq.grid import make_grid, save_image
from ditq.kernels import prepare_for_inference
from ditq.pipeline import CalibSettings, post_training_quantize
from ditq.progress import stage
from ditq.recipes import Recipe, load_recipe
from ditq.threads import torch_threads

# SVDQuant + GPTQ on the residual, W4A8-FP8, rank 32, blocks and adaLN (38.7 dB PSNR vs FP on the H100 table),
# searched on a 4-point α grid over 256 rows so that it calibrates in seconds on a CPU (the full grid: minutes).
DEMO_RECIPE = replace(load_recipe("svdquant-w4a8"), gptq=True, alphas=(0.0, 0.25, 0.5, 0.75), search_rows=256)
BASELINE_RECIPE = "w4a8"
CHECKPOINT, GRID, REPORT_JSON, REPORT_MD = "quantized.safetensors", "grid.png", "report.json", "report.md"
OUTPUT_FILES = (CHECKPOINT, GRID, REPORT_JSON, REPORT_MD)  # what `run_demo` writes into its folder
# What the demo samples: 64 images per model (the size of the CPU tables in docs/results.md), which keeps the
# whole demo within 3 minutes on 2 cores (100 images took 213–221 s on 2 cores of an AMD EPYC).
DEMO_SETTINGS = SampleSettings(samples=64, steps=25, cfg_scale=1.5, seed=0)
# Images per forward while sampling (× 2 with guidance): small enough that each op's output reuses freed memory
# instead of mapping fresh pages (a batch of 100 spent a third of the quantized models' time in the kernel doing
# that), and four batches per model keep two workers busy to the end. Each sample has its own noise, so the
# images do not depend on it beyond the batch-invariance of the model's kernels (bit for bit where measured).
DEMO_BATCH = 16


def run_demo(
    out_dir: str | Path = "out",
    *,
    recipe: Recipe | str = DEMO_RECIPE,
    baseline: Recipe | str | None = BASELINE_RECIPE,
    model_ref: str = "DiT-MNIST",
    settings: SampleSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return the report it wrote (`baseline=None` leaves the baseline row out).

    It samples at most `DEMO_BATCH` images per forward, whatever `settings.batch_size` says: the images are
    the same, and on a CPU smaller batches are faster (see `DEMO_BATCH`).
    """
    stages = _Stages(progress)
    out_dir = Path(out_dir)
    settings = settings or DEMO_SETTINGS
    settings = replace(settings, batch_size=min(settings.batch_size, DEMO_BATCH))
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    baseline = load_recipe(baseline) if isinstance(baseline, str) else baseline
    workers = torch.get_num_threads()  # the cores torch would use
    torch.manual_seed(settings.seed)

    with stages("load model"):
        fp_model, source = open_model(model_ref)
    check_scorable({"fp": fp_model}, settings.samples)  # before the minutes of calibration and quantization
    for each in (recipe, baseline):  # it calibrates here itself, so it checks the plans before, as the pipeline does
        if each is not None:
            check_plan(fp_model, each)
    stage(progress, f"model: {source}")
    calib_settings = CalibSettings(seed=settings.seed + 1)
    with stages(f"calibrate ({calib_settings.samples} samples × {calib_settings.steps} steps)"), torch_threads(1):
        calib = calib_settings.calibrate(fp_model, progress=progress)
    label = _recipe_label(recipe)
    with stages(f"quantize {label}"):
        ptq = post_training_quantize(fp_model, recipe, settings=calib_settings, calib=calib)
        checkpoint = io.save(ptq.model, out_dir / CHECKPOINT, float_dtype=ptq.float_dtype)
    sizes = {"fp": ptq.fp16_size_bytes, "quant": os.path.getsize(checkpoint)}

    models = {"fp": fp_model, "quant": ptq.model}
    labels = {"fp": "FP16", "quant": label}
    if baseline is not None:
        labels["baseline"] = _recipe_label(baseline)
        with stages(f"quantize {labels['baseline']}"):
            base = post_training_quantize(fp_model, baseline, settings=calib_settings, calib=calib)
        models["baseline"], sizes["baseline"] = base.model, base.quant_size_bytes
    for name in ("quant", "baseline"):
        if name in models:  # Ŵ kept dequantized: the reference's outputs exactly, without unpacking per call
            prepare_for_inference(models[name], "dequantized")
    with stages(f"sample {settings.samples} images × {len(models)} models, {workers} workers"):
        drawn = draw_models(models, settings, progress=progress, workers=workers)
    stage(progress, "  " + ", ".join(f"{labels[name]} {drawn[name][1]:.1f} s" for name in models))
    with stages("metrics (FID, IS, precision/recall, PSNR/SSIM)"):
        results = score_models(models, drawn, settings, sizes)
    images = {name: images for name, (images, _) in drawn.items()}
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
        **({"baseline": results["baseline"], "baseline_label": labels["baseline"],
            "baseline_recipe": baseline.to_dict()} if baseline is not None else {}),
        "compression": sizes["fp"] / sizes["quant"],
        "layers": ptq.layers,
        "stages": dict(stages.seconds),
        "seconds": stages.elapsed(),
    }
    with stages("write grid and reports"):
        n_show = 2 * fp_model.num_classes  # samples are labelled 0, 1, …, 9, 0, 1, …: two of each digit
        rows = [(labels[name], images[name][:n_show]) for name in ("fp", "baseline", "quant") if name in images]
        save_image(make_grid(rows), out_dir / GRID)
        write_json(out_dir / REPORT_JSON, json_scores(report))
        write_text(out_dir / REPORT_MD, render_markdown(report))
    stage(progress, f"total: {stages.elapsed():.1f} s")
    return report


class _Stages:
    """The demo's clock: `with stages(name):` records the stage's seconds and, with `progress`, prints
    `name: seconds` when it ends."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        stage(self.progress, f"{name}: {self.seconds[name]:.1f} s")

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 1)


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
        f"- sizes: FP16 = the model's tensors in 16 bits; {report['recipe_label']} = bytes on disk of "
        f"`{report['checkpoint']}`; the baseline = its tensors as stored",
        f"- wall time: {report['seconds']} s ("
        + "; ".join(f"{name}: {seconds} s" for name, seconds in report["stages"].items()) + ")",
        "",
        f"## Scores of {report['model']}, in full precision and quantized",
        "",
        "| model | size (bytes) | FID | class acc | IS | precision | recall | PSNR vs FP (dB) | SSIM vs FP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"fp": "FP16", "baseline": report.get("baseline_label"), "quant": report["recipe_label"]}
    for name in ("fp", "baseline", "quant"):
        if name not in report:
            continue
        r = report[name]
        vs_fp = f"{r['psnr_vs_fp']:.2f} | {r['ssim_vs_fp']:.3f}" if "psnr_vs_fp" in r else "— | —"
        lines.append(
            f"| {labels[name]} | {r['size_bytes']:,} | {r['fid']:.2f} | "
            f"{r['class_acc']:.3f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {vs_fp} |"
        )
    lines += ["", f"Compression vs 16-bit: {report['compression']:.2f}× (bytes on disk)", "",
              "## Per-layer quantization error", "", render_layer_table(report["layers"], report["recipe_label"])]
    return "\n".join(lines)


_METHOD_NAMES = {"rtn": "RTN", "svdquant": "SVDQuant", "qdit": "Q-DiT", "qat": "QAT"}


def _recipe_label(recipe: Recipe) -> str:
    """e.g. `SVDQuant W4A8-FP8 g64 r32 +GPTQ`, `RTN W4A8 g128`."""
    data = recipe.to_dict()
    w, a, g = data.get("w_bits"), data.get("a_bits"), data.get("group_size")
    acts = "16" if a is None else f"{a}-FP8" if data.get("a_format") == "fp8" else str(a)
    label = f"{_METHOD_NAMES.get(recipe.method, recipe.method)} W{w}A{acts}" + (f" g{g}" if g else "")
    return label + (f" r{data['rank']}" if data.get("rank") else "") + (" +GPTQ" if data.get("gptq") else "")

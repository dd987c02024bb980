"""`ditq` command line: argparse subcommands that call the library and print what they did."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":  # the trainer owns its flags (and runs under torchrun)
        from ditq.train import main as train_main

        return train_main(argv[1:]) or 0
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"ditq {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditq", description="Quantize, sample and evaluate diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a zoo model (see `ditq train --help`)", add_help=False)

    q = sub.add_parser("quantize", help="quantize a model with a recipe and save a ditq checkpoint")
    _model_args(q)
    q.add_argument("--recipe", required=True, help="preset (w8a8, w6a8, w4a8, w4a16, w4a4) or a JSON/YAML file")
    q.add_argument("--out", required=True, type=Path, help="checkpoint path (.safetensors)")
    q.add_argument("--calib-samples", type=int, default=16, help="images sampled to capture calibration inputs")
    q.add_argument("--calib-steps", type=int, default=25)
    q.add_argument("--report", type=Path, help="write per-layer errors and sizes as JSON here")
    q.set_defaults(run=_quantize)

    s = sub.add_parser("sample", help="sample an image grid from a zoo model or a checkpoint")
    _model_args(s)
    _sampling_args(s, samples=16)
    s.add_argument("--out", required=True, type=Path, help="PNG path of the grid")
    s.set_defaults(run=_sample)

    e = sub.add_parser("eval", help="score models (FID, class accuracy, IS, precision/recall, PSNR/SSIM vs FP)")
    e.add_argument("--fp", default="DiT-MNIST", help="reference full-precision model (zoo name or checkpoint)")
    e.add_argument("--weights", help="weights for --fp when it is a zoo name (.pt or .safetensors)")
    e.add_argument("--model", action="append", default=[], help="checkpoint to score (repeatable)")
    e.add_argument("--recipe", action="append", default=[], help="quantize --fp with this recipe and score (repeatable)")
    _sampling_args(e, samples=1000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=250)
    e.add_argument("--out", type=Path, default=Path("out/eval"), help="folder for report.json and report.md")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.set_defaults(run=_eval)

    d = sub.add_parser("demo", help="the main job on the bundled DiT-MNIST: quantize, sample, report")
    d.add_argument("--out", type=Path, default=Path("out"))
    d.add_argument("--recipe", default="w4a8")
    d.add_argument("--samples", type=int, default=100)
    d.add_argument("--steps", type=int, default=25)
    d.set_defaults(run=_demo)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo name (e.g. DiT-MNIST, DiT-S/2) or a ditq checkpoint")
    p.add_argument("--weights", help="weights for a zoo model (.pt official layout or .safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _sampling_args(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--samples", type=int, default=samples)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")


def _quantize(args: argparse.Namespace) -> None:
    from ditq import io
    from ditq.api import quantize
    from ditq.bundled import open_model
    from ditq.calib import calibrate
    from ditq.eval.layers import layer_errors, model_size_bytes
    from ditq.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    model, source = open_model(args.model, weights=args.weights, seed=args.seed, device=args.device)
    print(f"model: {source}")
    calib = calibrate(model, n_samples=args.calib_samples, steps=args.calib_steps, seed=args.seed, progress=True)
    fp_model = copy.deepcopy(model)
    quantize(model, recipe, calib=calib)
    io.save(model, args.out)
    layers = layer_errors(fp_model, model, calib.inputs)
    fp_size, q_size = model_size_bytes(fp_model), model_size_bytes(model)
    for row in layers:
        print(f"{row['layer']:<28} {row['shape']:>10}  W{row['w_bits']} g{row['group_size'] or 'ch':<4} "
              f"weight err {row['weight_rel_err']:.4f}  output err {row['output_rel_err']:.4f}  "
              f"SQNR {row['sqnr_db']:.1f} dB")
    print(f"size: FP16 {fp_size:,} B → quantized {q_size:,} B ({fp_size / q_size:.2f}×); saved {args.out}")
    if args.report:
        from ditq.atomic import write_text

        report = {"model": source, "recipe": recipe.to_dict(), "fp_size_bytes": fp_size,
                  "quant_size_bytes": q_size, "layers": layers}
        write_text(args.report, json.dumps(report, indent=2) + "\n")


def _sample(args: argparse.Namespace) -> None:
    from ditq.bundled import open_model
    from ditq.diffusion import sample_images
    from ditq.grid import make_grid, save_image

    model, source = open_model(args.model, weights=args.weights, seed=args.seed, device=args.device)
    print(f"model: {source}")
    labels = torch.arange(args.samples) % model.num_classes
    images = sample_images(model, labels, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg,
                           seed=args.seed, progress=True)
    per_row = min(args.samples, 2 * model.num_classes if model.num_classes <= 16 else 8)
    rows = [("", images[i : i + per_row]) for i in range(0, args.samples, per_row)]
    save_image(make_grid(rows), args.out)
    print(f"wrote {args.out} ({args.samples} samples, {args.sampler} {args.steps} steps, cfg {args.cfg})")


def _eval(args: argparse.Namespace) -> None:
    from ditq import io
    from ditq.api import quantize
    from ditq.atomic import write_text
    from ditq.bundled import open_model
    from ditq.calib import calibrate
    from ditq.eval.report import render_table
    from ditq.eval.runner import SampleSettings, evaluate
    from ditq.recipes import load_recipe

    settings = SampleSettings(samples=args.samples, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                              seed=args.seed, batch_size=args.batch_size)
    fp_model, source = open_model(args.fp, weights=args.weights, device=args.device)
    models = {"FP": fp_model}
    recipes = [load_recipe(r) for r in args.recipe]
    if recipes:
        calib = calibrate(fp_model, n_samples=32, steps=args.steps, seed=args.seed + 1)
        for name, recipe in zip(args.recipe, recipes, strict=True):
            models[name.upper() if name.lower() == name else name] = quantize(
                copy.deepcopy(fp_model), recipe, calib=calib)
    for path in args.model:
        models[Path(path).stem] = io.load(path, device=args.device)
    results, _ = evaluate(models, settings, progress=True)
    results["fp_model"] = source
    results["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "report.json", json.dumps(results, indent=2) + "\n")
    table = render_table(results)
    write_text(args.out / "report.md", table)
    print(table)


def _demo(args: argparse.Namespace) -> None:
    from ditq.demo import run_demo
    from ditq.eval.runner import SampleSettings

    settings = SampleSettings(samples=args.samples, steps=args.steps, batch_size=args.samples)
    report = run_demo(args.out, recipe=args.recipe, settings=settings)
    fp, q = report["fp"], report["quant"]
    print(f"FP:    FID {fp['fid']:.2f}  class acc {fp['class_acc']:.3f}  size {fp['size_bytes']:,} B")
    print(f"{report['recipe_label']}: FID {q['fid']:.2f}  class acc {q['class_acc']:.3f}  "
          f"size {q['size_bytes']:,} B  PSNR vs FP {q['psnr_vs_fp']:.2f} dB")
    print(f"{report['samples']} samples per model, {report['seconds']} s; wrote {args.out}/grid.png, "
          f"report.md, report.json")


if __name__ == "__main__":
    raise SystemExit(main())

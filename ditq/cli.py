"""`ditq` command line: argparse subcommands that call the library and print what they did.

Every argument is checked before any expensive work (loading, calibrating, sampling), and a user error
ends in one line, `ditq <command>: error: …`, with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import textwrap
from pathlib import Path

import torch

from ditq.atomic import check_output_dir, check_output_file
from ditq.cli_checks import (
    HelpFormatter,
    OneLineParser,
    default_device,
    device_arg,
    finite_float,
    positive_int,
    run_command,
    served_bits,
    served_bits_list,
    write_report,
)
from ditq.diffusion.samplers import check_steps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # the trainer owns its flags (and runs under torchrun)
        from ditq.train import main as train_main

        return train_main(argv[1:]) or 0
    if argv and argv[0] == "search":  # the Q-DiT group-size search owns its flags (and runs under torchrun)
        from ditq.search import main as search_main

        return search_main(argv[1:]) or 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(_parser(), argv, lambda args: args.run(args))


def _parser() -> argparse.ArgumentParser:
    from ditq._version import __version__
    from ditq.demo import DEMO_SETTINGS
    from ditq.eval.speed import SpeedSettings
    from ditq.kernels import ALIASES, BACKENDS

    parser = OneLineParser(prog="ditq", formatter_class=HelpFormatter,
                           description="Quantize, sample, evaluate and time diffusion transformers.",
                           epilog="`ditq COMMAND --help` describes a command's flags.")
    parser.add_argument("--version", action="version", version=f"ditq {__version__}")
    common = OneLineParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str = "", **kwargs) -> argparse.ArgumentParser:
        text = textwrap.fill(f"{summary[0].upper()}{summary[1:]}. {description}".strip(), width=88)
        return sub.add_parser(name, parents=[common], help=summary, description=text, formatter_class=HelpFormatter,
                              **kwargs)  # fmt: skip

    sub.add_parser("train", help="train a zoo model, in full precision or quantization-aware (TerDiT)",
                   add_help=False)
    sub.add_parser("search", help="Q-DiT's search for per-layer group sizes; writes a recipe", add_help=False)

    q = command("quantize", "quantize a model with a recipe and save a checkpoint",
                "Calibrates on the model's own sampling trajectories, quantizes, prints per-layer errors and "
                "sizes.", epilog=_presets_help())
    _model_args(q, pipeline=True, seed="seed of random zoo weights; calibration uses seed + 1")
    _pipeline_args(q, "calibrate on")
    q.add_argument("--recipe", required=True, help="a preset (listed below) or a JSON/YAML recipe file")
    q.add_argument("--out", required=True, type=Path, help="checkpoint path (.safetensors)")
    _calib_args(q)
    q.add_argument("--report", type=Path, help="also write per-layer errors and sizes as JSON here")
    q.set_defaults(run=_quantize)

    s = command("sample", "sample an image grid from a zoo model or a checkpoint",
                "Labels cycle through the classes; the same --seed gives the same images.")
    _model_args(s, pipeline=True, seed="seed of the sampling noise (and of random zoo weights)")
    _pipeline_args(s, "sample")
    s.add_argument("--vae", help="local diffusers AutoencoderKL folder: decode a latent zoo DiT (DiT-XL/2)")
    s.add_argument("--bits", type=served_bits,
                   help="serve a nested (MatQuant) --model at this width (2..8) or JSON per-layer plan")
    s.add_argument("--bits-schedule", help="serve a nested (MatQuant) checkpoint at other widths at other steps: "
                                           "FROM:BITS pairs (0:2,0.5:4,0.8:8) or a JSON schedule file")
    _sampling_args(s, samples=16)
    s.add_argument("--out", required=True, type=Path, help="PNG path of the grid")
    s.set_defaults(run=_sample)

    e = command("eval", "score models: FID, class accuracy, IS, precision/recall, PSNR/SSIM vs the FP model",
                "Every model samples the same labels from the same noise; writes report.json and report.md.")
    e.add_argument("--fp", default="DiT-MNIST", help="reference full-precision model (zoo name or checkpoint)")
    e.add_argument("--weights", help="weights for --fp when it is a zoo name (.pt or .safetensors)")
    e.add_argument("--model", action="append", default=[], help="checkpoint to score (repeatable)")
    e.add_argument("--bits", type=served_bits_list,
                   help="score each nested (MatQuant) --model at these widths or JSON per-layer plans, one row "
                        "each, sized as exported (e.g. 8,4,2 or 4,plan.json); a one-width --model once, as saved")
    e.add_argument("--recipe", action="append", default=[],
                   help="quantize --fp with this preset or recipe file and score it (repeatable)")
    _sampling_args(e, samples=1000)
    _calib_args(e)
    e.add_argument("--seed", type=int, default=0, help="seed of the sampling noise; calibration uses seed + 1")
    e.add_argument("--batch-size", type=positive_int, default=250, help="images sampled per model call")
    e.add_argument("--out", type=Path, default=Path("out/eval"), help="folder for report.json and report.md")
    e.add_argument("--device", type=device_arg, default=default_device(), help="torch device to run on")
    e.add_argument("--vae", help="ImageNet protocol: local AutoencoderKL folder decoding the latents")
    e.add_argument("--inception", help="ImageNet protocol: FID Inception weights (pt_inception-2015-12-05 .pth)")
    e.add_argument("--ref-batch", help="ImageNet protocol: ADM reference batch (.npz); torchrun shards samples")
    e.set_defaults(run=_eval)

    b = command("bench", "time a model's forward pass beside its FP source's: ms and the speed ratio",
                "Quantized models run slower than full precision on the CPU (reference kernels); the FP8 "
                "backends run faster only on Hopper GPUs.")
    _model_args(b, pipeline=False, seed="seed of random zoo weights and of the inputs")
    b.add_argument("--fp", help="full-precision model to time beside it (zoo name or checkpoint)")
    b.add_argument("--backend", default="dequantized",
                   help=f"kernel backend of the quantized layers: {', '.join(sorted([*BACKENDS, *ALIASES]))}")
    b.add_argument("--batch", type=positive_int, default=8, help="images per forward, CFG doubling included")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    b.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) both models")
    b.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (mode='reduce-overhead')")
    b.add_argument("--repeats", type=positive_int, default=20,
                   help=f"timed calls per model, after {SpeedSettings().warmup} warm-up calls")
    b.add_argument("--out", type=Path, help="also write the timings as JSON here")
    b.set_defaults(run=_bench)

    x = command("export", "write the slice a nested (MatQuant) checkpoint serves as a checkpoint of that width",
                "Each nested layer becomes a plain quantized layer of the width it serves: the same weights bit "
                "for bit, codes packed at that width, run by the lowbit and fp8 kernel backends.")
    x.add_argument("--model", required=True, help="nested checkpoint (codes stored at more bits than served)")
    x.add_argument("--bits", type=served_bits,
                   help="width (2..8) or JSON per-layer plan to export (default: the widths the file serves)")
    x.add_argument("--out", required=True, type=Path, help="checkpoint path (.safetensors)")
    x.set_defaults(run=_export)

    d = command("demo", "the main job on the bundled DiT-MNIST: quantize, sample, report",
                "Writes grid.png, report.md, report.json and the quantized checkpoint into --out.")
    d.add_argument("--out", type=Path, default=Path("out"), help="folder for grid.png, reports and the checkpoint")
    d.add_argument("--recipe", help="recipe to show (default: SVDQuant + GPTQ W4A8-FP8 on a CPU-sized α grid)")
    d.add_argument("--baseline", default="w4a8", help="recipe shown beside it ('none' for no baseline row)")
    d.add_argument("--samples", type=positive_int, default=DEMO_SETTINGS.samples,
                   help="images per model (metrics and grid)")
    d.add_argument("--steps", type=positive_int, default=DEMO_SETTINGS.steps, help="DDIM sampling steps")
    d.set_defaults(run=_demo)
    return parser


def _presets_help() -> str:
    """The preset list for `quantize --help`, read from the presets registry."""
    from ditq.recipes import PRESETS

    needs = {"nothing": "needs nothing", "calibration": "needs calibration (done here)",
             "training": "needs training: `ditq train --recipe {}`, not quantize"}  # fmt: skip
    width = max(map(len, PRESETS))
    lines = [f"  {name:<{width}}  {type(recipe).__name__} {_spec_summary(recipe.spec(), _nested(recipe))}; "
             + needs[recipe.needs()].format(name) for name, recipe in PRESETS.items()]  # fmt: skip
    return "\n".join([
        "presets (--recipe NAME):", *lines, "",
        "Quantized models run slower than full precision on the CPU (reference kernels). Of these presets,",
        "w4a8-fp8 (int4 per channel, FP8 per token) runs faster than bf16: on Hopper GPUs, with the fp8 backends.",
    ])  # fmt: skip


def _nested(recipe) -> tuple[int, ...]:
    """The widths a nested (MatQuant) recipe chooses or trains its codes for; () for another recipe."""
    return tuple(getattr(recipe, "nested_bits", None) or ())


def _spec_summary(spec, nested: tuple[int, ...] = ()) -> str:
    """e.g. `W4 g128, A8 per token`, `ternary per channel, A16`, `W4 g64, A4 g64, rank 32, smoothed`,
    `W4 per channel from int8 codes fit to 8/4/2 bits, A16`."""
    weights = f"W{spec.w_bits}" + (f" g{spec.group_size}" if spec.group_size else " per channel")
    if spec.w_format == "ternary":
        weights = "ternary"
    if spec.stored_bits is not None:
        weights += f" from int{spec.stored_bits} codes" + (f" fit to {'/'.join(map(str, nested))} bits" if nested else "")
    if spec.a_bits is None:
        acts = "A16"
    else:
        acts = f"A{spec.a_bits}{'-FP8' if spec.a_format == 'fp8' else ''}"
        acts += f" g{spec.a_group_size}" if spec.a_group_size else " per token" if spec.a_dynamic else " static"
    extras = ([f"rank {spec.rank}"] if spec.rank else []) + (["smoothed"] if spec.smooth else [])
    return ", ".join([weights, acts, *extras])


def _model_args(p: argparse.ArgumentParser, *, pipeline: bool, seed: str) -> None:
    with_pipeline = " (with --pipeline: a quantized transformer checkpoint)" if pipeline else ""
    p.add_argument("--model", help=f"zoo name (e.g. DiT-MNIST, DiT-S/2) or a ditq checkpoint{with_pipeline}")
    p.add_argument("--weights", help="weights for a zoo model (.pt official layout or .safetensors)")
    p.add_argument("--seed", type=int, default=0, help=seed)
    p.add_argument("--device", type=device_arg, default=default_device(), help="torch device to run on")


def _pipeline_args(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--pipeline", help=f"local diffusers pipeline folder whose transformer to {verb}")
    p.add_argument("--prompt", action="append", default=[], help="prompt for a text pipeline (repeatable)")
    p.add_argument("--class-label", action="append", type=int, default=[],
                   help="class for a DiTPipeline (repeatable; default: the first classes)")


def _check_model_or_pipeline(args: argparse.Namespace, model_needed: bool) -> bool:
    """True for the pipeline path; exactly one way of naming the model is accepted."""
    if args.pipeline is None:
        if args.model is None:
            raise ValueError("give --model (zoo name or checkpoint) or --pipeline (a diffusers pipeline folder)")
        if args.prompt or args.class_label:
            raise ValueError("--prompt and --class-label apply to --pipeline")
        return False
    if not Path(args.pipeline).is_dir():
        raise ValueError(f"--pipeline {args.pipeline} is not a folder")
    if model_needed and args.model is not None:
        raise ValueError("--pipeline quantizes the pipeline's own transformer; drop --model")
    if args.weights is not None:
        raise ValueError("--weights applies to zoo models, not to --pipeline")
    return True


def _sampling_args(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--samples", type=positive_int, default=samples, help="images per model")
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps (respaced from 1000)")
    p.add_argument("--cfg", type=finite_float, default=1.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                   help="reverse-process sampler of a zoo model (a pipeline samples with its own scheduler)")


def _calib_args(p: argparse.ArgumentParser) -> None:
    from ditq.pipeline import CalibSettings

    default = CalibSettings()
    p.add_argument("--calib-samples", type=positive_int, default=default.samples,
                   help="images sampled to capture calibration inputs")
    p.add_argument("--calib-steps", type=positive_int, default=default.steps,
                   help="DDIM steps of each calibration trajectory")


def _post_training_recipe(source: str):
    """A recipe that a post-training command can apply: trained (QAT) recipes are refused before any work."""
    from ditq.recipes import load_recipe
    from ditq.registry import method_for

    recipe = load_recipe(source)
    try:
        method_for(recipe)
    except ValueError as err:
        raise ValueError(f"recipe {source}: {err}") from None
    return recipe


def _check_zoo_model(model: torch.nn.Module, given: str) -> None:
    """Sampling and scoring drive class-conditional zoo transformers; anything else is refused before them.
    `given` is the flag and value that named the model (`--model q.safetensors`)."""
    from ditq.adapters import ZooAdapter, adapter_for

    if not isinstance(adapter_for(model), ZooAdapter):
        raise ValueError(f"{given} holds a {type(model).__name__}, not a zoo transformer (DiT, Large-DiT, "
                         "TerDiT); diffusers transformers go through --pipeline (ditq quantize, ditq sample)")


# ---- subcommands -----------------------------------------------------------------------------------


def _quantize(args: argparse.Namespace) -> None:
    from ditq import io
    from ditq.bundled import open_model
    from ditq.pipeline import CalibSettings, post_training_quantize
    from ditq.quant.modules import is_quantized

    check_output_file(args.out, "--out", ".safetensors")
    if args.report is not None:
        check_output_file(args.report, "--report", ".json")
    if _check_model_or_pipeline(args, model_needed=True):
        from ditq.integrations.commands import quantize_pipeline

        return quantize_pipeline(args)
    check_steps(args.calib_steps, "ddim", "--calib-steps")
    for flag, source in (("--model", args.model), ("--weights", args.weights)):
        if source is not None and Path(source).resolve() == args.out.resolve():
            raise ValueError(f"--out {args.out} would overwrite the {flag} file; choose another path")
    recipe = _post_training_recipe(args.recipe)
    settings = CalibSettings(samples=args.calib_samples, steps=args.calib_steps, seed=args.seed + 1)
    model, source = open_model(args.model, weights=args.weights, seed=args.seed, device=args.device)
    if is_quantized(model):
        raise ValueError(f"{args.model} is already quantized; quantize starts from a full-precision model")
    print(f"model: {source}")
    result = post_training_quantize(model, recipe, settings=settings, progress=True)
    io.save(result.model, args.out, float_dtype=result.float_dtype)
    on_disk = os.path.getsize(args.out)
    for row in result.layers:
        print(f"{row['layer']:<28} {row['shape']:>10}  W{row['w_bits']} g{row['group_size'] or 'ch':<4} "
              f"weight err {row['weight_rel_err']:.4f}  output err {row['output_rel_err']:.4f}  "
              f"SQNR {row['sqnr_db']:.1f} dB")
    print(f"size: FP16 {result.fp16_size_bytes:,} B → {on_disk:,} B on disk "
          f"({result.fp16_size_bytes / on_disk:.2f}×), floats stored as "
          f"{io.float_storage(result.model, result.float_dtype)}; saved {args.out}")
    if args.report is not None:
        report = {"model": source, "checkpoint": str(args.out), "file_bytes": on_disk, **result.report()}
        write_report(args.report, report, args.out)
        print(f"wrote {args.report}")


def _sample(args: argparse.Namespace) -> None:
    from ditq.bundled import open_model
    from ditq.grid import save_image, tile
    from ditq.sampling import sample

    check_output_file(args.out, "--out", ".png")
    if _check_model_or_pipeline(args, model_needed=False):
        if args.vae is not None:
            raise ValueError("--vae applies to zoo latent DiTs; a pipeline has its own VAE")
        if args.bits is not None and args.model is None:
            raise ValueError("--bits serves a nested --model checkpoint in the pipeline; give one")
        if args.bits_schedule is not None:
            raise ValueError("--bits-schedule applies to --model, not to --pipeline")
        if args.sampler != "ddim":
            raise ValueError(f"--sampler {args.sampler} applies to --model; a --pipeline samples with its own scheduler")
        from ditq.integrations.commands import sample_pipeline

        return sample_pipeline(args)
    check_steps(args.steps, args.sampler, "--steps")
    if args.bits_schedule is not None and args.vae is not None:
        raise ValueError("--bits-schedule applies to pixel-space models, not to latents decoded by --vae")
    if args.bits_schedule is not None and args.bits is not None:
        raise ValueError("--bits and --bits-schedule both choose the served widths; give one")
    schedule = None if args.bits_schedule is None else _bits_schedule(args.bits_schedule)
    model, source = open_model(args.model, weights=args.weights, seed=args.seed, device=args.device, bits=args.bits)
    _check_zoo_model(model, f"--model {args.model}")
    if args.vae is not None:
        from ditq.integrations.commands import check_vae_decodes

        check_vae_decodes(args.vae, {f"--model {args.model}": model})
    elif model.in_channels not in (1, 3):
        raise ValueError(f"--model {args.model} samples {model.in_channels}-channel latents; give --vae (a "
                         "diffusers AutoencoderKL folder) to decode them into images")
    print(f"model: {source}")
    if args.vae is not None:
        from ditq.integrations.commands import sample_latent_dit

        return sample_latent_dit(args, model)
    if schedule is not None:
        print(f"bits schedule: {schedule.average_bits(model, args.steps):.4f} bits per weight on average "
              f"({schedule.average_bits(model, args.steps, 'stored'):.4f} as stored) over "
              f"{args.steps} steps (steps per entry: {schedule.steps_served(args.steps)})")
    labels = torch.arange(args.samples) % model.num_classes
    images = sample(model, labels, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg, seed=args.seed,
                    progress=True, bits_schedule=schedule)
    save_image(tile(images, per_row=min(args.samples, 2 * model.num_classes if model.num_classes <= 16 else 8)),
               args.out)
    print(f"wrote {args.out} ({args.samples} samples, {args.sampler} {args.steps} steps, cfg {args.cfg})")


def _bits_schedule(text: str):
    from ditq.bits_schedule import BitsSchedule

    try:
        return BitsSchedule.read(text) if Path(text).is_file() else BitsSchedule.parse(text)
    except ValueError as err:
        raise ValueError(f"--bits-schedule: {err}") from None


def _eval(args: argparse.Namespace) -> None:
    from ditq import io
    from ditq.atomic import write_json, write_text
    from ditq.bundled import open_model
    from ditq.eval.metrics import check_scored_samples
    from ditq.eval.report import json_scores, render_table
    from ditq.eval.runner import SampleSettings, check_scorable, evaluate
    from ditq.io import model_size_bytes
    from ditq.pipeline import CalibSettings, post_training_quantize
    from ditq.quant.served import nested_layers

    check_output_dir(args.out, "--out", files=("report.json", "report.md"))
    check_scored_samples(args.samples, "--samples")
    check_steps(args.steps, args.sampler, "--steps")
    if args.recipe:
        check_steps(args.calib_steps, "ddim", "--calib-steps")
    imagenet = args.vae is not None or args.inception is not None or args.ref_batch is not None
    if imagenet:
        from ditq.integrations.commands import check_imagenet_args

        check_imagenet_args(args)
    settings = SampleSettings(samples=args.samples, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                              seed=args.seed, batch_size=args.batch_size)
    recipes = {(name.upper() if name.lower() == name else name): _post_training_recipe(name) for name in args.recipe}
    if args.bits is not None and not args.model:
        raise ValueError("--bits serves the --model checkpoints (nested, MatQuant); give one")
    saved = {path: io.load(path, device=args.device) for path in dict.fromkeys(args.model)}
    nested = [path for path, model in saved.items() if nested_layers(model)]
    if args.bits is not None:
        if not nested:
            raise ValueError(f"--bits serves nested (MatQuant) checkpoints; no --model has a nested layer "
                             f"({', '.join(args.model)})")  # fmt: skip
        for path in (p for p in saved if p not in nested):
            print(f"--model {path}: codes stored at the width they serve; scored once, as saved")
    rows = [(path, bits) for path in args.model
            for bits in (args.bits if args.bits is not None and path in nested else [None])]  # fmt: skip
    checkpoints = {_row_name(path, bits): (path, bits) for path, bits in rows}  # path: the argument as given
    names = ["FP", *recipes, *checkpoints]
    if len(set(names)) < len(names) or len(checkpoints) < len(rows):
        raise ValueError(f"two rows would share a name ({', '.join(names)}); rename a --model file")
    loaded = {name: _served(saved[path], path, bits) for name, (path, bits) in checkpoints.items()}
    fp_model, source = open_model(args.fp, weights=args.weights, device=args.device)
    given = {f"--fp {args.fp}": fp_model, **{f"--model {checkpoints[name][0]}": m for name, m in loaded.items()}}
    for what, model in given.items():
        _check_zoo_model(model, what)
    if imagenet:
        from ditq.integrations.commands import check_vae_decodes

        check_vae_decodes(args.vae, given)
    else:
        check_scorable(given, args.samples)
    print(f"FP model: {source}; {len(names)} models to score, reports to {args.out}/ (report.json, report.md)")
    models, sizes = {"FP": fp_model}, {"FP": model_size_bytes(fp_model, torch.float16)}
    calib_settings = CalibSettings(samples=args.calib_samples, steps=args.calib_steps, seed=args.seed + 1)
    calib = None
    for name, recipe in recipes.items():
        print(f"{name}: quantizing the FP model")
        result = post_training_quantize(fp_model, recipe, settings=calib_settings, calib=calib, progress=True)
        calib = result.calib
        models[name], sizes[name] = result.model, result.quant_size_bytes
    for name, (path, bits) in checkpoints.items():  # a served slice: the tensors of its export
        models[name] = loaded[name]
        sizes[name] = os.path.getsize(path) if bits is None else model_size_bytes(loaded[name])
    if imagenet:
        from ditq.integrations.commands import eval_imagenet

        eval_imagenet(args, models, sizes, args.out)
        return
    results, _ = evaluate(models, settings, progress=True, sizes=sizes)
    results["fp_model"] = source
    results["calibration"] = {"samples": calib_settings.samples, "steps": calib_settings.steps,
                              "seed": calib_settings.seed} if recipes else None
    results["device"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    write_json(args.out / "report.json", json_scores(results))
    table = render_table(results)
    write_text(args.out / "report.md", table)
    print(table)
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}")


def _row_name(path: str, bits: int | str | None) -> str:
    """An eval row's name: the checkpoint's stem, and the width or plan it is served at (`nested@4`)."""
    stem = Path(path).stem
    return stem if bits is None else f"{stem}@{Path(str(bits)).stem}"


def _served(model: torch.nn.Module, path: str, bits: int | str | None) -> torch.nn.Module:
    """A loaded checkpoint as saved, or (bits given) a copy serving the slice at `bits`, exported as deployed."""
    from ditq import io
    from ditq.quant.export import export_served

    if bits is None:
        return model
    served = _codes_of_trained(copy.deepcopy(model))
    try:
        io.apply_served_bits(served, io.served_bits_plan(bits))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return export_served(served)


def _codes_of_trained(model: torch.nn.Module) -> torch.nn.Module:
    """`ditq train` saves quantization-aware layers (FakeQuantLinear): packed into codes, as `ditq.convert` does,
    so its checkpoint slices and exports like a converted one."""
    from ditq.qat import convert
    from ditq.quant.fakequant import FakeQuantLinear

    return convert(model) if any(isinstance(m, FakeQuantLinear) for m in model.modules()) else model


def _export(args: argparse.Namespace) -> None:
    from collections import Counter

    from ditq import io
    from ditq.quant.export import export_served
    from ditq.quant.qlinear import QuantLinear

    check_output_file(args.out, "--out", ".safetensors")
    if Path(args.model).resolve() == args.out.resolve():
        raise ValueError(f"--out {args.out} would overwrite the --model file; choose another path")
    model = io.load(args.model, bits=args.bits)
    try:
        export_served(_codes_of_trained(model))
    except ValueError as err:
        raise ValueError(f"--model {args.model}: {err}") from None
    io.save(model, args.out, info={"exported_from": Path(args.model).name})
    widths = Counter(m.spec.w_bits for m in model.modules() if isinstance(m, QuantLinear))
    stored, on_disk = os.path.getsize(args.model), os.path.getsize(args.out)
    print(f"exported {', '.join(f'{n} layer(s) at W{bits}' for bits, n in sorted(widths.items(), reverse=True))}; "
          f"{stored:,} B → {on_disk:,} B on disk ({stored / on_disk:.2f}× smaller); saved {args.out}")


def _bench(args: argparse.Namespace) -> None:
    from ditq.atomic import write_json
    from ditq.bundled import open_model
    from ditq.eval.speed import SpeedSettings, time_forward
    from ditq.io import model_size_bytes
    from ditq.kernels import ALIASES, BACKENDS, prepare_for_inference
    from ditq.models.dit import ConditionalTransformer
    from ditq.quant.modules import is_quantized

    if args.out is not None:
        check_output_file(args.out, "--out", ".json")
    if args.backend not in BACKENDS and args.backend not in ALIASES:
        raise ValueError(f"--backend {args.backend!r} is not one of {sorted([*BACKENDS, *ALIASES])}")
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA --device, got {args.device}")
    dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    settings = SpeedSettings(batch=args.batch, dtype=dtype, compile=args.compile or args.cuda_graphs,
                             cuda_graphs=args.cuda_graphs, repeats=args.repeats, seed=args.seed)  # fmt: skip
    if args.model is None:
        raise ValueError("give --model (zoo name or checkpoint)")
    refs = {"model": (args.model, args.weights)} | ({} if args.fp is None else {"fp": (args.fp, None)})
    opened = {}
    for role, (ref, weights) in refs.items():  # both opened and checked before either is timed
        model, source = open_model(ref, weights=weights, seed=args.seed, device=args.device)
        if not isinstance(model, ConditionalTransformer):
            raise ValueError(f"ditq bench times zoo transformers (DiT, Large-DiT); {source} is a {type(model).__name__}")
        if role == "fp" and is_quantized(model):
            raise ValueError(f"--fp {ref} is a quantized checkpoint; give the full-precision model it came from")
        opened[role] = model, source
    if "fp" in opened:
        fp_config, config = opened["fp"][0].config, opened["model"][0].config
        differ = sorted(k for k in fp_config.keys() | config.keys() if fp_config.get(k) != config.get(k))
        if differ:
            raise ValueError(f"--fp {args.fp} is not the architecture of --model {args.model} (they differ in "
                             f"{', '.join(differ)}); give the full-precision model it came from")
    rows = {}
    for role in reversed(list(opened)):  # the FP model first, as the baseline
        model, source = opened.pop(role)
        model = model.to(getattr(torch, dtype))
        if is_quantized(model):
            prepare_for_inference(model, args.backend, dtype=getattr(torch, dtype))
        backend = f", backend {args.backend}" if is_quantized(model) else ""
        print(f"{role}: {source}{backend}, {dtype}, batch {settings.batch}", flush=True)
        timing = time_forward(model, settings, progress=True)
        rows[role] = {"source": source, "quantized": is_quantized(model), "weight_bytes": model_size_bytes(model),
                      **timing}  # fmt: skip
        del model
    if "fp" in rows:
        rows["model"]["speed_vs_fp"] = rows["fp"]["median_ms"] / rows["model"]["median_ms"]
    for role, row in rows.items():
        ratio = f"  ({row['speed_vs_fp']:.2f}× the FP model's speed)" if "speed_vs_fp" in row else ""
        backend = f", backend {args.backend}" if row["quantized"] else ""
        print(f"{role}: {row['source']}{backend}: {row['median_ms']:.2f} ms per forward (median of {row['repeats']}; "
              f"{row['back_to_back_ms']:.2f} back to back), weights {row['weight_bytes']:,} B{ratio}")
    device = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu"
    if args.out is not None:
        report = {"device": device, "torch": torch.__version__, "backend": args.backend,
                  "settings": dataclasses.asdict(settings), "rows": rows}  # fmt: skip
        write_json(args.out, report)
        print(f"wrote {args.out}")


def _demo(args: argparse.Namespace) -> None:
    from ditq.demo import DEMO_RECIPE, DEMO_SETTINGS, OUTPUT_FILES, run_demo
    from ditq.eval.metrics import check_scored_samples

    check_output_dir(args.out, "--out", files=OUTPUT_FILES)
    check_scored_samples(args.samples, "--samples")
    check_steps(args.steps, "ddim", "--steps")
    settings = dataclasses.replace(DEMO_SETTINGS, samples=args.samples, steps=args.steps)
    recipe = DEMO_RECIPE if args.recipe is None else _post_training_recipe(args.recipe)
    baseline = None if args.baseline.lower() == "none" else _post_training_recipe(args.baseline)
    report = run_demo(args.out, recipe=recipe, baseline=baseline, settings=settings)
    fp = report["fp"]
    print(f"FP:    FID {fp['fid']:.2f}  class acc {fp['class_acc']:.3f}  size {fp['size_bytes']:,} B (16-bit)")
    for key, label in (("baseline", report.get("baseline_label")), ("quant", report["recipe_label"])):
        if key in report:
            q = report[key]
            print(f"{label}: FID {q['fid']:.2f}  class acc {q['class_acc']:.3f}  size {q['size_bytes']:,} B  "
                  f"PSNR vs FP {q['psnr_vs_fp']:.2f} dB")
    print(f"{report['samples']} samples per model, {report['seconds']} s; wrote {args.out}/grid.png, "
          f"report.md, report.json, {report['checkpoint']}")


if __name__ == "__main__":
    raise SystemExit(main())

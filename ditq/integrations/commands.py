"""The bodies of `ditq quantize --pipeline`, `ditq sample --pipeline | --vae` and `ditq eval --vae`.

`ditq.cli` parses and checks the flags and calls these; they hold the diffusers-specific steps so the CLI
module stays one screen of argparse per command.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def pipeline_conditions(args: argparse.Namespace, pipe) -> dict:
    """prompts= or class_labels= for a pipeline call: what the user gave, or a default for its kind."""
    if args.prompt and args.class_label:
        raise ValueError("give --prompt (text pipelines) or --class-label (DiTPipeline), not both")
    is_class_pipe = type(pipe).__name__ == "DiTPipeline"
    if is_class_pipe and args.prompt:
        raise ValueError(f"{type(pipe).__name__} is class-conditional; use --class-label, not --prompt")
    if not is_class_pipe and args.class_label:
        raise ValueError(f"{type(pipe).__name__} takes prompts; use --prompt, not --class-label")
    if is_class_pipe:
        n_classes = int(pipe.transformer.config.num_embeds_ada_norm)
        labels = args.class_label or list(
            range(min(args.calib_samples if hasattr(args, "calib_samples") else args.samples, n_classes))
        )
        bad = [c for c in labels if not 0 <= c < n_classes]
        if bad:
            raise ValueError(f"--class-label {bad} outside 0..{n_classes - 1}")
        return {"class_labels": labels}
    if not args.prompt:
        raise ValueError(f"{type(pipe).__name__} needs at least one --prompt")
    return {"prompts": args.prompt}


def quantize_pipeline(args: argparse.Namespace) -> None:
    """Calibrate on the pipeline's own denoising loop, quantize its transformer, save the transformer."""
    from ditq import io
    from ditq.api import check_plan
    from ditq.integrations.diffusers import calibrate_pipeline, load_pipeline
    from ditq.pipeline import post_training_quantize
    from ditq.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    pipe = load_pipeline(args.pipeline, device=args.device)
    conditions = pipeline_conditions(args, pipe)
    print(
        f"pipeline: {type(pipe).__name__} from {args.pipeline}; transformer {type(pipe.transformer).__name__}"
    )
    check_plan(pipe.transformer, recipe)  # a recipe that cannot apply costs no calibration
    n_conditions = len(next(iter(conditions.values())))
    print(f"calibrating: the pipeline's {args.calib_steps}-step loop on {n_conditions} "
          f"{'prompts' if 'prompts' in conditions else 'class labels'}", flush=True)
    calib = calibrate_pipeline(pipe, steps=args.calib_steps, seed=args.seed + 1, progress=True, **conditions)
    result = post_training_quantize(pipe.transformer, recipe, calib=calib, progress=True)
    io.save(
        result.model,
        args.out,
        float_dtype=result.float_dtype,
        info={"pipeline": str(args.pipeline), "calibration": {**conditions, "steps": args.calib_steps}},
    )
    on_disk = os.path.getsize(args.out)
    print(
        f"{len(result.layers)} layers quantized; size: FP16 {result.fp16_size_bytes:,} B → {on_disk:,} B on disk "
        f"({result.fp16_size_bytes / on_disk:.2f}×), floats stored as "
        f"{io.float_storage(result.model, result.float_dtype)}; saved {args.out}"
    )
    if args.report is not None:
        from ditq.cli_checks import write_report

        report = {
            "pipeline": str(args.pipeline),
            "checkpoint": str(args.out),
            "file_bytes": on_disk,
            **result.report(),
        }
        write_report(args.report, report, args.out)


def sample_pipeline(args: argparse.Namespace) -> None:
    """A grid from the pipeline, its transformer replaced by `--model` (a ditq checkpoint) when given."""
    from ditq import io
    from ditq.grid import save_image, tile
    from ditq.integrations.diffusers import load_pipeline

    header = None if args.model is None else io.read_header(args.model)
    pipe = load_pipeline(args.pipeline, device=args.device)
    if header is not None:
        check_fits_pipeline(header, pipe, args)
        pipe.transformer = io.load(args.model, device=args.device, bits=args.bits).float()
    conditions = pipeline_conditions(args, pipe)
    call = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.cfg,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(args.seed),
    }
    if "class_labels" in conditions:
        labels = conditions["class_labels"]
        call["class_labels"] = [labels[i % len(labels)] for i in range(args.samples)]
    else:
        call["prompt"] = [conditions["prompts"][i % len(conditions["prompts"])] for i in range(args.samples)]
    images = torch.from_numpy(pipe(**call).images).permute(0, 3, 1, 2) * 2 - 1  # (N, 3, H, W) in [-1, 1]
    save_image(tile(images, per_row=min(args.samples, 8)), args.out)
    print(
        f"wrote {args.out} ({args.samples} samples from {args.pipeline}"
        f"{' with ' + str(args.model) if args.model else ''}, {args.steps} steps, guidance {args.cfg})"
    )


def check_fits_pipeline(header: dict, pipe, args: argparse.Namespace) -> None:
    """The checkpoint `--model` must hold the pipeline's own transformer (class and config), or the
    pipeline would fail in its first denoising step, or sample with the wrong network."""
    from ditq.adapters import adapter_for

    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"--pipeline {args.pipeline}: {type(pipe).__name__} has no transformer to replace by "
                         f"--model {args.model}")
    adapter = adapter_for(transformer)
    stored = header.get("model", {})
    if stored.get("arch") != adapter.name:
        raise ValueError(f"--model {args.model} holds a {stored.get('arch')!r} model; the {type(pipe).__name__} in "
                         f"{args.pipeline} runs a {type(transformer).__name__} ({adapter.name!r})")
    mine, theirs = stored.get("config") or {}, adapter.config(transformer) or {}
    differ = sorted(k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
    if differ:
        fields = ", ".join(f"{k}={mine[k]!r} (pipeline: {theirs[k]!r})" for k in differ)
        raise ValueError(f"--model {args.model} holds another {type(transformer).__name__} than the one in "
                         f"{args.pipeline}: {fields}")


def check_vae_decodes(folder: str, models: dict) -> None:
    """Each model (keyed by the flag that named it) must make latents with the channels the `--vae` folder's
    decoder reads; checked before any sample is drawn."""
    from ditq.eval.imagenet import vae_latent_channels

    channels = vae_latent_channels(folder)
    for given, model in models.items():
        if model.in_channels != channels:
            raise ValueError(f"--vae {folder} decodes {channels}-channel latents; {given} makes "
                             f"{model.in_channels}-channel samples")


def check_imagenet_args(args: argparse.Namespace) -> None:
    """`ditq eval` ImageNet flags: all three given, the files there, enough samples for every torchrun rank."""
    given = {"--vae": args.vae, "--inception": args.inception, "--ref-batch": args.ref_batch}
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise ValueError(f"the ImageNet protocol needs --vae, --inception and --ref-batch; {' and '.join(missing)} "
                         "missing")
    for flag in ("--inception", "--ref-batch"):
        if not Path(given[flag]).is_file():
            raise ValueError(f"{flag} {given[flag]} is not a file")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if args.samples < world:
        raise ValueError(f"--samples {args.samples} cannot be shared by {world} ranks; ask for at least {world}")


def sample_latent_dit(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """A zoo latent DiT (DiT-XL/2) sampled as the official sampler does, decoded by the `--vae` folder."""
    from ditq.eval.imagenet import load_vae, sample_decoded
    from ditq.eval.runner import SampleSettings
    from ditq.grid import save_image, tile

    vae = load_vae(args.vae, device=args.device)
    settings = SampleSettings(
        samples=args.samples,
        steps=args.steps,
        cfg_scale=args.cfg,
        sampler=args.sampler,
        seed=args.seed,
        batch_size=min(args.samples, 32),
    )
    images = sample_decoded(model, vae, settings, range(args.samples), progress=True)  # (N, H, W, 3) uint8
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image(tile(images, per_row=min(args.samples, 8), scale=1), args.out)
    print(
        f"wrote {args.out} ({args.samples} samples, {args.sampler} {args.steps} steps, cfg {args.cfg} on "
        f"3 latent channels, decoded by {args.vae})"
    )


def eval_imagenet(args: argparse.Namespace, models: dict, sizes: dict, out: Path) -> dict:
    """`ditq eval --vae --inception --ref-batch`: the ADM protocol, data-parallel under torchrun."""
    from ditq.atomic import write_json, write_text
    from ditq.eval.imagenet import evaluate_imagenet, load_vae
    from ditq.eval.inception import load_inception, load_reference_stats
    from ditq.eval.report import json_scores
    from ditq.eval.runner import SampleSettings
    from ditq.training.distributed import setup_distributed

    env = setup_distributed(args.device)
    try:
        settings = SampleSettings(
            samples=args.samples,
            steps=args.steps,
            cfg_scale=args.cfg,
            sampler=args.sampler,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        reference = load_reference_stats(args.ref_batch)
        vae = load_vae(args.vae, device=env.device)
        inception = load_inception(args.inception, device=env.device)
        models = {name: m.to(env.device) for name, m in models.items()}
        results = evaluate_imagenet(
            models,
            settings,
            vae=vae,
            inception=inception,
            reference=reference,
            env=env,
            sizes=sizes,
            progress=True,
        )
        if env.is_main:
            write_json(out / "report.json", json_scores(results))
            lines = ["| model | FID | sFID | IS | precision | recall |", "|---|---|---|---|---|---|"]
            for name in models:
                r = results[name]
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        f"{r[k]:.3f}" if k in r else "–" for k in ("fid", "sfid", "is", "precision", "recall")
                    )
                    + " |"
                )
            table = "\n".join(lines) + "\n"
            write_text(out / "report.md", table)
            print(table)
        env.barrier()
        return results
    finally:
        if env.owns_group:
            torch.distributed.destroy_process_group()

"""Train a DiT (the bundled DiT-MNIST by default): ``python -m ditq.train`` or ``ditq train``.

Single device::

    python -m ditq.train --steps 20000 --batch-size 256 --lr 3e-4 --out runs/dit-mnist

Several GPUs of one host (DDP; the batch is split over ranks)::

    torchrun --nproc_per_node 4 -m ditq.train --steps 20000 --batch-size 1024 --out runs/dit-mnist

Quantization-aware training (a QAT recipe: a preset name, inline JSON or a JSON/YAML file), here TerDiT
(ternary weights, the adaLN RMSNorm, a large lr dropped late) fine-tuned from the bundled weights::

    python -m ditq.train --recipe terdit --set adaln_norm=true --init-from DiT-MNIST --lr 5e-4 \
        --lr-schedule step --lr-decay-step 1500 --steps 2000 --out runs/dit-mnist-terdit

MatQuant (one int8 checkpoint served at 8, 4 or 2 bits, trained on the λ-weighted sum of the three losses),
distilled from the bundled model::

    python -m ditq.train --recipe matquant --init-from DiT-MNIST --loss distill --teacher DiT-MNIST \
        --steps 2000 --out runs/dit-mnist-matquant

The run writes ``log.jsonl``, ``checkpoints/last.safetensors`` (continue with ``--resume``) and
``ema.safetensors``, the fp32 EMA weights with the model's arch and config in their header (a QAT run's
are the prepared model: ``ditq.load`` it, then ``ditq.qat.convert`` packs it). Ctrl-C (or the
``--time-limit``) finishes the step, writes the checkpoint and prints the command that resumes the run (exit
code 130).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditq.atomic import check_output_file
from ditq.checks import did_you_mean
from ditq.cli_checks import (
    HelpFormatter,
    OneLineParser,
    device_arg,
    rerun_command,
    run_command,
)
from ditq.recipes import PRESETS, load_recipe
from ditq.training.checkpoint import export_fp16, read_weights
from ditq.training.config import LOSSES, LR_SCHEDULES, MIXED_PRECISION, TrainConfig
from ditq.training.data import DATA_SOURCES
from ditq.training.interrupt import TrainingInterrupted
from ditq.training.loop import train

__all__ = ["TrainConfig", "train", "export_fp16", "read_weights", "main", "build_parser"]

PROG = "ditq train"

# flag dest → TrainConfig field (only flags the user gave are passed, so defaults live in TrainConfig)
_FIELDS = {
    "model": "model", "data_dir": "data_dir", "out": "out_dir", "steps": "steps",
    "batch_size": "global_batch_size", "lr": "lr", "lr_schedule": "lr_schedule", "min_lr": "min_lr",
    "lr_decay_step": "lr_decay_step", "lr_decay_factor": "lr_decay_factor",
    "warmup_steps": "warmup_steps", "weight_decay": "weight_decay", "betas": "betas",
    "ema_decay": "ema_decay", "num_timesteps": "num_timesteps", "mixed_precision": "mixed_precision",
    "seed": "seed", "device": "device", "log_every": "log_every", "ckpt_every": "ckpt_every",
    "data": "data", "loss": "loss", "teacher": "teacher", "teacher_steps": "teacher_steps",
    "init_from": "init_from", "time_limit": "time_limit_s",
}  # fmt: skip


def _parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` → (key, value); the value is read as JSON (2, 0.5, true) or else kept a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    python_words = {"True": True, "False": False, "None": None}
    if raw in python_words:
        return key, python_words[raw]
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _parse_recipe(text: str) -> dict[str, Any]:
    """``--recipe``: a preset name, an inline JSON object, or a JSON/YAML recipe file, as plain data."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"--recipe is not valid JSON: {err}") from err
        return data
    try:
        return load_recipe(text).to_dict()
    except FileNotFoundError as err:
        raise argparse.ArgumentTypeError(f"{err}{did_you_mean(text, PRESETS)}") from err
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ditq train`` (also ``python -m ditq.train``); errors are one line."""
    p = OneLineParser(
        prog=PROG,
        description="Train a class-conditional DiT on MNIST, in full precision or quantization-aware (a QAT\n"
        "recipe such as TerDiT). Writes log.jsonl, checkpoints/last.safetensors and ema.safetensors into --out.",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("--model", help="zoo name (default DiT-MNIST)")
    a(
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="model constructor override, repeatable, e.g. --set depth=2 --set hidden_size=64",
    )
    a("--data", choices=sorted(DATA_SOURCES), help="data source (default mnist)")
    a("--data-dir", help="the data source's folder (default: MNIST's copy bundled with ditq)")
    a(
        "--recipe",
        type=_parse_recipe,
        help="QAT recipe: a preset (terdit, terdit-a8, matquant), inline JSON or a JSON/YAML file (default: FP "
        "training)",
    )
    a("--loss", choices=LOSSES, help="diffusion (default) or distill (needs --teacher)")
    a("--teacher", help="distill: zoo name with bundled weights or ditq checkpoint of the FP teacher")
    a("--teacher-steps", type=int, help="distill: DDIM steps of the teacher trajectories (default 25)")
    a("--init-from", help="start from these weights: zoo name with bundled weights or ditq checkpoint")
    a("--out", help="output folder (default runs/dit-mnist)")
    a("--steps", type=int, help="optimizer steps (default 10000)")
    a("--batch-size", type=int, help="global batch size over all ranks (default 256)")
    a("--lr", type=float, help="peak learning rate (default 1e-4, as DiT)")
    a("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up (default constant)")
    a("--min-lr", type=float, help="final lr of the cosine schedule (default 0)")
    a("--lr-decay-step", type=int, help="step schedule: the 0-based step the lr drops at")
    a("--lr-decay-factor", type=float, help="step schedule: lr multiplier from --lr-decay-step on (default 0.1)")
    a("--warmup-steps", type=int, help="linear lr warm-up steps (default 0)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    a("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="AdamW betas (default 0.9 0.999)")
    a("--grad-clip", type=float, help="max gradient norm; 0 disables clipping (default 1.0)")
    a("--ema-decay", type=float, help="EMA decay (default 0.9999)")
    a("--no-ema-warmup", action="store_true", help="use the EMA decay from step 1 (DiT's behaviour)")
    a("--num-timesteps", type=int, help="diffusion steps T (default 1000)")
    a("--mixed-precision", choices=MIXED_PRECISION, help="auto = bf16 autocast on CUDA, fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    a("--hflip", action="store_true", help="random horizontal flips (never for digits)")
    a("--seed", type=int, help="run seed (default 0)")
    a("--device", type=device_arg, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    a("--log-every", type=int, help="steps between log.jsonl lines (default 100)")
    a(
        "--ckpt-every",
        type=int,
        help="steps between checkpoints (default 1000; one is always written at the end)",
    )
    a("--resume", action="store_true", help="continue from OUT/checkpoints/last.safetensors if it exists")
    a(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop after the step that passes this many seconds, checkpoint written (continue with --resume)",
    )
    a("--no-progress", action="store_true", help="no progress bar")
    a("--export-fp16", metavar="PATH", help="also write the fp16 copy of the EMA weights to PATH")
    a("--debug", action="store_true", help="show the full traceback of an error")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags; flags left out keep TrainConfig's defaults."""
    kwargs: dict[str, Any] = {
        field: getattr(args, dest) for dest, field in _FIELDS.items() if getattr(args, dest) is not None
    }
    if args.overrides:
        kwargs["model_overrides"] = dict(args.overrides)
    if args.recipe is not None:
        kwargs["recipe"] = args.recipe
    if args.grad_clip is not None:
        kwargs["grad_clip"] = None if args.grad_clip == 0 else args.grad_clip
    kwargs.update(
        ema_warmup=not args.no_ema_warmup, compile=args.compile, hflip=args.hflip,
        resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    return TrainConfig(**kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, optionally export fp16; returns the exit code (2: bad input, 130: Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(build_parser(), argv, lambda args: _run(args, argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = config_from_args(args)
    if args.export_fp16:
        check_output_file(Path(args.export_fp16), "--export-fp16", ".safetensors")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        ema_path = train(cfg)
    except TrainingInterrupted as stop:
        resume_argv = argv if "--resume" in argv else [*argv, "--resume"]
        if rank == 0:
            print(f"{PROG}: {stop.reason} after step {stop.step} of {cfg.steps}; checkpoint {stop.checkpoint}; "
                  f"resume with: {rerun_command('train', resume_argv)}", file=sys.stderr)  # fmt: skip
        return 130
    if args.export_fp16 and rank == 0:
        export_fp16(ema_path, args.export_fp16)
        logging.getLogger("ditq.train").info("fp16 weights written to %s", args.export_fp16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

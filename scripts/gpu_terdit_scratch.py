"""TerDiT from scratch: ternary DiT-MNIST trained to the FP model's budget, with and without the adaLN
RMSNorm, and the scaling claim (the ternary-vs-FP gap at a 3.3× larger model, DiT-S's width and depth).
Supersedes the from-scratch rows of `scripts/gpu_terdit.py` (2,000 steps); its fine-tuned rows stay there.

Each call trains the runs it names side by side (one process each, spread over the GPUs there are), until they
finish or --deadline seconds after the call began, then evaluates every run it trained at the step reached: the
ternary runs through their packed 2-bit export reloaded from disk (`export_packed`, the deployment path). A run
cut at the deadline resumes bit-exactly in the next call if its folder --out/runs/NAME (its training state) is
still there:

    PYTHONPATH=. python scripts/gpu_terdit_scratch.py --out runs/terdit-scratch --runs ternary --deadline 520
    PYTHONPATH=. python scripts/gpu_terdit_scratch.py --out runs/terdit-scratch --stage report   # table, curves
    PYTHONPATH=. python scripts/gpu_terdit_scratch.py --out /tmp/ts --device cpu --tiny --runs ternary fp  # smoke

Between calls, --out's results.json (the rows) and runs/*/log.jsonl (the curves) are all the report needs; a
run's training state, runs/NAME/checkpoints/, only continues a cut run. It is 16 bytes per parameter (fp32
latent weights, EMA, AdamW's two moments): 156 MB for DiT-MNIST, 520 MB for the S-sized model; where that
cannot be kept between calls, a run must finish in one (a cut run's row says how far it got).

Runs (--runs; a --tag suffix keeps ablations apart, e.g. `--runs ternary --lr 1e-3 --tag lr1e-3`):
  ternary, ternary-rmsnorm        DiT-MNIST (9.8M parameters), 15,000 steps at batch 1,024: the FP model's budget
  fp                              DiT-MNIST in FP, the bundled model's recipe (the budget-matched FP reference)
  s-fp, s-ternary, s-ternary-rmsnorm   DiT-MNIST at DiT-S's hidden 384 / depth 12 / 6 heads (32.5M
                                  parameters), 4,000 steps at batch 1,024 by default

The S budget: 4,000 steps × 1,024 images is 27% of the FP DiT-MNIST run's images (15,000 × 1,024). On the CPU
(one thread, batch 32) a training step of the S model takes 3.0× DiT-MNIST's, FP and ternary alike (a ternary
step 1.07× an FP one); its matmuls hold 3.4× the weights. Assumed: ~30 ms per DiT-MNIST ternary step on one
H100 (the bundled FP run: 15,000 steps in 424 s compiled, ×1.07), so ~100 ms per S step: 4,000 steps ≈ 400 s,
one call per run. Compare the S rows with `fp` and `ternary` run at --steps 4000 (the same images), not with the
15,000-step rows.

Recipes: FP runs use the bundled model's (lr 3e-4 constant, 500 warm-up steps, EMA 0.9995); ternary runs
TerDiT's (`terdit` preset, lr 5e-4 ×0.1 at 75% of the steps) with the same warm-up and EMA. Ablations are
flags, not edits: --lr, --lr-schedule, --lr-drop-at, --weight-decay (of the latent weights) and --fixed-scale
(α = γ) for the ternary runs, --warmup and --ema-decay for every run. FID ± is half the spread over the seeds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import ditq
from ditq.atomic import write_json, write_text
from ditq.bundled import bundled_path
from ditq.eval.features import load_feature_net, load_real_stats
from ditq.eval.report import json_scores
from ditq.eval.runner import SampleSettings, draw, score
from ditq.fileformat import header_field, read_header
from ditq.io import model_size_bytes
from ditq.methods.terdit import TERDIT, export_packed
from ditq.train import TrainConfig, train
from ditq.training.checkpoint import load_train_state
from ditq.training.interrupt import TrainingInterrupted
from ditq.training.loop import CHECKPOINT_NAME, LOG_NAME, build_model

STAGES = ("train", "eval", "report")
FP_STEPS, FP_BATCH = 15_000, 1024  # the bundled DiT-MNIST's training run
BUNDLED_LOG = Path(__file__).resolve().parents[1] / "docs" / "training" / "train_log.jsonl"  # its curve
SHAPES = {"mnist": {}, "s": dict(hidden_size=384, depth=12, num_heads=6)}
TINY_SHAPES = {"mnist": dict(depth=2, hidden_size=64, num_heads=2, patch_size=8),
               "s": dict(depth=3, hidden_size=96, num_heads=3, patch_size=8)}  # fmt: skip
# these settings may change between the calls of one run; any other change makes it another run
PER_CALL = ("time_limit_s", "resume", "device", "progress", "compile")


@dataclass(frozen=True)
class RunSpec:
    shape: str  # a key of SHAPES
    ternary: bool
    rmsnorm: bool
    steps: int  # default budget


RUNS = {
    "ternary": RunSpec("mnist", True, False, FP_STEPS),
    "ternary-rmsnorm": RunSpec("mnist", True, True, FP_STEPS),
    "fp": RunSpec("mnist", False, False, FP_STEPS),
    "s-fp": RunSpec("s", False, False, 4000),
    "s-ternary": RunSpec("s", True, False, 4000),
    "s-ternary-rmsnorm": RunSpec("s", True, True, 4000),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs, the rows and the report")
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    p.add_argument(
        "--runs", nargs="+", choices=sorted(RUNS), default=[], help="runs this call trains and scores"
    )
    p.add_argument("--tag", default="", help="suffix of the runs' names (ablations)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, few steps and samples")
    p.add_argument(
        "--deadline",
        type=float,
        default=520.0,
        help="seconds after the call began at which training stops, checkpoint written (scoring follows: "
        "a call lasts about a minute longer)",
    )
    p.add_argument(
        "--steps", type=int, help="optimizer steps of every run named (default: each run's budget)"
    )
    p.add_argument("--batch", type=int, default=FP_BATCH)
    p.add_argument("--lr", type=float, default=5e-4, help="ternary runs: peak lr")
    p.add_argument(
        "--lr-schedule",
        choices=("step", "cosine", "constant"),
        default="step",
        help="ternary runs: after warm-up (step: ×0.1 at --lr-drop-at)",
    )
    p.add_argument("--lr-drop-at", type=float, default=0.75, help="step schedule: fraction of the steps")
    p.add_argument("--warmup", type=int, default=500, help="linear lr warm-up steps (all runs)")
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="ternary runs: AdamW decay of latent weights"
    )
    p.add_argument("--fixed-scale", action="store_true", help="ternary runs: α = γ = mean|W|, not learned")
    p.add_argument("--ema-decay", type=float, default=0.9995, help="all runs")
    p.add_argument("--samples", type=int, default=1000, help="images per row and seed")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="train eagerly")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.warmup, args.samples, args.sample_steps = 16, 2, 20, 4
        args.steps = 6 if args.steps is None else args.steps
    args.started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        configs = {
            name + (f"-{args.tag}" if args.tag else ""): (name, train_config(name, args))
            for name in args.runs
        }
    except (ValueError, TypeError) as err:
        refuse(str(err))
    check_runs(configs, args)  # before any work
    for stage in STAGES if args.stage == "all" else (args.stage,):
        began = time.monotonic()
        {"train": stage_train, "eval": stage_eval, "report": stage_report}[stage](configs, args)
        print(f"stage {stage}: {time.monotonic() - began:.0f} s", flush=True)


# ---- runs ------------------------------------------------------------------------------------------------


def train_config(name: str, args: argparse.Namespace) -> TrainConfig:
    spec = RUNS[name]
    steps = spec.steps if args.steps is None else args.steps
    shape = (TINY_SHAPES if args.tiny else SHAPES)[spec.shape] | (
        {"adaln_norm": True} if spec.rmsnorm else {}
    )
    if spec.ternary:
        recipe = replace(TERDIT, learnable_scale=not args.fixed_scale).to_dict()
        schedule = dict(lr=args.lr, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
                        lr_decay_step=max(args.warmup, 1, int(args.lr_drop_at * steps))
                        if args.lr_schedule == "step" else None)  # fmt: skip
    else:
        recipe, schedule = None, dict(lr=3e-4, lr_schedule="constant")
    label = name + (f"-{args.tag}" if args.tag else "")
    return TrainConfig(
        model="DiT-MNIST", model_overrides=shape, recipe=recipe, out_dir=str(args.out / "runs" / label),
        steps=steps, global_batch_size=args.batch, warmup_steps=min(args.warmup, steps - 1),
        ema_decay=args.ema_decay, seed=0, device=args.device, log_every=max(1, min(100, steps // 50)),
        ckpt_every=steps, resume=True, progress=False, compile=args.compile, **schedule,
    )  # fmt: skip


def check_runs(configs: dict[str, tuple[str, TrainConfig]], args: argparse.Namespace) -> None:
    """Refuse, in one line each, a run whose settings differ from its saved ones, or whose earlier call stopped
    short and left no training state here to continue from."""
    rows = read_report(args)["rows"]
    for label, (_, cfg) in configs.items():
        folder = Path(cfg.out_dir)
        saved_path = folder / "config.json"
        if saved_path.exists():
            saved = TrainConfig.from_dict(json.loads(saved_path.read_text())).to_dict()
            saved = {k: v for k, v in saved.items() if k not in PER_CALL}
            new = {k: v for k, v in cfg.to_dict().items() if k not in PER_CALL}
            changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in new.items() if saved.get(k) != v]
            if changed:
                refuse(
                    f"run {label} was started with other settings ({'; '.join(changed)}): pass another --tag"
                )
        row = rows.get(label)
        if row and row["steps_done"] < row["steps"] and not (folder / CHECKPOINT_NAME).exists():
            refuse(f"run {label} stopped at step {row['steps_done']} of {row['steps']} and its training state "
                   f"({folder / CHECKPOINT_NAME}) is not here: pass another --tag to train it again")  # fmt: skip


def refuse(message: str) -> None:
    """Bad input: one line, exit status 2, before any work."""
    print(f"gpu_terdit_scratch: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_one(cfg: TrainConfig) -> str:
    """Train one run as far as its time limit allows; a line saying how far it got."""
    began = time.monotonic()
    try:
        train(cfg)
        how = "finished"
    except TrainingInterrupted as stop:
        how = stop.reason
    step = checkpoint_step(cfg)
    return f"{Path(cfg.out_dir).name}: step {step} of {cfg.steps}, {how} ({time.monotonic() - began:.0f} s)"


def stage_train(configs: dict[str, tuple[str, TrainConfig]], args: argparse.Namespace) -> None:
    left = args.deadline - (time.monotonic() - args.started)  # a call makes at least one step
    rows = read_report(args)["rows"]
    todo = [
        replace(cfg, time_limit_s=max(left, 1e-3))
        for label, (_, cfg) in configs.items()
        if max(checkpoint_step(cfg), rows.get(label, {}).get("steps_done", 0)) < cfg.steps
    ]  # a finished run's row stands where its training state was not kept
    if not todo:
        return
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0  # runs spread over the GPUs there are
    todo = [replace(cfg, device=f"cuda:{i % gpus}") if gpus > 1 else cfg for i, cfg in enumerate(todo)]
    with ProcessPoolExecutor(len(todo), mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in pool.map(run_one, todo):
            print(line, flush=True)


def checkpoint_step(cfg: TrainConfig) -> int:
    """The step of the run's last checkpoint, 0 without one (read from its header alone)."""
    path = Path(cfg.out_dir) / CHECKPOINT_NAME
    return header_field(path, read_header(path, kind="train_state"), "step", int) if path.exists() else 0


# ---- scores ----------------------------------------------------------------------------------------------


def deployed(
    label: str, cfg: TrainConfig, ema: dict[str, torch.Tensor], args: argparse.Namespace
) -> tuple[nn.Module, int]:
    """(the run's EMA weights as deployed, its file's bytes): ternary runs packed to 2 bits and reloaded (the
    deployment path), FP runs sized in fp16."""
    model = build_model(replace(cfg, device="cpu"), torch.device("cpu"))
    model.load_state_dict(ema)
    if cfg.recipe is None:
        return model.eval().to(args.device), model_size_bytes(model, torch.float16)
    path = export_packed(model, args.out / "models" / f"{label}.safetensors")
    packed = ditq.load(path, device=args.device)
    ditq.prepare_for_inference(packed, backend="dequantized")
    return packed, path.stat().st_size


def scores(model: nn.Module, args: argparse.Namespace) -> dict:
    net, real = load_feature_net(), load_real_stats()
    fids, accs = [], []
    for seed in range(args.seeds):
        settings = SampleSettings(samples=args.samples, steps=args.sample_steps, seed=seed,
                                  batch_size=min(args.samples, 500))  # fmt: skip
        found = score(draw(model, settings)[0], settings.labels(model.num_classes), net, real)
        fids.append(found["fid"])
        accs.append(found["class_acc"])
    return {"fids": fids, "fid_mean": statistics.mean(fids), "fid_half_spread": (max(fids) - min(fids)) / 2,
            "class_acc": statistics.mean(accs)}  # fmt: skip


def stage_eval(configs: dict[str, tuple[str, TrainConfig]], args: argparse.Namespace) -> None:
    """Score the bundled FP model once, then every run of this call at its last checkpoint."""
    report = read_report(args)
    if "fp-bundled" not in report["rows"]:
        fp = ditq.load(bundled_path("DiT-MNIST"), device=args.device).float().eval()
        report["rows"]["fp-bundled"] = {
            "shape": "mnist", "ternary": False, "rmsnorm": False, "params": sum(p.numel() for p in fp.parameters()), "steps": FP_STEPS,
            "steps_done": FP_STEPS, "batch": FP_BATCH, "file_bytes": bundled_path("DiT-MNIST").stat().st_size,
        } | scores(fp, args)  # fmt: skip
        write_report(args, report)
    for label, (name, cfg) in configs.items():
        path = Path(cfg.out_dir) / CHECKPOINT_NAME
        if not path.exists():
            continue
        state = load_train_state(path)
        if report["rows"].get(label, {}).get("steps_done") == state.step:
            continue
        model, file_bytes = deployed(label, cfg, state.ema, args)
        spec = RUNS[name]
        report["rows"][label] = {
            "shape": spec.shape, "ternary": spec.ternary, "rmsnorm": spec.rmsnorm,
            "params": sum(v.numel() for k, v in state.model.items() if not k.endswith(".scale")),
            "steps": cfg.steps, "steps_done": state.step, "batch": cfg.global_batch_size, "file_bytes": file_bytes,
            "train": {k: cfg.to_dict()[k] for k in ("lr", "lr_schedule", "lr_decay_step", "warmup_steps",
                                                     "weight_decay", "ema_decay", "recipe")},
        } | scores(model, args)  # fmt: skip
        write_report(args, report)
        print(f"{label}: step {state.step}, FID {report['rows'][label]['fid_mean']:.2f}", flush=True)


# ---- the report ------------------------------------------------------------------------------------------


def read_report(args: argparse.Namespace) -> dict:
    path = args.out / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"sample_settings": {"samples": args.samples, "steps": args.sample_steps, "seeds": args.seeds,
                                "cfg_scale": SampleSettings().cfg_scale}, "rows": {}}  # fmt: skip


def write_report(args: argparse.Namespace, report: dict) -> None:
    write_json(args.out / "results.json", json_scores(report), indent=1)
    write_text(args.out / "results.md", markdown(report))


def loss_curve(args: argparse.Namespace, label: str) -> list[tuple[int, float]]:
    path = BUNDLED_LOG if label == "fp-bundled" else args.out / "runs" / label / LOG_NAME
    if not path.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def stage_report(configs: dict[str, tuple[str, TrainConfig]], args: argparse.Namespace) -> None:
    report = read_report(args)
    write_report(args, report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss_curves.png")
        return
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(11, 3.8))
    for ax, shape in zip(axes, SHAPES, strict=True):
        for label, row in report["rows"].items():
            curve = loss_curve(args, label)
            if row["shape"] == shape and curve:
                ax.plot(*zip(*curve, strict=True), label=label, linewidth=1)
        ax.set(title=f"{'DiT-MNIST' if shape == 'mnist' else 'DiT-MNIST at DiT-S size'}: training loss",
               xlabel="step", ylabel="loss", yscale="log")  # fmt: skip
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "loss_curves.png", dpi=110)
    print(markdown(report))


def markdown(report: dict) -> str:
    s = report["sample_settings"]
    lines = [
        f"# TerDiT from scratch ({s['samples']} samples x {s['seeds']} seeds, DDIM {s['steps']}, cfg {s['cfg_scale']})",
        "",
        "images: steps × batch as a fraction of the bundled FP model's 15,000 × 1,024; ternary rows sample the "
        "packed 2-bit file reloaded.",
        "",
        "| run | parameters | weights | adaLN RMSNorm | steps | images | FID ± | class acc | file MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in report["rows"].items():
        steps = f"{r['steps_done']:,}" + ("" if r["steps_done"] >= r["steps"] else f" of {r['steps']:,}")
        lines.append(
            f"| {label} | {r['params'] / 1e6:.1f}M | {'ternary' if r['ternary'] else 'FP16'} | "
            f"{'yes' if r['rmsnorm'] else 'no'} | {steps} | {r['steps_done'] * r['batch'] / (FP_STEPS * FP_BATCH):.2f} | "
            f"{r['fid_mean']:.2f} ± {r['fid_half_spread']:.2f} | {r['class_acc']:.3f} | {r['file_bytes'] / 2**20:.2f} |"
        )  # fmt: skip
    return "\n".join(lines + gaps(report["rows"])) + "\n"


def gaps(rows: dict) -> list[str]:
    """The scaling claim's numbers: ternary FID − FP FID for each model size trained on the same images."""
    found = []
    for t_label, t in rows.items():
        for f_label, f in rows.items():
            same = all(t[k] == f[k] for k in ("shape", "steps_done", "batch"))
            if t["ternary"] and not f["ternary"] and same:
                found.append(f"- {t_label} − {f_label} ({t['params'] / 1e6:.1f}M parameters, "
                             f"{t['steps_done']:,} steps): FID {t['fid_mean'] - f['fid_mean']:+.2f}")  # fmt: skip
    return ["", "Ternary − FP at equal images:", *found] if found else []


if __name__ == "__main__":
    main()

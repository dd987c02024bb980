"""TerDiT on DiT-MNIST: ternary QAT from scratch and fine-tuned from the bundled FP model, each with and
without the adaLN RMSNorm; loss curves, FID (seed spread), class accuracy and sizes next to the FP model
and post-training ternary (absmean, no training).

    PYTHONPATH=. python scripts/gpu_terdit.py --out $OUT            # one H100, ≤ 10 minutes
    PYTHONPATH=. python scripts/gpu_terdit.py --out /tmp/t --tiny   # CPU smoke test (seconds)

Step budget: the FP model trained 15k steps at batch 1024 (~38 steps/s compiled). A QAT step on this
small model is bound by launches, not by the GPU, so the four variants train side by side in four processes,
each compiled (fullgraph: the fake quantizers trace cleanly). The paper's schedule is kept: lr 5e-4, dropped
×0.1 at 75% of the steps. A from-scratch run sees a fraction of the FP run's images, so its rows show the
trend, not a converged model: `scripts/gpu_terdit_scratch.py` trains them to the FP run's budget and
supersedes them.

Writes results.json, results.md and loss_curves.png (when matplotlib is importable) under --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import ditq
from ditq.atomic import write_json, write_text
from ditq.bundled import bundled_path
from ditq.eval.report import json_scores
from ditq.eval.runner import SampleSettings, evaluate
from ditq.io import model_size_bytes
from ditq.methods.terdit import TERDIT, export_packed
from ditq.models import create
from ditq.qat import QAT, convert, prepare
from ditq.train import TrainConfig, train

TINY = dict(depth=2, hidden_size=64, num_heads=2, patch_size=8)


def run_qat(name: str, args: argparse.Namespace, rmsnorm: bool, init_from: str | None, steps: int) -> Path:
    """One `ditq train --recipe terdit` run; returns its folder."""
    overrides = (dict(TINY) if args.tiny else {}) | ({"adaln_norm": True} if rmsnorm else {})
    cfg = TrainConfig(
        model="DiT-MNIST", model_overrides=overrides, recipe=TERDIT.to_dict(), init_from=init_from,
        out_dir=str(args.work / name), steps=steps, global_batch_size=args.batch, lr=args.lr,
        lr_schedule="step", lr_decay_step=int(0.75 * steps), lr_decay_factor=0.1,
        warmup_steps=min(50, steps // 4), seed=0, device=args.device, log_every=max(1, steps // 50),
        ckpt_every=steps, progress=False, compile=args.compile,
    )  # fmt: skip
    start = time.perf_counter()
    train(cfg)
    print(f"{name}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return args.work / name


def packed(run: Path, args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """The run's EMA weights exported as 2-bit codes + scales (FP parts in fp16), reloaded: the deployment path."""
    model = ditq.load(run / "ema.safetensors")
    path = export_packed(model, run / "packed.safetensors", float_dtype=torch.float16)
    return ditq.load(path, device=args.device), path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few steps and samples")
    p.add_argument("--scratch-steps", type=int, default=2000)
    p.add_argument("--finetune-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="train eagerly")
    args = p.parse_args()
    if args.tiny:
        args.scratch_steps, args.finetune_steps, args.batch = 4, 3, 16
        args.samples, args.sample_steps, args.seeds = 20, 4, 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.out / "runs" if args.tiny else Path("runs/terdit")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    fp = ditq.load(bundled_path("DiT-MNIST"), device=args.device).float().eval()
    fp16_file = bundled_path("DiT-MNIST").stat().st_size
    if args.tiny:  # the bundled weights do not fit the tiny shape: fine-tune from a random tiny FP model
        torch.manual_seed(0)
        fp = create("DiT-MNIST", **TINY).to(args.device).eval()
        fp16_file = ditq.save(fp, args.work / "fp16.safetensors", float_dtype=torch.float16).stat().st_size
    init = str(ditq.save(fp, args.work / "fp32.safetensors"))

    variants = {
        "qat-scratch": (False, None, args.scratch_steps),
        "qat-scratch-rmsnorm": (True, None, args.scratch_steps),
        "qat-finetune": (False, init, args.finetune_steps),
        "qat-finetune-rmsnorm": (True, init, args.finetune_steps),
    }
    with ProcessPoolExecutor(len(variants), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(run_qat, name, args, *variant) for name, variant in variants.items()}
        runs = {name: job.result() for name, job in jobs.items()}
    train_s = time.perf_counter() - t0

    # Post-training ternary: the same layers, absmean γ per (q, k, v) part, no training.
    ptq = prepare(ditq.load(init, device=args.device), QAT(w_format="ternary", w_bits=2, skip=TERDIT.skip))
    ptq_file = (
        ditq.save(convert(ptq), args.work / "ptq.safetensors", float_dtype=torch.float16).stat().st_size
    )
    models = {"fp": fp, "ptq-ternary": ptq}
    files = {"fp": fp16_file, "ptq-ternary": ptq_file}
    for name, run in runs.items():
        models[name], files[name] = packed(run, args)
    for name, model in models.items():
        if name != "fp":
            ditq.prepare_for_inference(model, backend="dequantized")

    per_seed = []
    for seed in range(args.seeds):
        settings = SampleSettings(samples=args.samples, steps=args.sample_steps, seed=seed, batch_size=500)
        per_seed.append(evaluate(models, settings, sizes=files)[0])
    rows = {}
    for name, model in models.items():
        fids = [r[name]["fid"] for r in per_seed]
        accs = [r[name]["class_acc"] for r in per_seed]
        curve = (
            []
            if name in ("fp", "ptq-ternary")
            else [
                (r["step"], r["loss"])
                for r in map(json.loads, (runs[name] / "log.jsonl").read_text().splitlines())
            ]
        )
        rows[name] = {
            "fid_mean": statistics.mean(fids), "fid_spread": max(fids) - min(fids), "fids": fids,
            "class_acc": statistics.mean(accs), "file_bytes": files[name],
            "weight_bytes": model_size_bytes(model, torch.float16), "final_loss": curve[-1][1] if curve else None,
            "loss_curve": curve,
        }  # fmt: skip
    fp32_bytes = model_size_bytes(fp, torch.float32)
    result = {
        "settings": vars(args) | {"out": str(args.out), "work": str(args.work)},
        "fp32_bytes": fp32_bytes, "fp16_bytes": model_size_bytes(fp, torch.float16),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }  # fmt: skip
    write_json(args.out / "results.json", json_scores(result), indent=2)
    plot(rows, args.out / "loss_curves.png")
    table = markdown(result, args)
    write_text(args.out / "results.md", table)
    print(table)


def plot(rows: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss_curves.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind in zip(axes, ("scratch", "finetune"), strict=True):
        for name, row in rows.items():
            if kind in name and row["loss_curve"]:
                steps, losses = zip(*row["loss_curve"], strict=True)
                ax.plot(steps, losses, label="adaLN RMSNorm" if "rmsnorm" in name else "no RMSNorm")
        ax.set(title=f"ternary QAT, {kind}", xlabel="step", ylabel="training loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict, args: argparse.Namespace) -> str:
    fp32 = result["fp32_bytes"]
    lines = [
        f"TerDiT on DiT-MNIST ({args.samples} samples x {args.seeds} seeds, DDIM {args.sample_steps}, cfg 1.5; "
        f"QAT: scratch {args.scratch_steps} / fine-tune {args.finetune_steps} steps at batch {args.batch}, "
        f"lr {args.lr} x0.1 at 75%)",
        "",
        "| model | FID (mean ± spread) | class acc | file | × smaller than FP32 | weights (fp16 compute) | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        loss = "" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append(
            f"| {name} | {r['fid_mean']:.2f} ± {r['fid_spread'] / 2:.2f} | {r['class_acc']:.3f} | "
            f"{r['file_bytes'] / 2**20:.2f} MiB | {fp32 / r['file_bytes']:.1f} | {r['weight_bytes'] / 2**20:.2f} MiB | {loss} |"
        )
    lines.append(
        f"\nFP32 weights {fp32 / 2**20:.2f} MiB, FP16 {result['fp16_bytes'] / 2**20:.2f} MiB; "
        f"training {result['train_seconds']} s, total {result['total_seconds']} s."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

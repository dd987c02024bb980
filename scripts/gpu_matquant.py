"""MatQuant on DiT-MNIST: one joint QAT over R = {8, 4, 2} served at 8, 6, 4, 3, 2 bits and the extra-precision
int2, against MatGPTQ, QAT and GPTQ / RTN at each width alone, and int8 codes sliced naively; then Mix'n'Match
(a searched served width per layer) and per-timestep schedules on the joint QAT checkpoint.

Four stages, each at most ~9 minutes on one H100, run in this order with the same --out (a
folder kept between the calls); a stage run again skips what it finished (training resumes from its last
checkpoint, rows and searches are kept in --out), so a stage cut short is simply run again:

    PYTHONPATH=. python scripts/gpu_matquant.py --out runs/matquant --stage train   # 6 QAT runs side by side
    PYTHONPATH=. python scripts/gpu_matquant.py --out runs/matquant --stage ptq     # MatGPTQ, GPTQ, RTN, naive
    PYTHONPATH=. python scripts/gpu_matquant.py --out runs/matquant --stage eval    # every row, 2 seeds
    PYTHONPATH=. python scripts/gpu_matquant.py --out runs/matquant --stage mix     # searches, schedules, plots
    PYTHONPATH=. python scripts/gpu_matquant.py --out /tmp/mq --device cpu --tiny --stage all   # CPU smoke test

Training: every QAT run starts from the bundled FP DiT-MNIST and is distilled from it (`ditq train --loss
distill`, the MatQuant recipe's example) with the same step budget; the joint run takes a loss at each of
8, 4 and 2 bits per step, the per-width runs at their one width. 6 and 3 bits, never trained on, are
slices of the joint codes in between (as in the paper). The extra-precision int2 of a nested model is the
same codes served with the fifth level (`QuantSpec.extra_precision`): for QAT, the trained weights
converted with `extra_precision=True`; for MatGPTQ and the naive slices, the codes chosen again with it.

Bits per weight, two columns everywhere (`ditq.quant.served.COSTS`): nominal, the served width (log2 5 for
the extra-precision int2) plus the scales, the paper's effective bits; stored, the packed slot (int3 takes
4 bits, int6 a byte) plus the scales. "file" is the bytes of the served model exported (`ditq.export_served`,
floats in 16 bits). The searched budgets are the nominal cost of uniform int3 (and int2.5, int3.5: the
same scales), so "3 bits" compares the plan with uniform int3 at equal nominal bits. PSNR and SSIM are
against the FP model's images from the same noise, FID and class accuracy from the bundled MNIST net; FID
± is half the spread over the seeds. Writes results.json, results.md, pareto_psnr.png and pareto_fid.png
(with matplotlib) under --out; each stage prints its time.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

import ditq
from ditq.atomic import write_json, write_text
from ditq.bits_schedule import BitsSchedule
from ditq.bundled import bundled_path
from ditq.diffusion import sample_images
from ditq.eval.features import load_feature_net, load_real_stats
from ditq.eval.report import json_scores
from ditq.eval.runner import SampleSettings, compare_pixels, draw, score
from ditq.io import apply_served_bits
from ditq.kernels import prepare_for_inference
from ditq.methods.qdit import QDiT
from ditq.models import create
from ditq.qat import QAT, convert, prepare
from ditq.quant.qlinear import QuantLinear
from ditq.quant.served import COSTS, average_bits, served_widths, slice_bits_per_weight
from ditq.recipes import RTN, load_recipe
from ditq.search import BitsSearch, FitnessSettings, SearchConfig, run_search
from ditq.train import TrainConfig, train

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "bench")
)  # as `python bench/...` imports siblings
from matquant_mix import schedules  # noqa: E402
from pareto_plot import plot  # noqa: E402

STAGES = ("train", "ptq", "eval", "mix")
WIDTHS = (8, 6, 4, 3, 2)
EP = "int2 EP"  # the extra-precision int2 row of a nested model
TINY = dict(depth=2, hidden_size=64, num_heads=2, patch_size=8)
JOINT = load_recipe("matquant")  # QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2))
NESTED_PTQ = {"MatQuant PTQ": "matquant-ptq", "naive GPTQ int8 slice": "matquant-naive",
              "naive RTN int8 slice": "matquant-naive-rtn"}  # fmt: skip
PER_WIDTH_PTQ = {  # symmetric, per channel, weights only: the nested recipes' grid at one width
    "GPTQ alone": lambda bits: QDiT(w_bits=bits, symmetric=True, group_size=None, a_bits=None),
    "RTN alone": lambda bits: RTN(w_bits=bits, a_bits=None),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of every stage's runs, models and results")
    p.add_argument("--stage", choices=(*STAGES, "all"), required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: tiny random model, few steps and samples"
    )
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every QAT run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--samples", type=int, default=1000, help="images per row and seed")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument(
        "--deadline",
        type=float,
        default=510.0,
        help="eval/mix: seconds after which no new row or search starts (rerun the stage to go on)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="train eagerly")
    args = p.parse_args()
    if args.tiny:
        args.steps, args.batch, args.samples, args.sample_steps, args.seeds = 2, 8, 20, 4, 2
    args.started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models").mkdir(exist_ok=True)
    fp, fp_file = fp_model(args)
    for stage in STAGES if args.stage == "all" else (args.stage,):
        began = time.perf_counter()
        done = {"train": stage_train, "ptq": stage_ptq, "eval": stage_eval, "mix": stage_mix}[stage](
            args, fp, fp_file
        )
        seconds = time.perf_counter() - began
        report = read_report(args)
        report["stage_seconds"][stage] = report["stage_seconds"].get(stage, 0.0) + round(seconds, 1)
        write_report(args, report)
        print(
            f"stage {stage}: {seconds:.0f} s, {'done' if done else 'cut at --deadline: run it again'}",
            flush=True,
        )


# ---- the FP model and the QAT runs -------------------------------------------------------------------


def fp_model(args: argparse.Namespace) -> tuple[nn.Module, Path]:
    """The FP model in float32 and its checkpoint (the QAT runs' init and teacher)."""
    if not args.tiny:
        return ditq.load(bundled_path("DiT-MNIST"), device=args.device).float().eval(), bundled_path(
            "DiT-MNIST"
        )
    path = args.out / "fp-tiny.safetensors"  # the bundled weights do not fit the tiny shape
    if not path.exists():
        torch.manual_seed(0)
        model = create("DiT-MNIST", **TINY)
        with (
            torch.no_grad()
        ):  # DiT's init zeroes adaLN and the final layer: every model would draw the same images
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        ditq.save(model.eval(), path)
    return ditq.load(path, device=args.device).eval(), path


def qat_runs() -> dict[str, QAT]:
    """Run name → recipe: the joint MatQuant run and one QAT run per served width."""
    return {"matquant-qat": JOINT} | {f"qat-w{bits}": QAT(w_bits=bits) for bits in WIDTHS}


def run_qat(name: str, recipe: QAT, args: argparse.Namespace, fp_file: Path, device: str) -> str:
    cfg = TrainConfig(
        model="DiT-MNIST", model_overrides=dict(TINY) if args.tiny else {}, recipe=recipe.to_dict(),
        init_from=str(fp_file), loss="distill", teacher=str(fp_file), out_dir=str(args.out / "runs" / name),
        steps=args.steps, global_batch_size=args.batch, lr=args.lr, warmup_steps=min(50, args.steps // 4),
        seed=0, device=device, log_every=max(1, args.steps // 50), ckpt_every=max(1, args.steps // 10),
        resume=True, progress=False, compile=args.compile,
    )  # fmt: skip
    start = time.perf_counter()
    train(cfg)
    return f"{name}: {args.steps} steps in {time.perf_counter() - start:.0f} s"


def stage_train(args: argparse.Namespace, fp: nn.Module, fp_file: Path) -> bool:
    """Every QAT run side by side, spread over the GPUs there are (a step of this small model is bound by launches,
    not by the GPU), then each converted into models/."""
    todo = {
        name: recipe
        for name, recipe in qat_runs().items()
        if not (args.out / "models" / f"{name}.safetensors").exists()
    }
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0  # runs spread over the GPUs there are
    devices = [f"cuda:{i % gpus}" if gpus > 1 else args.device for i in range(len(todo))]
    with ProcessPoolExecutor(max(1, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in [pool.submit(run_qat, name, recipe, args, fp_file, device)
                     for (name, recipe), device in zip(todo.items(), devices, strict=True)]:  # fmt: skip
            print(line.result(), flush=True)
    for name in todo:
        trained = ditq.load(args.out / "runs" / name / "ema.safetensors")
        ditq.save(convert(copy.deepcopy(trained)), args.out / "models" / f"{name}.safetensors")
        if name == "matquant-qat":  # the same trained weights, served with the extra level
            extra = prepare(copy.deepcopy(fp).cpu(), replace(JOINT, extra_precision=True))
            extra.load_state_dict(trained.state_dict())
            ditq.save(convert(extra), args.out / "models" / "matquant-qat-ep.safetensors")
    return True


# ---- post-training rows --------------------------------------------------------------------------------


def ptq_models() -> dict[str, ditq.Recipe]:
    """models/ name → recipe of every post-training model."""
    found: dict[str, ditq.Recipe] = {}
    for method, preset in NESTED_PTQ.items():
        found[slug(method)] = load_recipe(preset)
        found[slug(method) + "-ep"] = replace(load_recipe(preset), extra_precision=True)
    for method, recipe in PER_WIDTH_PTQ.items():
        found |= {f"{slug(method)}-w{bits}": recipe(bits) for bits in WIDTHS}
    return found


def stage_ptq(args: argparse.Namespace, fp: nn.Module, fp_file: Path) -> bool:
    todo = {
        name: r
        for name, r in ptq_models().items()
        if not (args.out / "models" / f"{name}.safetensors").exists()
    }
    calib = None
    for name, recipe in todo.items():
        if calib is None and recipe.needs() == "calibration":
            calib = ditq.calibrate(fp, n_samples=2 if args.tiny else 16, steps=3 if args.tiny else 25, seed=1)
        began = time.perf_counter()
        ditq.save(
            ditq.quantize(copy.deepcopy(fp), recipe, calib), args.out / "models" / f"{name}.safetensors"
        )
        print(f"{name}: {time.perf_counter() - began:.1f} s", flush=True)
    return True


# ---- rows: which model, served how ---------------------------------------------------------------------


def slug(method: str) -> str:
    return method.lower().replace(" ", "-")


def rows() -> dict[str, tuple[str, str, int | None, bool]]:
    """Row label → (method, models/ name, served width or None for a one-width model, extra precision)."""
    nested = {"MatQuant QAT": "matquant-qat"} | {method: slug(method) for method in NESTED_PTQ}
    found = {}
    for bits in WIDTHS:
        for method, name in nested.items():
            found[f"{method} int{bits}"] = (method, name, bits, False)
        for method in ("QAT alone", *PER_WIDTH_PTQ):
            name = f"qat-w{bits}" if method == "QAT alone" else f"{slug(method)}-w{bits}"
            found[f"{method} int{bits}"] = (method, name, None, False)
    for method, name in nested.items():
        found[f"{method} {EP}"] = (method, f"{name}-ep", 2, True)
    return found


def bits_per_weight(model: nn.Module) -> dict[str, float]:
    """Both costs of the quantized layers as served, averaged by their numbers of weights."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    out = {}
    for cost in COSTS:
        total = sum(slice_bits_per_weight(m.spec if m.spec.stored_bits else replace(m.spec, stored_bits=m.spec.w_bits),
                                          m.spec.w_bits, m.in_features, m.out_features, cost) * m.in_features * m.out_features
                    for m in layers)  # fmt: skip
        out[cost] = total / sum(m.in_features * m.out_features for m in layers)
    return out


def file_bytes(model: nn.Module, path: Path) -> int:
    """Bytes of the served model exported (each nested layer packed at its served width), floats in 16 bits."""
    served = copy.deepcopy(model)
    if any(isinstance(m, QuantLinear) and m.spec.stored_bits is not None for m in served.modules()):
        ditq.export_served(served)
    size = ditq.save(served, path, float_dtype=torch.float16).stat().st_size
    path.unlink()
    return size


class Scorer:
    """Scores a model's images at every seed against the FP images of that seed (drawn once, kept in --out)."""

    def __init__(self, args: argparse.Namespace, fp: nn.Module) -> None:
        self.args, self.fp = args, fp
        self.net, self.real = load_feature_net(), load_real_stats()
        self.reference: dict[int, torch.Tensor] = {}

    def settings(self, seed: int) -> SampleSettings:
        return SampleSettings(samples=self.args.samples, steps=self.args.sample_steps, seed=seed,
                              batch_size=min(self.args.samples, 1000))  # fmt: skip

    def fp_images(self, seed: int) -> torch.Tensor:
        if seed not in self.reference:
            path = self.args.out / f"fp_images_seed{seed}.pt"
            if not path.exists():
                torch.save(draw(self.fp, self.settings(seed))[0], path)
            self.reference[seed] = torch.load(path)
        return self.reference[seed]

    def __call__(self, model: nn.Module, seed: int, schedule: BitsSchedule | None = None) -> dict[str, float]:
        settings = self.settings(seed)
        labels = settings.labels(model.num_classes)
        began = time.perf_counter()
        if schedule is None:
            images = draw(model, settings)[0]
        else:
            with schedule.serving(model) as before_step:
                images = sample_images(model, labels, steps=settings.steps, cfg_scale=settings.cfg_scale,
                                       seed=seed, batch_size=settings.batch_size,
                                       before_step=before_step).float().cpu()  # fmt: skip
        seconds = time.perf_counter() - began
        return (
            score(images, labels, self.net, self.real)
            | compare_pixels(images, self.fp_images(seed))
            | {"sample_seconds": round(seconds, 2)}
        )


def past_deadline(args: argparse.Namespace) -> bool:
    return time.perf_counter() - args.started > args.deadline


def score_row(
    args: argparse.Namespace,
    report: dict,
    scorer: Scorer,
    label: str,
    model: nn.Module,
    info: dict,
    schedule: BitsSchedule | None = None,
) -> bool:
    """Score `label` at every seed it lacks, saving after each; False when stopped at the deadline."""
    row = report["rows"].setdefault(label, info | {"seeds": {}})
    for seed in range(args.seeds):
        if str(seed) in row["seeds"]:
            continue
        if past_deadline(args):
            return False
        row["seeds"][str(seed)] = scorer(model, seed, schedule)
        write_report(args, report)
        print(f"{label} seed {seed}: PSNR {row['seeds'][str(seed)]['psnr_vs_fp']:.2f} dB, "
              f"FID {row['seeds'][str(seed)]['fid']:.2f}", flush=True)  # fmt: skip
    return True


def stage_eval(args: argparse.Namespace, fp: nn.Module, fp_file: Path) -> bool:
    report, scorer = read_report(args), Scorer(args, fp)
    loaded: dict[str, nn.Module] = {}
    for label, (method, name, bits, extra) in rows().items():
        row = report["rows"].get(label)
        if row is not None and len(row["seeds"]) >= args.seeds:
            continue
        if name not in loaded:
            loaded = {name: ditq.load(args.out / "models" / f"{name}.safetensors", device=args.device)}
        model = loaded[name]
        if bits is not None:
            prepare_for_inference(model, "reference")
            ditq.set_served_bits(model, bits)
        prepare_for_inference(model, "dequantized")
        width = (
            bits
            if bits is not None
            else next(m.spec.w_bits for m in model.modules() if isinstance(m, QuantLinear))
        )
        info = {"method": method, "kind": "row", "width": EP if extra else width,
                "bits": bits_per_weight(model), "file_bytes": file_bytes(model, args.out / "export.tmp.safetensors"),
                "quantized_weights": sum(m.in_features * m.out_features for m in model.modules()
                                         if isinstance(m, QuantLinear))}  # fmt: skip
        if not score_row(args, report, scorer, label, model, info):
            return False
    return True


# ---- Mix'n'Match and per-timestep schedules -------------------------------------------------------------


def stage_mix(args: argparse.Namespace, fp: nn.Module, fp_file: Path) -> bool:
    report, scorer = read_report(args), Scorer(args, fp)
    nested = ditq.load(args.out / "models" / "matquant-qat.safetensors", device=args.device)
    names = list(served_widths(nested))
    scales = average_bits(nested, dict.fromkeys(names, 3)) - 3  # nominal bits of the scales
    fitness = FitnessSettings(samples=4 if args.tiny else 64, steps=3 if args.tiny else 25, seed=7)
    config = SearchConfig(generations=2 if args.tiny else 4, population=4 if args.tiny else 12, top_k=2 if args.tiny else 4,
                          n_crossover=2 if args.tiny else 4, n_mutation=2 if args.tiny else 4, mutation_prob=0.2,
                          fitness="psnr", fitness_settings=fitness)  # fmt: skip
    for width in (3,) if args.tiny else (3, 2.5, 3.5):
        label = f"MatQuant QAT searched {width:g}-bit plan"
        if label in report["rows"] and len(report["rows"][label]["seeds"]) >= args.seeds:
            continue
        if past_deadline(args):
            return False
        search = BitsSearch(nested, WIDTHS, width + scales, cost="nominal")
        result = run_search(fp, search, config, args.out / "search" / f"{width:g}", progress=False)
        prepare_for_inference(nested, "reference")
        apply_served_bits(nested, result.output)
        prepare_for_inference(nested, "dequantized")
        widths = served_widths(nested)
        info = {"method": "MatQuant QAT", "kind": "searched", "width": "mixed",
                "bits": {cost: average_bits(nested, widths, cost) for cost in COSTS},
                "file_bytes": file_bytes(nested, args.out / "export.tmp.safetensors"),
                "layers_per_width": {str(w): list(widths.values()).count(w) for w in WIDTHS},
                "search": {"evaluations": result.evaluations, "seconds": round(result.seconds, 1),
                           "budget_nominal": search.budget_given, "plan": result.output}}  # fmt: skip
        if not score_row(args, report, scorer, label, nested, info):
            return False
    prepare_for_inference(nested, "reference")
    found = schedules(nested, WIDTHS, 3 + scales, args.sample_steps)
    for name, schedule in ((n, sc) for n, sc in found.items() if "int4" in n or "int8" in n):  # two per pair
        info = {"method": "MatQuant QAT", "kind": "schedule", "width": "per step",
                "bits": {cost: schedule.average_bits(nested, args.sample_steps, cost) for cost in COSTS},
                "schedule": [[start, plan] for start, plan in schedule.entries]}  # fmt: skip
        if not score_row(args, report, scorer, f"MatQuant QAT schedule {name}", nested, info, schedule):
            return False
    write_plots(args)
    return True


# ---- the report -----------------------------------------------------------------------------------------


def read_report(args: argparse.Namespace) -> dict:
    path = args.out / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                         if k not in ("stage", "started", "deadline", "device")},
            "sample_settings": asdict(SampleSettings(samples=args.samples, steps=args.sample_steps)),
            "rows": {}, "stage_seconds": {}}  # fmt: skip


def write_report(args: argparse.Namespace, report: dict) -> None:
    write_json(args.out / "results.json", json_scores(report), indent=1)
    write_text(args.out / "results.md", markdown(report))


def write_plots(args: argparse.Namespace) -> None:
    """pareto_psnr.png and pareto_fid.png of the joint QAT checkpoint's rows (`bench/pareto_plot.py`)."""
    points = pareto_rows(read_report(args))
    try:
        for y, higher in (("psnr", True), ("fid", False)):
            plot(
                points,
                args.out / f"pareto_{y}.png",
                y,
                higher,
                f"MatQuant QAT on DiT-MNIST: {y} vs nominal bits",
            )
    except ImportError:
        print("matplotlib is not installed: no Pareto plots (pip install matplotlib, then rerun --stage mix)")


def summary(row: dict) -> dict[str, float]:
    seeds = list(row["seeds"].values())
    mean = {k: statistics.mean(s[k] for s in seeds) for k in ("psnr_vs_fp", "ssim_vs_fp", "class_acc", "fid")}
    fids = [s["fid"] for s in seeds]
    return mean | {"fid_half_spread": (max(fids) - min(fids)) / 2}


def pareto_rows(report: dict) -> list[dict]:
    """The joint QAT checkpoint's rows (uniform widths, searched plans, schedules) and the per-width QAT rows
    for `bench/pareto_plot.py`: x is the nominal bits."""
    points = []
    for label, row in report["rows"].items():
        if row["seeds"] and row["method"] in ("MatQuant QAT", "QAT alone"):
            kind = (
                row["kind"]
                if row["kind"] != "row"
                else ("uniform" if row["method"] == "MatQuant QAT" else "QAT alone")
            )
            s = summary(row)
            points.append({"name": label.replace("MatQuant QAT ", ""), "kind": kind, "bits": row["bits"]["nominal"],
                           "psnr": s["psnr_vs_fp"], "fid": s["fid"]})  # fmt: skip
    return points


def markdown(report: dict) -> str:
    s, ss = report["settings"], report["sample_settings"]
    lines = [f"# MatQuant on DiT-MNIST ({s['samples']} samples x {s['seeds']} seeds, DDIM {s['sample_steps']}, "
             f"cfg {ss['cfg_scale']}; QAT: {s['steps']} steps at batch {s['batch']}, lr {s['lr']}, distilled)", "",
             "bits: nominal (served width + scales) / stored (packed slot + scales); file: the served model exported.",
             "", "| row | bits nominal | bits stored | file KiB | PSNR vs FP | SSIM | class acc | FID ± |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("row", "searched", "schedule"):
        if kind != "row":
            lines += ["", f"**Mix'n'Match: {kind}** (MatQuant QAT checkpoint)", "",
                      "| row | bits nominal | bits stored | file KiB | PSNR vs FP | SSIM | class acc | FID ± |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for label, row in report["rows"].items():
            if row["kind"] != kind or not row["seeds"]:
                continue
            m = summary(row)
            size = f"{row['file_bytes'] / 1024:.0f}" if "file_bytes" in row else "—"
            lines.append(f"| {label} | {row['bits']['nominal']:.3f} | {row['bits']['stored']:.3f} | {size} | "
                         f"{m['psnr_vs_fp']:.2f} | {m['ssim_vs_fp']:.4f} | {m['class_acc']:.3f} | "
                         f"{m['fid']:.2f} ± {m['fid_half_spread']:.2f} |")  # fmt: skip
    plan, uniform = (
        report["rows"].get("MatQuant QAT searched 3-bit plan"),
        report["rows"].get("MatQuant QAT int3"),
    )
    if plan and uniform and plan["seeds"] and uniform["seeds"]:
        a, b = summary(plan), summary(uniform)
        lines += ["", f"Searched 3-bit plan − uniform int3 (same checkpoint, {plan['bits']['nominal']:.3f} vs "
                      f"{uniform['bits']['nominal']:.3f} nominal bits): PSNR {a['psnr_vs_fp'] - b['psnr_vs_fp']:+.2f} dB, "
                      f"FID {a['fid'] - b['fid']:+.2f}."]  # fmt: skip
    lines += ["", "stage seconds: " + ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

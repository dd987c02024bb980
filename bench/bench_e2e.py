"""End-to-end forward time of DiT-XL/2 (random weights), bf16 vs quantized, both under torch.compile.

One configuration per process (each compile gets a clean dynamo cache and one static batch size); a JSON
line per run goes to stdout. `bench/e2e_table.py` turns the lines into the committed JSON + Markdown.

    python bench/bench_e2e.py --batch 64 --config bf16
    python bench/bench_e2e.py --batch 2 --config w4a8 --cuda-graphs

Configs: `bf16` (the model as is), `torchao-fp8-row` (torchao's float8 row-wise, the peer), an RTN preset (`w4a8`, `w4a16`, `w4a4`, `w8a8`), or one of the FP8-path
recipes below (per-channel int4 or ternary weights, per-token FP8 activations), run through `--backend`
("dequantized" by default; "fp8" / "fp8-cached" for the Triton + cuBLAS FP8 path, "fp8-gluon" for the Gluon W4A8 GEMM on Hopper). `--all-linears` also
quantizes the adaLN modulation Linears (the presets keep them 16-bit). Timing: CUDA events around each forward after warm-up, median of the
repeats; batch counts the CFG-doubled batch the model sees. `--sample-steps N` also times whole N-step DDIM
sampling runs with classifier-free guidance (batch/2 images, the compiled model called once per step on the
doubled batch, the sampler's own ops in eager), the same way. `--no-fold` keeps SVDQuant's smoothing at run time on
the FP8 backends (`prepare_for_inference(..., fold=False)`), to time what folding it into the producers saves:

    python bench/bench_e2e.py --batch 64 --config svdquant-w4a8fp8-r32 --backend fp8-cached
    python bench/bench_e2e.py --batch 64 --config svdquant-w4a8fp8-r32 --backend fp8-cached --no-fold
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable

import torch

import ditq
from ditq.diffusion import create_diffusion
from ditq.diffusion.cfg import guided
from ditq.eval.speed import time_back_to_back, time_calls
from ditq.methods.svdquant import SVDQuant
from ditq.models import create
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import PRESETS, RTN

FP8_RECIPES = {
    "w4a8fp8": RTN(w_bits=4, a_bits=8, a_format="fp8"),
    "ternary-a8fp8": RTN(w_bits=2, w_format="ternary", a_bits=8, a_format="fp8"),
    "ternary-a16": RTN(w_bits=2, w_format="ternary", a_bits=None),
    # SVDQuant's layer structure (shared smoothing, rank-32 branch) with per-channel int4: one α, calibrated
    # on two short trajectories, since only the timing is measured here
    "svdquant-w4a8fp8-r32": SVDQuant(
        group_size=None, a_bits=8, a_format="fp8", a_group_size=None, rank=32, alphas=(0.5,)
    ),
}
TORCHAO = "torchao-fp8-row"  # torchao's float8 dynamic activation + weight, row-wise scales (the peer)
EMBEDDERS_AND_FINAL = ("x_embedder*", "t_embedder*", "y_embedder*", "final_layer*")


def torchao_fp8_row(model: torch.nn.Module, filter_fn: Callable[[torch.nn.Module, str], bool]) -> None:
    """torchao's float8 dynamic activation + weight with row-wise scales (the peer), in place, on the Linears
    `filter_fn(module, name)` picks."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=filter_fn)


def build(
    config: str, device: str, backend: str, all_linears: bool, fast_accumulation: bool | None = None,
    fold: bool = True,
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("DiT-XL/2").to(device)
    with torch.no_grad():  # leave adaLN-zero's zeros: nothing should be timed on zero weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(torch.bfloat16).eval()
    if config == TORCHAO:

        def in_blocks(module: torch.nn.Module, name: str) -> bool:
            return (
                isinstance(module, torch.nn.Linear)
                and name.startswith("blocks.")
                and (all_linears or "adaLN" not in name)
            )

        torchao_fp8_row(model, in_blocks)
    elif config != "bf16":
        recipe = FP8_RECIPES.get(config) or PRESETS[config]
        if all_linears:
            recipe = dataclasses.replace(recipe, skip=EMBEDDERS_AND_FINAL)
        calib = None
        if recipe.method == "svdquant":
            calib = ditq.calibrate(model, n_samples=2, steps=2, rows_per_layer=512)
        ditq.quantize(model, recipe, calib)
        options = {} if fast_accumulation is None else {"fast_accumulation": fast_accumulation}
        ditq.prepare_for_inference(model, backend, dtype=torch.bfloat16, fold=fold, **options)
    return model


def time_sampling(compiled: torch.nn.Module, batch: int, steps: int, device: str, repeats: int = 5) -> dict:
    """Median ms of whole `steps`-step DDIM runs with CFG (scale 4) over batch/2 images, after one warm-up run."""
    if batch % 2:
        raise ValueError(f"sampling with CFG needs an even batch, got {batch}")
    diffusion = create_diffusion(f"ddim{steps}")
    g = torch.Generator(device=device).manual_seed(2)
    shape = (batch // 2, compiled.in_channels, compiled.input_size, compiled.input_size)
    noise = torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, compiled.num_classes, (batch // 2,), device=device, generator=g)
    model_fn = guided(compiled, 4.0)

    def run() -> torch.Tensor:
        return diffusion.sample(model_fn, shape, noise=noise, model_kwargs={"y": labels})

    times = sorted(time_calls(run, (), torch.device(device), warmup=1, repeats=repeats))
    return {"sample_steps": steps, "sample_median_ms": times[len(times) // 2], "sample_repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--config", required=True, choices=["bf16", TORCHAO, *sorted(PRESETS), *FP8_RECIPES])
    parser.add_argument("--backend", default="dequantized", help="kernel backend of the quantized layers")
    parser.add_argument("--all-linears", action="store_true", help="quantize the adaLN Linears too")
    parser.add_argument("--cuda-graphs", action="store_true", help="compile with mode='reduce-overhead'")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sample-steps", type=int, default=0, help="also time N-step DDIM sampling with CFG")
    parser.add_argument(
        "--fast-accum",
        choices=["on", "off"],
        help="cuBLAS FP8 fast accumulation of the FP8 backends (default: prepare_for_inference's)",
    )
    parser.add_argument("--no-fold", action="store_true", help="keep SVDQuant's smoothing at run time (FP8 backends)")
    parser.add_argument(
        "--multi-kernel",
        action="store_true",
        help="inductor's multi_kernel=1: persistent reductions for rows up to 16k, picked by timing",
    )
    args = parser.parse_args()
    if args.multi_kernel:
        torch._inductor.config.triton.multi_kernel = 1
    device = "cuda"
    fast_accumulation = None if args.fast_accum is None else args.fast_accum == "on"
    model = build(args.config, device, args.backend, args.all_linears, fast_accumulation, fold=not args.no_fold)
    smoothed = [m for m in model.modules() if isinstance(m, QuantLinear) and m.smooth is not None]
    weight_bytes = None if args.config == TORCHAO else ditq.io.model_size_bytes(model, torch.bfloat16)
    # kernel copies too; torchao's tensor subclasses report their outer shape and dtype, not what they hold
    tensors = [*model.parameters(), *model.buffers()]
    held = None if args.config == TORCHAO else sum(t.numel() * t.element_size() for t in tensors)
    torch.cuda.reset_peak_memory_stats()  # the bf16 model built before quantizing is not the quantized one's peak
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, 4, 32, 32, device=device, generator=g, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
    y = torch.randint(0, 1001, (args.batch,), device=device, generator=g)
    with torch.no_grad():
        eager = model(x, t, y).float()
        mode = "reduce-overhead" if args.cuda_graphs else None
        compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
        start = time.perf_counter()
        out = compiled(x, t, y).float()
        compile_s = time.perf_counter() - start
        times = time_calls(compiled, (x, t, y), torch.device(device), warmup=10, repeats=args.repeats)
        back_to_back = time_back_to_back(compiled, (x, t, y), torch.device(device), calls=args.repeats)
        sampling = time_sampling(compiled, args.batch, args.sample_steps, device) if args.sample_steps else {}
    times.sort()
    rel = float((out - eager).norm() / eager.norm())
    print(
        json.dumps(
            {
                "config": args.config + ("+multikernel" if args.multi_kernel else "")
                + ("" if args.fast_accum is None else f"+fast-accum-{args.fast_accum}")
                + ("+no-fold" if args.no_fold else ""),
                "backend": "—" if args.config in ("bf16", TORCHAO) else args.backend,
                "all_linears": args.all_linears,
                "smoothed_layers": len(smoothed),
                "smoothing_folded": sum(m.smoothing_folded for m in smoothed),
                "weight_bytes": weight_bytes,
                "batch": args.batch,
                "cuda_graphs": args.cuda_graphs,
                "median_ms": times[len(times) // 2],
                "min_ms": times[0],
                "max_ms": times[-1],
                "back_to_back_ms": back_to_back,
                "repeats": len(times),
                "compile_s": round(compile_s, 1),
                "compiled_vs_eager_rel_err": rel,
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "triton": __import__("triton").__version__,
                "gpu_weight_bytes": held,
                "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
            | sampling
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

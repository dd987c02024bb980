"""FLUX.1-dev-size transformer (random weights, bf16, 1024 px): memory and per-step time, bf16 vs 4-bit.

One run measures, on the same GPU and inputs: the bf16 FluxTransformer2DModel (19 double + 38 single
blocks, hidden 3072; 4096 image tokens + 512 text tokens, batch 1) and the same transformer (rebuilt from
the same seed) quantized in place with each `RECIPE@BACKEND` of --recipes (default: per-channel W4 with
FP8 activations on the `fp8` kernels, which keep the weights 4-bit, and on `fp8-cached`), all under
torch.compile. Per-step time: median of timed forwards after warm-up, with a sync before the clock.
Memory: what is allocated once the model is ready (weights and kernel buffers), the peak during a step,
and the model's tensors as ditq stores them. Also: the relative error of the quantized output vs bf16.

    PYTHONPATH=. python scripts/gpu_diffusers.py --out $OUT             # H100, ≤ 8 minutes
    TRITON_INTERPRET=1 PYTHONPATH=. python scripts/gpu_diffusers.py --out /tmp/x --device cpu --tiny --no-compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ditq
from ditq.integrations.diffusers import SUPPORTED
from ditq.io import model_size_bytes
from ditq.recipes import load_recipe

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY = dict(
    FLUX_DEV,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=128,
    pooled_projection_dim=32,
    axes_dims_rope=(16, 24, 24),
)


def build(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
        with torch.no_grad():  # FLUX zero-inits nothing that matters here, but random adaLN needs a scale
            for p in model.parameters():
                p.mul_(0.5)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def time_steps(fn, inputs: dict, warmup: int, iters: int, device: str) -> tuple[float, int, torch.Tensor]:
    """(median seconds per step, peak bytes allocated during the timed steps, last output)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            out = fn(**inputs, return_dict=False)[0]
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            out = fn(**inputs, return_dict=False)[0]
            sync()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return statistics.median(times), peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--recipes",
        default="w4a8-fp8@fp8,w4a8-fp8@fp8-cached",
        help="comma-separated RECIPE@BACKEND (presets or recipe files; backend default 'fp8')",
    )
    parser.add_argument("--tiny", action="store_true", help="a two-block FLUX for a CPU check")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16
    config = TINY if args.tiny else FLUX_DEV
    tokens = 4 if args.tiny else 64  # latent side in packed tokens: 64×64 = 4096 (1024 px)
    text = 8 if args.tiny else 512
    adapter = SUPPORTED["FluxTransformer2DModel"]
    on_cuda = args.device.startswith("cuda")

    model = build(config, args.device, dtype)
    gen = torch.Generator().manual_seed(0)
    inputs = adapter.example_inputs(model, 1, tokens, text, 0.5, gen)
    inputs = {k: v.to(args.device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    compile_ = (lambda m: m) if args.no_compile else (lambda m: torch.compile(m))
    rows, reference = [], None

    def measure(label: str, model: torch.nn.Module, **extra: object) -> None:
        nonlocal reference
        resident = torch.cuda.memory_allocated() if on_cuda else 0
        start = time.perf_counter()
        seconds, peak, out = time_steps(
            compile_(model), inputs, warmup=2, iters=args.iters, device=args.device
        )
        row = {"model": label, "step_ms": round(seconds * 1000, 2), "resident_GiB": round(resident / 2**30, 2),
               "peak_alloc_GiB": round(peak / 2**30, 2),
               "stored_GiB": round(model_size_bytes(model, dtype) / 2**30, 3),
               "wall_s": round(time.perf_counter() - start, 1), **extra}  # fmt: skip
        if reference is None:
            reference = out.float()
        else:
            row["rel_err_vs_bf16"] = round(float((out.float() - reference).norm() / reference.norm()), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)

    measure("bf16", model)
    for entry in [r for r in args.recipes.split(",") if r]:
        name, _, backend = entry.partition("@")
        del model
        if on_cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        model = build(config, args.device, dtype)  # the same weights: the FP tensors are replaced, not kept
        start = time.perf_counter()
        ditq.quantize(model, load_recipe(name))
        ditq.prepare_for_inference(model, backend or "fp8", dtype=dtype)
        measure(f"{name} ({backend or 'fp8'})", model, quantize_s=round(time.perf_counter() - start, 1))

    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "config": config,
        "image_tokens": tokens * tokens,
        "text_tokens": text,
        "dtype": "bfloat16",
        "compiled": not args.no_compile,
        "rows": rows,
    }
    (args.out / "diffusers_flux.json").write_text(json.dumps(meta, indent=2) + "\n")
    keys = [
        "model",
        "step_ms",
        "resident_GiB",
        "peak_alloc_GiB",
        "stored_GiB",
        "rel_err_vs_bf16",
        "quantize_s",
    ]
    lines = [
        f"FLUX.1-dev-size transformer, random weights, {tokens * tokens}+{text} tokens, batch 1, "
        f"{device_name}, torch {torch.__version__}, compiled={not args.no_compile}",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(str(r.get(k, "–")) for k in keys) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    (args.out / "diffusers_flux.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

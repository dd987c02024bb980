"""End-to-end forward time of DiT-XL/2 (random weights), bf16 vs quantized, both under torch.compile.

One configuration per process (each compile gets a clean dynamo cache and one static batch size); a JSON
line per run goes to stdout. `bench/e2e_table.py` turns the lines into the committed JSON + Markdown.

    python bench/bench_e2e.py --batch 64 --config bf16
    python bench/bench_e2e.py --batch 2 --config w4a8 --cuda-graphs

Configs: `bf16` (the model as is), or an RTN preset (`w4a8`, `w4a16`, `w4a4`, `w8a8`) through the
"dequantized" evaluation backend. Timing: CUDA events around each forward after warm-up, median of the
repeats; batch counts the CFG-doubled batch the model sees.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ditq
from ditq.models import create
from ditq.recipes import PRESETS


def build(config: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("DiT-XL/2").to(device)
    with torch.no_grad():  # leave adaLN-zero's zeros: nothing should be timed on zero weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(torch.bfloat16).eval()
    if config != "bf16":
        ditq.quantize(model, PRESETS[config])
        ditq.prepare_for_inference(model, "dequantized", dtype=torch.bfloat16)
    return model


def time_forward(fn, args, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--config", required=True, choices=["bf16", *sorted(PRESETS)])
    parser.add_argument("--cuda-graphs", action="store_true", help="compile with mode='reduce-overhead'")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = "cuda"
    model = build(args.config, device)
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
        times = time_forward(lambda *a: compiled(*a), (x, t, y), warmup=10, repeats=args.repeats)
    times.sort()
    rel = float((out - eager).norm() / eager.norm())
    print(json.dumps({
        "config": args.config, "batch": args.batch, "cuda_graphs": args.cuda_graphs,
        "median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1], "repeats": len(times),
        "compile_s": round(compile_s, 1), "compiled_vs_eager_rel_err": rel,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }), flush=True)


if __name__ == "__main__":
    main()

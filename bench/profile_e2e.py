"""Where a compiled DiT-XL/2 forward spends its GPU time: the CUDA kernels of each config, one table per config.

    python bench/profile_e2e.py --batch 64 --configs bf16,w4a8fp8:fp8-cached --out OUT

Each config (`name` or `name:backend`, as `bench_e2e.py` builds them) is compiled fullgraph, warmed up, and
five forwards are profiled; `OUT/profile_<config>.txt` lists the kernels by total CUDA time. `--cpu` also
records the host side and appends the operators by self CPU time (where a forward that is bound by its
launches spends them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_e2e import build
from torch.profiler import ProfilerActivity, profile

from ditq.atomic import write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--configs", default="bf16,w4a8fp8:fp8-cached")
    parser.add_argument("--all-linears", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="also profile the host's operators")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(args.batch, 4, 32, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (args.batch,), device="cuda", generator=g)
    y = torch.randint(0, 1001, (args.batch,), device="cuda", generator=g)
    for entry in args.configs.split(","):
        config, _, backend = entry.partition(":")
        torch._dynamo.reset()
        model = build(config, "cuda", backend or "dequantized", args.all_linears)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch.no_grad():
            for _ in range(3):
                compiled(x, t, y)
            torch.cuda.synchronize()
            activities = [ProfilerActivity.CUDA, *([ProfilerActivity.CPU] if args.cpu else [])]
            with profile(activities=activities) as prof:
                for _ in range(5):
                    compiled(x, t, y)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        if args.cpu:
            table += "\n" + prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90
            )
        write_text(args.out / f"profile_{entry.replace(':', '_')}.txt", table + "\n")
        print(entry, "\n", table[:6000], flush=True)
        del model, compiled
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

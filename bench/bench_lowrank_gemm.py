"""SVDQuant's branch inside the FP8 GEMM (`ditq.kernels.fp8._lowrank_parts`): what the `rank` extra columns of K
cost at DiT-XL/2 batch-64 shapes, same run. Medians of CUDA-graph replays (µs; `bench/timing.py` says why).

    python bench/bench_lowrank_gemm.py --out bench/results/lowrank_gemm_h200
    python bench/bench_lowrank_gemm.py --sweep --out bench/results/lowrank_sweep_h200

Per layer shape (M = 16,384 tokens): the main `_scaled_mm` at K and at K + extra columns (how cuBLAS takes a K
that is no multiple of 128; the branch adds 2·rank), and the kernel that appends the low-rank codes
(`ditq.kernels.triton.lowrank`), against bf16's GEMM. `--sweep` times that kernel's launch configurations instead
(rank 32, K = 1,152 and 4,608), the fastest first.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from timing import replay_us as bench

from ditq.atomic import write_json, write_text
from ditq.kernels.triton.lowrank import append_lowrank_codes

SHAPES = [("qkv", 1152, 3456), ("proj", 1152, 1152), ("fc1", 1152, 4608), ("fc2", 4608, 1152)]  # (name, K, N)
M = 16384
EXTRA = (0, 16, 32, 64, 128)


def fp8(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * 8).to(torch.float8_e4m3fn)


def measure(name: str, k: int, n: int) -> dict:
    a16 = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    row = {"layer": name, "K": k, "N": n, "bf16_us": bench(lambda: a16 @ w16.t())}
    sa, sb = torch.rand(M, 1, device="cuda"), torch.rand(1, n, device="cuda")
    for extra in EXTRA:
        a, w = fp8(M, k + extra), fp8(n, k + extra)
        row[f"fp8_K+{extra}_us"] = bench(
            lambda a=a, w=w: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        )
    for rank in (32, 64):
        codes, down = fp8(M, k + 2 * rank), fp8(k, rank)
        scale = torch.rand(1, rank, device="cuda") / (448 * k)
        row[f"lowrank_codes_r{rank}_us"] = bench(
            lambda c=codes, d=down, s=scale: append_lowrank_codes(c, d, s)
        )
    return row


def sweep(k: int, rank: int = 32) -> list[dict]:
    codes, down = fp8(M, k + 2 * rank), fp8(k, rank)
    scale = torch.rand(1, rank, device="cuda") / (448 * k)
    rows = []
    for block_m, block_k, warps, stages in itertools.product((32, 64, 128), (128, 256), (4, 8), (2, 3)):
        launch = dict(block_m=block_m, block_k=block_k, num_warps=warps, num_stages=stages)
        try:
            us = bench(lambda launch=launch: append_lowrank_codes(codes, down, scale, **launch), rep=100)
        except Exception as error:  # a config the compiler cannot build (shared memory, registers)
            print(f"K={k} {launch}: {type(error).__name__}", flush=True)
            continue
        rows.append({"K": k, "rank": rank, **launch, "us": us})
    return sorted(rows, key=lambda r: r["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="path stem for .json and .md")
    parser.add_argument("--sweep", action="store_true", help="the low-rank kernel's launch configurations")
    args = parser.parse_args()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "M": M,
    }
    if args.sweep:
        rows = [r for k in (1152, 4608) for r in sweep(k)]
        write_json(args.out.with_suffix(".json"), meta | {"rows": rows}, indent=1)
        lines = [f"# The low-rank codes kernel's launches, {meta['gpu']}, M = {M}, rank 32, µs of CUDA-graph replays "
            "(10 fastest per K)", "",
                 "| K | block_m | block_k | warps | stages | µs |", "|---|---|---|---|---|---|"]  # fmt: skip
        for k in (1152, 4608):
            for r in [r for r in rows if r["K"] == k][:10]:
                lines.append(
                    f"| {k} | {r['block_m']} | {r['block_k']} | {r['num_warps']} | {r['num_stages']} | {r['us']:.1f} |"
                )
        write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
        return
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out.with_suffix(".json"), meta | {"rows": rows}, indent=1)
    head = [
        "layer (K×N)",
        "bf16",
        *[f"fp8 K+{e}" for e in EXTRA],
        "low-rank codes r32",
        "low-rank codes r64",
    ]
    lines = [f"# The low-rank columns in the FP8 GEMM, {meta['gpu']}, torch {meta['torch']}, M = {M}, µs", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        cells = [f"{r['layer']} ({r['K']}×{r['N']})", f"{r['bf16_us']:.1f}", *[f"{r[f'fp8_K+{e}_us']:.1f}" for e in EXTRA],
                 *[f"{r[f'lowrank_codes_r{q}_us']:.1f}" for q in (32, 64)]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""The FP8 input pre-pass (`ditq::quantize_rows_fp8`) against what `torch.compile` builds for the same work,
at DiT-XL/2 batch-64 shapes, same run. Medians of CUDA-graph replays (µs; `bench/timing.py` says why).

    python bench/bench_prepass.py --out bench/results/prepass_h200

Rows: fc2's input (16,384 × 4,608, GELU-tanh) and qkv's and fc1's (16,384 × 1,152, LayerNorm + adaLN modulate), each
also with SVDQuant's smoothing + rank-32 branch (the op `ditq::quantize_rows_fp8` then also appends the low-rank
codes: `ditq.kernels.triton.lowrank`).
"inductor" compiles the PyTorch reference (the FP8 backend without the kernel); "bf16 producer alone" is what bf16
spends on the GELU or LayerNorm + modulate alone. The one-pass kernel's launches (elements per program × warps) are
swept for every row, smoothed ones included (without P, which has its own kernel): what `rowquant.UNSMOOTHED_LAUNCH`
and `SMOOTHED_LAUNCH` are chosen from. Every kernel output is compared with the reference first (the differences
are recorded in the rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from timing import replay_us as bench

from ditq.kernels.fp8 import quantize_rows
from ditq.kernels.reference import Modulation, activate, modulated
from ditq.kernels.triton.lowrank import append_lowrank_codes_reference
from ditq.kernels.triton.rowquant import quantize_rows_fp8, quantize_rows_fp8_reference
from ditq.quant.primitives import fp8_quantize

CASES = [  # (name, M, K, activation or "modulate", smooth + rank)
    ("fc2 in, gelu_tanh", 16384, 4608, "gelu_tanh", 0),
    ("fc2 in, gelu_tanh, smooth + r32", 16384, 4608, "gelu_tanh", 32),
    ("qkv/fc1 in, LayerNorm + modulate", 16384, 1152, "modulate", 0),
    ("qkv/fc1 in, LayerNorm + modulate, smooth + r32", 16384, 1152, "modulate", 32),
]
TOKENS = 256  # DiT-XL/2 at 256×256: rows are samples × 256 tokens
LAUNCHES = [(e, w) for e in (4096, 8192, 9216, 16384) for w in (1, 2, 4, 8)]  # the defaults among them


def reference(x, inv_smooth, activation, mod, lowrank):
    """The op's work in PyTorch: the reference codes, then the low-rank codes appended."""
    codes, scales = quantize_rows_fp8_reference(x, inv_smooth, activation, mod)
    if lowrank:
        spare = torch.empty_like(
            codes[:, : 2 * lowrank[0].shape[1]]
        )  # as bytes: inductor's e4m3 cat fails on Triton 3.6
        codes = torch.cat([codes.view(torch.uint8), spare.view(torch.uint8)], dim=1).view(torch.float8_e4m3fn)
        append_lowrank_codes_reference(codes, *lowrank)
    return codes, scales


def measure(name: str, m: int, k: int, transform: str, rank: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16) * 2
    inv_smooth = torch.rand(k, device="cuda", generator=g) + 0.5 if rank else None
    lowrank = ()
    if rank:  # as `ditq.kernels.fp8._lowrank_parts` makes them
        down, _ = fp8_quantize(torch.randn(rank, k, device="cuda", generator=g) * 0.05)
        lowrank = (down.t().contiguous(), 1 / down.float().abs().sum(1).reshape(1, -1))
    mod = None
    if transform == "modulate":
        shift, scale = (
            torch.randn(m // TOKENS, k, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "ab"
        )
        mod = Modulation(shift, scale, TOKENS, 1e-6)
    activation = "none" if mod else transform
    op_args = (x, inv_smooth, activation, *(mod or (None, None, 1, 0.0)), *lowrank)
    ref_codes, ref_scales = reference(x, inv_smooth, activation, mod, lowrank)
    codes, scales, _ = quantize_rows(*op_args)
    row = {
        "case": name, "M": m, "K": k, "transform": transform, "rank": rank,
        "codes_differing": float((codes.float() != ref_codes.float()).float().mean()),
        "scales_max_rel_diff": float(((scales - ref_scales).abs() / ref_scales).max()),
    }  # fmt: skip
    compiled = torch.compile(reference, fullgraph=True, dynamic=False)
    row["inductor_us"] = bench(lambda: compiled(x, inv_smooth, activation, mod, lowrank))
    alone = torch.compile(lambda t: activate(t, activation) if mod is None else modulated(t, mod), fullgraph=True,
                          dynamic=False)  # fmt: skip
    row["bf16_producer_us"] = bench(lambda: alone(x))  # what bf16 spends on the producer alone
    row["launches"] = {
        f"{e} elements, {w} warps": bench(
            lambda e=e, w=w: quantize_rows_fp8(x, inv_smooth, activation, mod, row_elements=e, num_warps=w)
        )
        for e, w in LAUNCHES
    }
    row["kernel_us"] = bench(lambda: quantize_rows(*op_args))  # the default launch
    row["ideal_us_at_4.3tbps"] = (m * k * 3 + m * 4 + m * rank * 2) / 4.3e12 * 1e6  # H200 copy bandwidth
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="path stem for .json and .md")
    args = parser.parse_args()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for case in CASES:
        rows.append(measure(*case))
        print(json.dumps(rows[-1]), flush=True)
        args.out.with_suffix(".json").write_text(json.dumps(meta | {"rows": rows}, indent=1))  # partial kept
    lines = [f"# FP8 input pre-pass, {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}", "",
             "| case | inductor µs | kernel µs | × inductor | bf16 producer alone µs | ideal µs | codes ≠ ref |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['case']} ({r['M']}×{r['K']}) | {r['inductor_us']:.1f} | {r['kernel_us']:.1f} | "
            f"{r['inductor_us'] / r['kernel_us']:.2f} | {r.get('bf16_producer_us', float('nan')):.1f} | "
            f"{r['ideal_us_at_4.3tbps']:.1f} | {r['codes_differing']:.1e} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

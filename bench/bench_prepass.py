"""The FP8 input pre-pass (`ditq::quantize_rows_fp8`) against what `torch.compile` builds for the same work,
at DiT-XL/2 batch-64 shapes and other transformers' widths, same run. Medians of CUDA-graph replays (µs;
`bench/timing.py` says why).

    python bench/bench_prepass.py --out bench/results/prepass_h200

Rows: fc2's input (16,384 × 4,608, GELU-tanh) and qkv's and fc1's (16,384 × 1,152, LayerNorm + adaLN modulate), each
also with SVDQuant's smoothing + rank-32 branch (the op `ditq::quantize_rows_fp8` then also appends the low-rank
codes: `ditq.kernels.triton.lowrank`); then the producers of other transformers' inputs at 16,384 rows of their
widths: Large-DiT's RMSNorm + modulate (1,536), PixArt's fc1 input after its ungated residual add (1,152), an
RMSNorm as diffusers writes it with weight and bias + modulate after a residual (FLUX's 3,072), an affine
LayerNorm alone (SD3's 1,536).
"inductor" compiles the PyTorch reference (the FP8 backend without the kernel; with a residual it also returns
the sum, which the op writes); "bf16 producer alone" is what bf16 spends on the producer alone. The one-pass
kernel's launches (elements per program × warps) are swept for DiT-XL/2's rows, smoothed ones included (without
P, which has its own kernel): what `rowquant.UNSMOOTHED_LAUNCH` and `SMOOTHED_LAUNCH` are chosen from. Every kernel
output is compared with the reference first (the differences are recorded in the rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from timing import replay_us as bench

from ditq.atomic import write_json, write_text
from ditq.kernels.fp8 import quantize_rows
from ditq.kernels.reference import Modulation, Norm, Residual, activate, modulated, normalized, residual_added
from ditq.kernels.triton.lowrank import append_lowrank_codes_reference
from ditq.kernels.triton.rowquant import quantize_rows_fp8, quantize_rows_fp8_reference
from ditq.quant.primitives import fp8_quantize

# producer: (activation, norm kind or None, norm weight and bias, modulate, residual add without a gate)
PRODUCERS = {
    "gelu_tanh": ("gelu_tanh", None, False, False, False),
    "modulate": ("none", "layer", False, True, False),
    "rms + modulate": ("none", "rms", True, True, False),
    "residual + modulate": ("none", "layer", False, True, True),
    "residual + rms_cast w, b + modulate": ("none", "rms_cast", True, True, True),
    "affine LayerNorm": ("none", "layer", True, False, False),
}
CASES = [  # (name, M, K, producer, smooth + rank)
    ("fc2 in, gelu_tanh", 16384, 4608, "gelu_tanh", 0),
    ("fc2 in, gelu_tanh, smooth + r32", 16384, 4608, "gelu_tanh", 32),
    ("qkv/fc1 in, LayerNorm + modulate", 16384, 1152, "modulate", 0),
    ("qkv/fc1 in, LayerNorm + modulate, smooth + r32", 16384, 1152, "modulate", 32),
    ("Large-DiT qkv in, RMSNorm + modulate", 16384, 1536, "rms + modulate", 0),
    ("PixArt fc1 in, residual + LayerNorm + modulate", 16384, 1152, "residual + modulate", 0),
    ("residual + diffusers RMSNorm + modulate", 16384, 3072, "residual + rms_cast w, b + modulate", 0),
    ("affine LayerNorm", 16384, 1536, "affine LayerNorm", 0),
]
TOKENS = 256  # DiT-XL/2 at 256×256: rows are samples × 256 tokens
LAUNCHES = [(e, w) for e in (4096, 8192, 9216, 16384) for w in (1, 2, 4, 8)]  # the defaults among them
# the producers whose launch sweeps chose the defaults (sweeping every row would pass the suite part's 10 minutes)
SWEPT = ("gelu_tanh", "modulate")


def reference(x, inv_smooth, activation, mod, lowrank, norm=None, residual=None):
    """The op's work in PyTorch: the reference codes, then the low-rank codes appended (and x + update)."""
    codes, scales = quantize_rows_fp8_reference(x, inv_smooth, activation, mod, residual, norm)
    if lowrank:
        spare = torch.empty_like(
            codes[:, : 2 * lowrank[0].shape[1]]
        )  # as bytes: inductor's e4m3 cat fails on Triton 3.6
        codes = torch.cat([codes.view(torch.uint8), spare.view(torch.uint8)], dim=1).view(torch.float8_e4m3fn)
        append_lowrank_codes_reference(codes, *lowrank)
    return (codes, scales) if residual is None else (codes, scales, residual_added(x, residual, 1))


def producer_alone(x, activation, mod, norm, residual):
    """The producer without the quantization: what bf16 computes."""
    x = x if residual is None else residual_added(x, residual, 1)
    if mod is not None:
        return modulated(x, mod, norm)
    return activate(x, activation) if norm is None else normalized(x, norm)


def measure(name: str, m: int, k: int, producer: str, rank: int) -> dict:
    activation, kind, affine, modulate, add = PRODUCERS[producer]
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    x = randn(m, k) * 2
    inv_smooth = torch.rand(k, device="cuda", generator=g) + 0.5 if rank else None
    lowrank = ()
    if rank:  # as `ditq.kernels.fp8._lowrank_parts` makes them
        down, _ = fp8_quantize(torch.randn(rank, k, device="cuda", generator=g) * 0.05)
        lowrank = (down.t().contiguous(), 1 / down.float().abs().sum(1).reshape(1, -1))
    mod = Modulation(randn(m // TOKENS, k), randn(m // TOKENS, k), TOKENS, 1e-6) if modulate else None
    weight, bias = (randn(k) + 1, randn(k) * 0.1 if kind != "rms" else None) if affine else (None, None)
    norm = None if kind is None else Norm(kind, 1e-6, weight, bias)
    residual = Residual(randn(m, k)) if add else None
    op_args = (x, inv_smooth, activation, *(mod[:2] if mod else (None, None)), TOKENS if mod else 1, 1e-6,
               *(lowrank or (None, None)), None if residual is None else residual.update)  # fmt: skip
    op_kwargs = {} if norm is None else dict(norm=kind, norm_weight=weight, norm_bias=bias)
    ref_codes, ref_scales, *_ = reference(x, inv_smooth, activation, mod, lowrank, norm, residual)
    codes, scales, _ = quantize_rows(*op_args, **op_kwargs)
    row = {
        "case": name, "M": m, "K": k, "producer": producer, "rank": rank,
        "codes_differing": float((codes.float() != ref_codes.float()).float().mean()),
        "scales_max_rel_diff": float(((scales - ref_scales).abs() / ref_scales).max()),
    }  # fmt: skip
    compiled = torch.compile(reference, fullgraph=True, dynamic=False)
    row["inductor_us"] = bench(lambda: compiled(x, inv_smooth, activation, mod, lowrank, norm, residual))
    alone = torch.compile(producer_alone, fullgraph=True, dynamic=False)
    row["bf16_producer_us"] = bench(lambda: alone(x, activation, mod, norm, residual))
    if producer in SWEPT:
        row["launches"] = {
            f"{e} elements, {w} warps": bench(
                lambda e=e, w=w: quantize_rows_fp8(x, inv_smooth, activation, mod, row_elements=e, num_warps=w)
            )
            for e, w in LAUNCHES
        }
    row["kernel_us"] = bench(lambda: quantize_rows(*op_args, **op_kwargs))  # the default launch
    reads = 2 if residual else 1  # x (and the update); the codes; the sum (with a residual)
    row["ideal_us_at_4.3tbps"] = (m * k * (2 * reads + 1 + 2 * bool(residual)) + m * 4 + m * rank * 2) / 4.3e12 * 1e6
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
        write_json(args.out.with_suffix(".json"), meta | {"rows": rows}, indent=1)  # partial kept
    lines = [f"# FP8 input pre-pass, {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}", "",
             "| case | inductor µs | kernel µs | × inductor | bf16 producer alone µs | ideal µs | codes ≠ ref |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['case']} ({r['M']}×{r['K']}) | {r['inductor_us']:.1f} | {r['kernel_us']:.1f} | "
            f"{r['inductor_us'] / r['kernel_us']:.2f} | {r.get('bf16_producer_us', float('nan')):.1f} | "
            f"{r['ideal_us_at_4.3tbps']:.1f} | {r['codes_differing']:.1e} |"
        )
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

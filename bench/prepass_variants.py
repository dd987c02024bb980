"""Experiment behind the pre-pass's speed: is `ditq::quantize_rows_fp8` bound by memory, by its launch, or by the
arithmetic of matching the reference's roundings?

    python bench/prepass_variants.py --out bench/results/prepass_variants_h200.json [--grid] [--only NAME]   # GPU

At DiT-XL/2's batch-64 inputs (16,384 rows) it times, as kernels alone (`timing.replay_us`):
- the library kernel at its default launch (`--grid`: over a grid of launches, rows per program × warps) for
  each input it serves: the attention output (no producer), qkv's LayerNorm + modulate, fc1's with the residual
  add, fc2's GELU-tanh;
- the multi-pass kernel (the one for rows too wide to hold: it walks K once per step, BLOCK_M rows × BLOCK_K
  columns at a time) at these widths, for inputs without a residual add: whether a kernel that loops over K in
  tiles, as one computing P in its loop would, can keep up;
- the same with float32 x, where the kernel rounds nothing to x's dtype: if that is faster despite reading twice
  the bytes, the roundings (conversion instructions) bound it, not memory;
- `x.clone()` of a bf16 x: what reading and writing the same bytes costs the GPU's own copy kernel;
- SVDQuant's inputs (smoothed, rank-32 P appended by its own kernel), and smoothed alone: what the smoothing and
  the branch add. (P computed inside the one-pass kernel, 16 rows in 8 warps, took 84 µs against 42 for the
  attention output and 137 against 90 for fc1's input on an H200, 2026-12-04: removed.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import triton
from timing import replay_us

from ditq.kernels.reference import Modulation, Residual
from ditq.kernels.triton import rowquant
from ditq.kernels.triton.rowquant import quantize_rows_fp8
from ditq.quant.primitives import fp8_quantize

M, TOKENS = 16384, 256
MULTI_PASS_LAUNCHES = [(16, 128), (32, 128), (16, 256), (64, 64)]
CASES = [  # (name, K, producer, dtype)
    ("attn out", 1152, "none", torch.bfloat16),
    ("qkv: LayerNorm + modulate", 1152, "modulate", torch.bfloat16),
    ("qkv: LayerNorm + modulate, float32 x", 1152, "modulate", torch.float32),
    ("fc1: residual + LayerNorm + modulate", 1152, "residual", torch.bfloat16),
    ("fc2: GELU-tanh", 4608, "gelu_tanh", torch.bfloat16),
    ("fc2: GELU-tanh, float32 x", 4608, "gelu_tanh", torch.float32),
    # SVDQuant's inputs: smoothed, and the branch's P appended by its own kernel
    ("attn out, smoothed + r32", 1152, "none+svdquant", torch.bfloat16),
    ("fc1: residual + LayerNorm + modulate, smoothed + r32", 1152, "residual+svdquant", torch.bfloat16),
    ("fc2: GELU-tanh, smoothed + r32", 4608, "gelu_tanh+svdquant", torch.bfloat16),
    # the smoothing alone (no branch): what it costs each input at each launch
    ("attn out, smoothed", 1152, "none+smooth", torch.bfloat16),
    ("qkv: LayerNorm + modulate, smoothed", 1152, "modulate+smooth", torch.bfloat16),
    ("fc1: residual + LayerNorm + modulate, smoothed", 1152, "residual+smooth", torch.bfloat16),
    ("fc2: GELU-tanh, smoothed", 4608, "gelu_tanh+smooth", torch.bfloat16),
]


def padded_width(k: int) -> int:
    """The kernel's head + tail tiles for a row of k."""
    return sum(rowquant.row_tiles(k))


def launches(k: int) -> list[tuple[int, int]]:
    """(rows per program, warps) worth trying at width k: at most 16,384 elements, at least 4 per thread."""
    rows = [r for r in (1, 2, 4, 8, 16) if r * padded_width(k) <= 16384]
    return [(r, w) for r in rows for w in (1, 2, 4, 8) if r * padded_width(k) >= 32 * w * 4]


def measure(name: str, k: int, producer: str, dtype: torch.dtype, grid: bool, multi_pass: bool) -> dict:
    pos, kwargs = case_inputs(k, producer, dtype)
    row = {"case": name, "K": k, "default_us": replay_us(lambda: quantize_rows_fp8(*pos, **kwargs))}
    if multi_pass and "residual" not in kwargs:
        for blocks in MULTI_PASS_LAUNCHES:
            with patched(rowquant, MAX_RESIDENT=0, MULTI_PASS_BLOCKS=blocks):
                row[f"multi-pass {blocks[0]} rows × {blocks[1]} columns"] = replay_us(
                    lambda: quantize_rows_fp8(*pos, **kwargs)
                )
    for rows, warps in launches(k) if grid else ():
        elements = rows * padded_width(k)
        row[f"{rows} rows, {warps} warps"] = replay_us(
            lambda e=elements, w=warps: quantize_rows_fp8(*pos, **kwargs, row_elements=e, num_warps=w), rep=50
        )
    return row


@contextlib.contextmanager
def patched(module, **values):
    """The module's constants set to `values` for the block."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def case_inputs(k: int, producer: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    producer, _, smoothing = producer.partition("+")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, k, device="cuda", generator=g).to(dtype) * 2
    inv_smooth = torch.rand(k, device="cuda", generator=g) + 0.5 if smoothing else None
    kwargs = {}
    if smoothing == "svdquant":  # rank 32 as `ditq.kernels.fp8._lowrank_parts` makes it
        down, _ = fp8_quantize(torch.randn(32, k, device="cuda", generator=g) * 0.05)
        kwargs["lowrank"] = (down.t().contiguous(), 1 / down.float().abs().sum(1).reshape(1, -1))
    if producer in ("none", "gelu_tanh"):
        return (x, inv_smooth, producer), kwargs
    shift, scale, gate = torch.randn(3, M // TOKENS, k, device="cuda", generator=g).to(dtype)
    if producer == "residual":
        update = torch.randn(M, k, device="cuda", generator=g).to(dtype)
        kwargs |= {"residual": Residual(update, gate), "residual_out": torch.empty_like(x)}
    return (x, inv_smooth, "none", Modulation(shift, scale, TOKENS, 1e-6)), kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", action="store_true", help="also time the one-pass kernel's launch grid")
    parser.add_argument("--no-multi-pass", action="store_true", help="leave the multi-pass kernel's rows out")
    parser.add_argument("--only", default="", help="only the cases whose name contains this")
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "M": M,
              "rows": []}  # fmt: skip
    for k in (1152, 4608):
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        result["rows"].append({"case": f"x.clone() bf16 K={k}", "us": replay_us(x.clone)})
    for case in [case for case in CASES if args.only in case[0]]:
        row = measure(*case, grid=args.grid, multi_pass=not args.no_multi_pass)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

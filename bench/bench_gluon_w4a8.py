"""The Gluon W4A8-FP8 GEMM for Hopper (`ditq/kernels/triton/gluon_w4a8.py`): checked against its float64
reference, then timed against cuBLAS FP8 on an 8-bit e4m3 weight copy and bf16 cuBLAS, kernels alone, same run.

    python bench/bench_gluon_w4a8.py --out $OUT/gluon_w4a8_h100

Checks first (their results are in the JSON; the exit status is 1 if one fails, after everything is written):
- codes, bit for bit: one-hot activation rows (x = I, scales 1, float32 out) return the weight codes themselves,
  for every code width and grouping: the re-packed layout, the conversion and the epilogue's transpose;
- integers, bit for bit: activations in {−1, 0, 1}, power-of-two scales and bias: every partial sum is an
  integer below 2^12 (so exact in any tensor-core accumulation that keeps 13 significant bits) and every
  scaling exact, so the float32 output equals the reference; cuBLAS FP8 is run on the same data beside it;
- random data at each timed shape (its first 256 rows): |y − ref| ≤ bound, from the accumulation order: each k32 tensor-core
  product adds 32 terms to its accumulator keeping at least 13 significant bits (cuBLAS's fast accumulation
  on Hopper, the FP8 backends' default), so per output |err| ≤ (terms accumulated on the tensor cores / 32) ·
  2^-13 · Σ|x·w|, plus float32 roundings of the group scalings and one rounding to bf16. cuBLAS's error on
  the same data (fast accumulation, per channel) is recorded beside it.
Timings: µs per GEMM, the median of CUDA-graph replays (`bench/timing.py`) over `layers` distinct weights in
sequence (more weight bytes than the L2 holds), every variant on the same e4m3 activation codes and row scales,
bias added, bf16 out.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from timing import replay_us

from ditq.atomic import write_json, write_text
from ditq.kernels.triton.expand import expand_to_fp8
from ditq.kernels.triton.gluon_w4a8 import LAUNCH, gluon_w4a8_linear, gluon_w4a8_reference
from ditq.kernels.triton.wgmma_codes import repack_for_wgmma
from ditq.quant.packing import pack, to_unsigned
from ditq.quant.primitives import fp8_quantize

SHAPES = [  # (name, M, K, N)
    ("DiT-XL/2 qkv B64", 16384, 1152, 3456),
    ("DiT-XL/2 fc1 B64", 16384, 1152, 4608),
    ("DiT-XL/2 fc2 B64", 16384, 4608, 1152),
    ("DiT-XL/2 qkv B2", 512, 1152, 3456),
    ("DiT-XL/2 fc1 B2", 512, 1152, 4608),
    ("DiT-XL/2 fc2 B2", 512, 4608, 1152),
    ("FLUX 3072→3072", 4608, 3072, 3072),
    ("FLUX 3072→12288", 4608, 3072, 12288),
    ("FLUX 12288→3072", 4608, 12288, 3072),
]
VARIANTS = {  # name: (bits, ternary, group_size)
    "int4": (4, False, None),
    "int4_g128": (4, False, 128),
    "int4_g64": (4, False, 64),
    "ternary": (2, True, None),
}
WIDTHS = [(4, False), (3, False), (2, False), (2, True)]
SIGNIFICANT_BITS = 13  # kept by the tensor cores' FP8 accumulation, at least (the bound's assumption)
CHECKED_ROWS = (
    256  # rows of each timed shape checked against the float64 reference (its per-group sums are large)
)


def codes(n: int, k: int, bits: int, ternary: bool, generator: torch.Generator) -> torch.Tensor:
    """Random signed codes over the whole range, int8 (n, k) on the GPU."""
    low, high = (-1, 2) if ternary else (-(2 ** (bits - 1)), 2 ** (bits - 1))
    return torch.randint(low, high, (n, k), generator=generator, device="cuda", dtype=torch.int8)


def packed(q: torch.Tensor, bits: int, ternary: bool) -> torch.Tensor:
    return repack_for_wgmma(pack(to_unsigned(q, bits, ternary), bits), bits, q.shape[1])


def check_codes(bits: int, ternary: bool, group: int | None, launch: dict) -> dict:
    """One-hot rows: out[m, n] = q[n, m], exactly."""
    g = torch.Generator(device="cuda").manual_seed(bits)
    k = n = 256
    q = codes(n, k, bits, ternary, g)
    x = torch.eye(k, device="cuda").to(torch.float8_e4m3fn)
    scales = torch.ones(n, k // (group or k), device="cuda")
    y = gluon_w4a8_linear(x, torch.ones(k, 1, device="cuda"), packed(q, bits, ternary), scales, None, bits=bits,
                          ternary=ternary, group_size=group, out_dtype=torch.float32, **launch)  # fmt: skip
    wrong = int((y != q.t().float()).sum())
    return {
        "check": "codes",
        "bits": bits,
        "ternary": ternary,
        "group": group,
        "wrong": wrong,
        "ok": wrong == 0,
    }


def check_integers(bits: int, ternary: bool, group: int | None, launch: dict) -> dict:
    """x ∈ {−1, 0, 1}, power-of-two scales, bias on a 2^-3 grid, K = 256: exact in float32."""
    g = torch.Generator(device="cuda").manual_seed(10 + bits)
    m, k, n = 384, 256, 384
    q = codes(n, k, bits, ternary, g)
    x = torch.randint(-1, 2, (m, k), generator=g, device="cuda").float().to(torch.float8_e4m3fn)
    x_scale = torch.exp2(torch.randint(-3, 4, (m, 1), generator=g, device="cuda").float())
    scales = torch.exp2(torch.randint(-3, 4, (n, k // (group or k)), generator=g, device="cuda").float())
    bias = torch.randint(-64, 64, (n,), generator=g, device="cuda").float() / 8
    w = packed(q, bits, ternary)
    y = gluon_w4a8_linear(x, x_scale, w, scales, bias, bits=bits, ternary=ternary, group_size=group,
                          out_dtype=torch.float32, **launch)  # fmt: skip
    ref = gluon_w4a8_reference(x, x_scale, w, scales, bias, bits=bits, ternary=ternary, group_size=group)
    row = {"check": "integers", "bits": bits, "ternary": ternary, "group": group,
           "wrong": int((y.double() != ref).sum())}  # fmt: skip
    if group is None:  # cuBLAS FP8 on the e4m3 copy, the same data
        cublas = torch._scaled_mm(x, q.float().to(torch.float8_e4m3fn).t(), scale_a=x_scale,
                                  scale_b=scales.reshape(1, n).contiguous(), out_dtype=torch.float32,
                                  use_fast_accum=True) + bias  # fmt: skip
        row["cublas_wrong"] = int((cublas.double() != ref).sum())
    return row | {"ok": row["wrong"] == 0}


def error_bound(x, x_scale, q, scales, group: int | None, y_ref: torch.Tensor) -> torch.Tensor:
    """Per output, the float32 result's error e ≤ ((tensor-core terms / 32) · 2^-13 + float32 steps · 2^-24) ·
    Σ|x·w|, then the rounding to bf16: ≤ 2^-8 · |y_ref + e|, so |y − y_ref| ≤ 2^-8·|y_ref| + (1 + 2^-8)·e."""
    k = x.shape[1]
    span = group or k  # columns the tensor cores accumulate before a float32 step
    weight = q.float() * scales.repeat_interleave(span, dim=1)
    magnitude = (x.float().abs() * x_scale) @ weight.abs().t()
    float32_steps = k // span + 3  # the group scalings, then the channel and row scales and the bias
    accumulated = magnitude * ((span / 32) * 2.0**-SIGNIFICANT_BITS + float32_steps * 2.0**-24)
    return y_ref.abs() * 2.0**-8 + (1 + 2.0**-8) * accumulated


def measure(name: str, m: int, k: int, n: int, launch: dict) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = 8 if m > 2048 else 32
    x_codes, s_x = fp8_quantize(torch.randn(m, k, device="cuda", generator=g))
    s_x = s_x.float().contiguous()
    x_bf16 = (x_codes.float() * s_x).to(torch.bfloat16)
    bias = [torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) for _ in range(layers)]
    row = {"shape": name, "M": m, "K": k, "N": n, "layers": layers}
    bf16 = [torch.randn(n, k, device="cuda", generator=g).to(torch.bfloat16) / k**0.5 for _ in range(layers)]
    row["bf16_us"] = (
        replay_us(lambda: [F.linear(x_bf16, w, b) for w, b in zip(bf16, bias, strict=True)]) / layers
    )
    for variant, (bits, ternary, group) in VARIANTS.items():
        q = [codes(n, k, bits, ternary, g) for _ in range(layers)]
        scales = [torch.rand(n, k // (group or k), device="cuda", generator=g) / k**0.5 + 1e-3 for _ in q]
        weights = [packed(qi, bits, ternary) for qi in q]

        def fused(i, scales=scales, weights=weights, bits=bits, ternary=ternary, group=group):
            return gluon_w4a8_linear(x_codes, s_x, weights[i], scales[i], bias[i], bits=bits, ternary=ternary,
                                     group_size=group, **launch)  # fmt: skip

        try:
            y = fused(0)[:CHECKED_ROWS].double()
            ref = gluon_w4a8_reference(x_codes[:CHECKED_ROWS], s_x[:CHECKED_ROWS], weights[0], scales[0], bias[0],
                                       bits=bits, ternary=ternary, group_size=group)  # fmt: skip
            bound = error_bound(x_codes[:CHECKED_ROWS], s_x[:CHECKED_ROWS], q[0], scales[0], group, ref)
            row[f"{variant}_err_over_bound"] = float(((y - ref).abs() / bound).max())
            row[f"{variant}_rel_err"] = float((y - ref).norm() / ref.norm())
            row[f"{variant}_us"] = replay_us(lambda: [fused(i) for i in range(layers)]) / layers
        except Exception:  # one variant's failure (a compile error, out of resources) must not lose the rest
            row[f"{variant}_error"] = traceback.format_exc(limit=3)[-1500:]
        if variant == "int4":  # cuBLAS FP8 on the e4m3 copy of the same int4 weights (`fp8-cached`)
            cached = [(expand_to_fp8(pack(to_unsigned(qi, bits), bits), bits, k), s.reshape(1, n).contiguous())
                      for qi, s in zip(q, scales, strict=True)]  # fmt: skip

            def scaled_mm(i, cached=cached):
                return torch._scaled_mm(x_codes, cached[i][0].t(), scale_a=s_x, scale_b=cached[i][1], bias=bias[i],
                                        out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip

            ref = gluon_w4a8_reference(x_codes[:CHECKED_ROWS], s_x[:CHECKED_ROWS], weights[0], scales[0], bias[0],
                                       bits=4)  # fmt: skip
            row["cublas_fp8_rel_err"] = float(
                (scaled_mm(0)[:CHECKED_ROWS].double() - ref).norm() / ref.norm()
            )
            row["cublas_fp8_us"] = replay_us(lambda: [scaled_mm(i) for i in range(layers)]) / layers
            del cached
        del q, scales, weights
    for key in ["cublas_fp8", *VARIANTS]:
        if f"{key}_us" in row:
            row[f"{key}_x_bf16"] = row["bf16_us"] / row[f"{key}_us"]
    if "int4_us" in row:
        row["int4_x_cublas_fp8"] = row["cublas_fp8_us"] / row["int4_us"]
    return row


def launch_overrides(text: str) -> dict[str, int]:
    """`stages=3,maxnreg=200` → {"stages": 3, "maxnreg": 200}, keys of the default launch only."""
    pairs = dict(item.split("=", 1) for item in text.split(",") if item)
    unknown = set(pairs) - set(LAUNCH)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown launch settings {sorted(unknown)}; known: {sorted(LAUNCH)}")
    return {key: int(value) for key, value in pairs.items()}


def table(env: dict, checks: list[dict], rows: list[dict]) -> str:
    failed = [c for c in checks if not c["ok"]]
    lines = [
        f"# Gluon W4A8-FP8 GEMM — {env['gpu']}, torch {env['torch']}, Triton {env['triton']}",
        "",
        f"Launch {env['launch']}, 128 tokens × 128 output channels per tile. µs per GEMM (median of CUDA-graph",
        "replays over `layers` distinct weights), × = bf16 / row, same run; every variant: the same e4m3 activation",
        "codes and row scales, bias, bf16 out. cuBLAS FP8 = `_scaled_mm` (fast accumulation) on an 8-bit e4m3 copy of the",
        "int4 codes (`fp8-cached`); int4 / g128 / g64 / ternary = the Gluon kernel on the packed codes.",
        "",
        f"Exact checks: {len(checks) - len(failed)} of {len(checks)} passed"
        + ("" if not failed else f"; FAILED: {json.dumps(failed)}"),
        "",
        "| shape | M×K×N | bf16 | cuBLAS FP8 (×) | int4 (×) | int4 g128 (×) | int4 g64 (×) | ternary (×) "
        "| int4 ÷ cuBLAS | max err / bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[f'{key}_us']:.1f} ({r[f'{key}_x_bf16']:.2f}×)" if f"{key}_us" in r else "error"
                 for key in ("cublas_fp8", *VARIANTS)]  # fmt: skip
        worst = max((r.get(f"{v}_err_over_bound", float("nan")) for v in VARIANTS), default=float("nan"))
        speed = f"{r['int4_x_cublas_fp8']:.2f}×" if "int4_x_cublas_fp8" in r else "—"
        lines.append(f"| {r['shape']} | {r['M']}×{r['K']}×{r['N']} | {r['bf16_us']:.1f} | " + " | ".join(cells)
                     + f" | {speed} | {worst:.2g} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.environ["OUT"], "gluon_w4a8") if "OUT" in os.environ else None
    parser.add_argument(
        "--out", default=default, required=default is None, help="stem: writes <out>.json, .md"
    )
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--launch", type=launch_overrides, default={},
                        help="launch settings instead of the default's, e.g. stages=3")  # fmt: skip
    args = parser.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "launch": LAUNCH | args.launch}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    checks = []
    for bits, ternary in WIDTHS:
        for group in (None, 64, 128):
            for check in (check_codes, check_integers):
                try:
                    checks.append(check(bits, ternary, group, args.launch))
                except Exception:
                    checks.append({"check": check.__name__, "bits": bits, "ternary": ternary, "group": group,
                                   "ok": False, "error": traceback.format_exc(limit=3)[-1500:]})  # fmt: skip
                print(json.dumps(checks[-1]), flush=True)
    rows = []
    wanted = None if args.shapes is None else set(args.shapes.split(","))
    for shape in SHAPES:
        if wanted is None or shape[0] in wanted:
            rows.append(measure(*shape, args.launch))
            print(json.dumps(rows[-1]), flush=True)
            write_json(args.out + ".json", {"env": env, "checks": checks, "rows": rows}, indent=2)
    write_json(args.out + ".json", {"env": env, "checks": checks, "rows": rows}, indent=2)
    write_text(args.out + ".md", table(env, checks, rows))
    print(table(env, checks, rows))
    bounded = all(r.get(f"{v}_err_over_bound", 0.0) <= 1.0 for r in rows for v in VARIANTS)
    return 0 if bounded and all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""GEMM-level timings of the FP8 path at DiT-XL/2's linear shapes, against bf16 and cuBLAS FP8, same run.

    python bench/bench_kernels.py --out bench/results/kernels_h100

For each (M, K, N): bf16 `F.linear`; cuBLAS FP8 row-wise `_scaled_mm` on pre-quantized operands (the
ceiling); ditq's "fp8" backend (activation quantization + int4 → FP8 expansion + `_scaled_mm`) and
"fp8-cached" (expansion done ahead); and the two Triton kernels alone. Medians of `triton.testing.do_bench`;
every ditq row is checked against the reference first (relative error printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from ditq.kernels import prepare_for_inference
from ditq.kernels.triton.act_quant import quantize_rows_fp8
from ditq.kernels.triton.expand import expand_to_fp8
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

# (name, M, K, N): DiT-XL/2 at batch 64 (32 images + CFG, 256 tokens) and batch 2; adaLN sees one row per sample.
SHAPES = [
    ("qkv B64", 16384, 1152, 3456), ("proj B64", 16384, 1152, 1152), ("fc1 B64", 16384, 1152, 4608),
    ("fc2 B64", 16384, 4608, 1152), ("adaLN B64", 64, 1152, 6912),
    ("qkv B2", 512, 1152, 3456), ("fc1 B2", 512, 1152, 4608), ("fc2 B2", 512, 4608, 1152), ("adaLN B2", 2, 1152, 6912),
]
SPEC = QuantSpec(w_bits=4, a_bits=8, a_format="fp8")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def measure(name: str, m: int, k: int, n: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    linear = torch.nn.Linear(k, n, device="cuda")
    layer = QuantLinear.from_linear(linear, SPEC).to(torch.bfloat16)
    w_bf16 = linear.weight.detach().to(torch.bfloat16)
    bias = linear.bias.detach().to(torch.bfloat16)
    ref = layer(x).float()
    row = {"shape": name, "M": m, "K": k, "N": n, "bf16_ms": bench(lambda: F.linear(x, w_bf16, bias))}
    x_q, s_x = quantize_rows_fp8(x)
    w_q = expand_to_fp8(layer.qweight, 4, k)
    s_w = layer.scales.reshape(1, n).contiguous()
    row["cublas_fp8_ms"] = bench(lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=s_x, scale_b=s_w, bias=bias,
                                                          out_dtype=torch.bfloat16))
    row["act_quant_ms"] = bench(lambda: quantize_rows_fp8(x))
    row["expand_ms"] = bench(lambda: expand_to_fp8(layer.qweight, 4, k))
    for backend in ("fp8", "fp8-cached"):
        prepare_for_inference(layer, backend)
        out = layer(x).float()
        row[f"{backend}_rel_err"] = float((out - ref).norm() / ref.norm())
        row[f"{backend}_ms"] = bench(lambda: layer(x))
    for key in ("cublas_fp8", "fp8", "fp8-cached"):
        row[f"{key}_x_bf16"] = row["bf16_ms"] / row[f"{key}_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    args = parser.parse_args()
    rows = [measure(*shape) for shape in SHAPES]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    lines = [
        f"# FP8-path GEMMs at DiT-XL/2 shapes — {env['gpu']}, torch {env['torch']}, Triton {env['triton']}",
        "",
        "W4 per-channel (int4 codes) × A8 FP8 per token, bf16 out. Median µs of `triton.testing.do_bench`;",
        "× = bf16 time / row time, same run. `fp8` = activation quant + int4→FP8 expansion + cuBLAS FP8;",
        "`fp8-cached` = the expansion done ahead (8-bit weights in memory).",
        "",
        "| shape | M×K×N | bf16 µs | cuBLAS FP8 µs (×) | act quant µs | expand µs | fp8 µs (×) | fp8-cached µs (×) | rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['M']}×{r['K']}×{r['N']} | {1e3 * r['bf16_ms']:.1f} | "
            f"{1e3 * r['cublas_fp8_ms']:.1f} ({r['cublas_fp8_x_bf16']:.2f}×) | {1e3 * r['act_quant_ms']:.1f} | "
            f"{1e3 * r['expand_ms']:.1f} | {1e3 * r['fp8_ms']:.1f} ({r['fp8_x_bf16']:.2f}×) | "
            f"{1e3 * r['fp8-cached_ms']:.1f} ({r['fp8-cached_x_bf16']:.2f}×) | {r['fp8_rel_err']:.1e} |"
        )
    Path(args.out + ".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

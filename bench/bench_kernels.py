"""GEMM-level timings of the FP8 path at DiT-XL/2's linear shapes, against bf16 and cuBLAS FP8, same run.

    python bench/bench_kernels.py --out bench/results/kernels_h100

Each (M, K, N) is timed as a model runs it: a LayerNorm producing the GEMM's input, then the linear, compiled
together (so the FP8 backends' activation quantization fuses into the LayerNorm kernel, as in a DiT block):
bf16 `F.linear`; ditq's "fp8" backend (int4 → FP8 expansion + `_scaled_mm`, quantization fused) and
"fp8-cached" (expansion done ahead). Beside them, not compiled: cuBLAS FP8 row-wise `_scaled_mm` on
pre-quantized operands (the GEMM's ceiling) and the expansion kernel alone. Medians of CUDA-graph replays
(`bench/timing.py` says why); every ditq row is checked against the reference first (relative error printed).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from timing import replay_us

from ditq.atomic import write_json, write_text
from ditq.kernels import prepare_for_inference
from ditq.kernels.triton.expand import expand_to_fp8
from ditq.kernels.triton.lowbit_gemm import lowbit_linear
from ditq.quant.primitives import fp8_cast, fp8_scale
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

# (name, M, K, N): DiT-XL/2 at batch 64 (32 images + CFG, 256 tokens) and batch 2; adaLN sees one row per sample.
SHAPES = [
    ("qkv B64", 16384, 1152, 3456),
    ("proj B64", 16384, 1152, 1152),
    ("fc1 B64", 16384, 1152, 4608),
    ("fc2 B64", 16384, 4608, 1152),
    ("adaLN B64", 64, 1152, 6912),
    ("qkv B2", 512, 1152, 3456),
    ("fc1 B2", 512, 1152, 4608),
    ("fc2 B2", 512, 4608, 1152),
    ("adaLN B2", 2, 1152, 6912),
]
SPEC = QuantSpec(w_bits=4, a_bits=8, a_format="fp8")


def bench(fn, rep: int = 200) -> float:
    """ms per call (`bench/timing.py`)."""
    return replay_us(fn, rep) / 1e3


def measure(name: str, m: int, k: int, n: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    linear = torch.nn.Linear(k, n, device="cuda")
    layer = QuantLinear.from_linear(linear, SPEC).to(torch.bfloat16)
    w_bf16 = linear.weight.detach().to(torch.bfloat16)
    bias = linear.bias.detach().to(torch.bfloat16)
    ref = layer(F.layer_norm(x, (k,))).float()
    torch._dynamo.reset()
    bf16 = torch.compile(
        lambda x: F.linear(F.layer_norm(x, (k,)), w_bf16, bias), fullgraph=True, dynamic=False
    )
    row = {"shape": name, "M": m, "K": k, "N": n, "bf16_ms": bench(lambda: bf16(x))}
    h = F.layer_norm(x, (k,))
    s_x = fp8_scale(h)
    x_q = fp8_cast(h, s_x)
    w_q = expand_to_fp8(layer.qweight, 4, k)
    s_w = layer.scales.reshape(1, n).float().contiguous()
    row["cublas_fp8_ms"] = bench(
        lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=s_x, scale_b=s_w, bias=bias, out_dtype=torch.bfloat16)
    )
    row["expand_ms"] = bench(lambda: expand_to_fp8(layer.qweight, 4, k))
    for backend in ("fp8", "fp8-cached", "lowbit"):
        prepare_for_inference(layer, backend)
        torch._dynamo.reset()
        fn = torch.compile(lambda x: layer(F.layer_norm(x, (k,))), fullgraph=True, dynamic=False)
        row[f"{backend}_rel_err"] = float((fn(x).float() - ref).norm() / ref.norm())
        row[f"{backend}_ms"] = bench(functools.partial(fn, x))
    for key in ("cublas_fp8", "fp8", "fp8-cached", "lowbit"):
        row[f"{key}_x_bf16"] = row["bf16_ms"] / row[f"{key}_ms"]
    return row


LOWBIT_CONFIGS = [(bn, bk, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]


def tune_lowbit() -> list[dict]:
    """Raw lowbit GEMM time per launch config at the few-row shapes it serves (int4 per channel, bf16)."""
    results = []
    for m in (2, 64, 512):
        for k, n in ((1152, 6912), (1152, 3456), (4608, 1152)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q = QuantLinear.from_linear(torch.nn.Linear(k, n, device="cuda"), QuantSpec(w_bits=4))
            timed = []
            for bn, bk, warps, stages in LOWBIT_CONFIGS:
                fn = functools.partial(
                    lowbit_linear,
                    x,
                    q.qweight,
                    q.scales,
                    None,
                    None,
                    bits=4,
                    offset=8,
                    group_size=None,
                    block_n=bn,
                    block_k=bk,
                    num_warps=warps,
                    num_stages=stages,
                )
                try:
                    timed.append(((bn, bk, warps, stages), bench(fn, rep=40)))
                except triton.runtime.errors.OutOfResources:  # too much shared memory for this GPU
                    continue
            results.append({"M": m, "K": k, "N": n, "best": sorted(timed, key=lambda t: t[1])[:4]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    args = parser.parse_args()
    tuning = tune_lowbit()
    write_json(args.out + ".tuning.json", tuning, indent=None)  # kept if a later row runs out of time
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        with open(args.out + ".rows.jsonl", "a") as partial:
            partial.write(json.dumps(rows[-1]) + "\n")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    lines = [
        f"# FP8-path GEMMs at DiT-XL/2 shapes — {env['gpu']}, torch {env['torch']}, Triton {env['triton']}",
        "",
        "W4 per-channel (int4 codes) × A8 FP8 per token, bf16 out. Median µs of CUDA-graph replays;",
        "× = bf16 time / row time, same run. bf16, `fp8` and `fp8-cached` rows time LayerNorm → linear compiled",
        "together (the activation quantization fuses into the LayerNorm); `fp8` expands int4 → FP8 per call,",
        "`fp8-cached` ahead (8-bit weights in memory). cuBLAS FP8 = the GEMM alone on pre-quantized operands.",
        "",
        "`lowbit` = the Triton GEMM that reads the int4 codes directly (activations fake-quantized to FP8 first);",
        "the `fp8` backend hands it calls of ≤ 128 rows.",
        "",
        "| shape | M×K×N | LN+bf16 µs | cuBLAS FP8 GEMM µs (×) | expand µs | LN+fp8 µs (×) | LN+fp8-cached µs (×) "
        "| LN+lowbit µs (×) | rel err fp8 / lowbit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['M']}×{r['K']}×{r['N']} | {1e3 * r['bf16_ms']:.1f} | "
            f"{1e3 * r['cublas_fp8_ms']:.1f} ({r['cublas_fp8_x_bf16']:.2f}×) | "
            f"{1e3 * r['expand_ms']:.1f} | {1e3 * r['fp8_ms']:.1f} ({r['fp8_x_bf16']:.2f}×) | "
            f"{1e3 * r['fp8-cached_ms']:.1f} ({r['fp8-cached_x_bf16']:.2f}×) | "
            f"{1e3 * r['lowbit_ms']:.1f} ({r['lowbit_x_bf16']:.2f}×) | {r['fp8_rel_err']:.1e} / {r['lowbit_rel_err']:.1e} |"
        )
    lines += [
        "",
        "Lowbit kernel launch configs (block_n, block_k, warps, stages), raw GEMM µs, best first:",
        "",
    ]
    lines += [
        f"- M={t['M']} K={t['K']} N={t['N']}: " + ", ".join(f"{c} {1e3 * ms:.1f}" for c, ms in t["best"])
        for t in tuning
    ]
    write_json(args.out + ".json", {"env": env, "rows": rows, "lowbit_tuning": tuning}, indent=2)
    write_text(args.out + ".md", "\n".join(lines) + "\n")
    for partial in (".tuning.json", ".rows.jsonl"):  # all in the JSON now
        Path(args.out + partial).unlink()
    print("\n".join(lines))


if __name__ == "__main__":
    main()

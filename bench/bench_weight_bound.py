"""Few-row GEMMs (the adaLN modulation Linears: one row per sample) timed as kernels alone, bf16 cuBLAS against
the lowbit kernel on int4 and ternary codes, same run.

    python bench/bench_weight_bound.py --out bench/results/weight_bound_h200

These GEMMs are bound by their weight bytes, so two things would make a naive timing lie: Python launch time
(tens of µs, more than the kernel) and the L2 cache (a 16 MB bf16 weight fits in it, so repeated calls on one
weight read the cache). Each timing therefore replays a CUDA graph that runs `LAYERS` layers with distinct
weights in sequence, as a model streams its blocks' weights, and reports the time per layer: the median over
replays (`triton.testing.do_bench_cudagraph`). 32 layers of DiT-XL/2's adaLN are 127 MB of int4 codes, over
twice an H200's 60 MB L2 (the committed H200 run used 8 layers, recorded in its JSON: 32 MB of int4 and 16 MB of
ternary codes could stay in the L2, so those lowbit rows are if anything optimistic). Every lowbit output
is compared with the dequantized reference first (the error is recorded in the row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from timing import replay_us

from ditq.atomic import write_json, write_text
from ditq.kernels.triton.expand import expand_to_fp8
from ditq.kernels.triton.lowbit_gemm import effective_split, lowbit_linear
from ditq.quant.packing import signed_offset
from ditq.quant.primitives import fp8_quantize
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

SHAPES = [  # (name, M, K, N)
    ("DiT-XL/2 adaLN, batch 2", 2, 1152, 6912),
    ("DiT-XL/2 adaLN, batch 64", 64, 1152, 6912),
    ("DiT-XL/2 adaLN, batch 128", 128, 1152, 6912),
    ("FLUX adaLN, batch 2", 2, 3072, 18432),
]
WEIGHTS = {"int4": QuantSpec(w_bits=4), "ternary": QuantSpec(w_bits=2, w_format="ternary")}
CONFIGS = [(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256) for st in (3, 4)]
# wider K steps, so that each program has more of its weight bytes in flight at once: the 2026-12-03 H200 run
# read int4 at 0.5 TB/s with the ones above (7.5 µs for 4 MB at batch 2), a sign of too few loads in flight
CONFIGS += [(bn, bk, warps, 2) for bn in (16, 32) for bk in (512, 1024) for warps in (4, 8)]
SPLITS = (2, 4, 8)
LAYERS = 32


def per_layer_us(fn) -> float:
    return replay_us(fn, rep=100) / LAYERS


def measure(name: str, m: int, k: int, n: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    linears = [torch.nn.Linear(k, n, device="cuda") for _ in range(LAYERS)]
    weights = [(lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16)) for lin in linears]
    row = {"shape": name, "M": m, "K": k, "N": n, "bf16_weight_bytes": 2 * k * n}
    row["bf16_us"] = per_layer_us(lambda: [F.linear(x, w, b) for w, b in weights])
    for fmt, spec in WEIGHTS.items():
        layers = [QuantLinear.from_linear(lin, spec).to(torch.bfloat16) for lin in linears]
        row |= {f"{fmt}_{key}": value for key, value in time_lowbit(x, layers, spec).items()}
        if fmt == "int4":
            row["cublas_fp8_cached_us"] = time_cublas_fp8(x, layers)
    return row


def time_cublas_fp8(x: torch.Tensor, layers: list[QuantLinear]) -> float:
    """The FP8 path's GEMM on its cached 8-bit copy (`fp8-cached`), x already quantized."""
    codes, s_x = fp8_quantize(x.float())
    cached = [(expand_to_fp8(layer.qweight, 4, layer.in_features), layer.scales.reshape(1, -1).float(), layer.bias)
              for layer in layers]  # fmt: skip
    return per_layer_us(lambda: [torch._scaled_mm(codes, w.t(), scale_a=s_x, scale_b=s_w, bias=b,
                                                   out_dtype=torch.bfloat16) for w, s_w, b in cached])  # fmt: skip


def time_lowbit(x: torch.Tensor, layers: list[QuantLinear], spec: QuantSpec) -> dict:
    offset = signed_offset(spec.w_bits, spec.w_format == "ternary")

    def run(layer: QuantLinear, config: tuple = (32, None, 4, 3), split_k: int = 1) -> torch.Tensor:
        bn, bk, warps, stages = config
        return lowbit_linear(x, layer.qweight, layer.scales, None, layer.bias, bits=spec.w_bits, offset=offset,
                             group_size=None, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                             split_k=split_k)  # fmt: skip

    ref = F.linear(x.float(), layers[0].dequantized_weight(torch.float32), layers[0].bias.float())
    out = {"rel_err": float((run(layers[0]).float() - ref).norm() / ref.norm())}
    out["weight_bytes"] = layers[0].qweight.numel()
    out["default_us"] = per_layer_us(lambda: [run(layer) for layer in layers])
    timed = {}
    for config in CONFIGS:
        try:
            timed[str(config)] = per_layer_us(lambda c=config: [run(layer, c) for layer in layers])
        except triton.runtime.errors.OutOfResources:
            continue
    best = min(timed, key=timed.get)
    out |= {"configs_us": timed, "best": best, "best_us": timed[best]}
    fastest = sorted((c for c in CONFIGS if str(c) in timed), key=lambda c: timed[str(c)])
    split = {}  # the three fastest launches again, K split over 2–8 programs per tile (as many as share it evenly)
    k = x.shape[1]
    for config in fastest[:3]:
        for split_k in sorted({effective_split(k, config[1], s) for s in SPLITS} - {1}):
            split[f"{config} split {split_k}"] = per_layer_us(
                lambda c=config, s=split_k: [run(layer, c, s) for layer in layers]
            )
    if not split:  # K in one step for each of them: nothing to split
        return out
    best_split = min(split, key=split.get)
    return out | {"split_us": split, "best_split": best_split, "best_split_us": split[best_split]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="path stem for .json and .md")
    args = parser.parse_args()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "layers_per_graph": LAYERS}  # fmt: skip
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("configs_us")}), flush=True)
        write_json(args.out.with_suffix(".json"), meta | {"rows": rows}, indent=1)  # partial kept
    lines = [f"# Weight-bound GEMMs, kernels alone — {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}",
             "", f"µs per layer, median of CUDA-graph replays over {LAYERS} layers with distinct weights; "
             "× = bf16 / lowbit, same run. Best = the best launch config (block_n, block_k, warps, stages); split: "
             "the best of the three fastest with K split over 2–8 programs. cuBLAS FP8: `_scaled_mm` on the cached "
             "8-bit copy, x already quantized.", "",
             "| shape | M×K×N | bf16 µs | cuBLAS FP8 µs (×) | int4 default µs (×) | int4 best µs (×) | int4 split µs (×) "
             "| ternary default µs (×) | ternary best µs (×) | ternary split µs (×) | best configs int4 / ternary |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [f"{r[key]:.2f} ({r['bf16_us'] / r[key]:.2f}×)" if key in r else "—" for key in
                 ["cublas_fp8_cached_us"] + [f"{fmt}_{kind}_us" for fmt in WEIGHTS
                                             for kind in ("default", "best", "best_split")]]  # fmt: skip
        lines.append(f"| {r['shape']} | {r['M']}×{r['K']}×{r['N']} | {r['bf16_us']:.2f} | " + " | ".join(cells)
                     + f" | {r['int4_best']} / {r['ternary_best']} |")  # fmt: skip
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

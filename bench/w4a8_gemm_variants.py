"""Experiment behind `lowbit_linear`'s FP8 mode: which in-register int4 → e4m3 conversion and which operand order.

    python bench/w4a8_gemm_variants.py ptx     # CPU: which wgmma each variant compiles to for sm_90
    python bench/w4a8_gemm_variants.py bench   # GPU: µs per GEMM of each variant and launch, beside cuBLAS FP8

A reduced copy of the kernel (per-channel int4 only) with two switches:
- CONVERT 0: code − 8 → float32 → e4m3 (conversion instructions; what the library kernel does);
  CONVERT 1: the e4m3 bit pattern of (code − 8)·2⁻⁹ built with integer ops (sign-magnitude: |q| ≤ 8 lies in
  e4m3's subnormals and first binade, steps of 2⁻⁹), the 2⁹ folded into the channel scale.
- SWAP 0: acc = X_q · Wᵀ (weights as wgmma's B operand, staged through shared memory);
  SWAP 1: accᵀ = W · X_qᵀ (the converted weights as the A operand, straight from registers).
Timed as `bench_w4a8_gemm.py` times (CUDA-graph replays over distinct weights). The H200 run
(`bench/results/w4a8_gemm_variants_h200.json`): SWAP 1 is 10–12% faster, CONVERT 1 slower (18.1 against 12.9 µs at
qkv B2), and the best variant still takes 1.6–2.4× the time of cuBLAS FP8 on an 8-bit weight copy.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys

import torch
import triton
import triton.language as tl

SHAPES = [("qkv B2", 512, 1152, 3456), ("fc2 B2", 512, 4608, 1152), ("qkv B64", 16384, 1152, 3456),
          ("fc2 B64", 16384, 4608, 1152)]  # fmt: skip
LAUNCHES = [(64, 128, 128, 4, 3), (128, 64, 128, 4, 3), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
            (128, 256, 64, 8, 3), (64, 256, 128, 8, 3)]  # (block_m, block_n, block_k, warps, stages)  # fmt: skip


@triton.jit
def _kernel(x, x_scale, packed, scales, bias, out, M, N, K: tl.constexpr, n_bytes, stride_xm, stride_om,
            CONVERT: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rm < M, rn < N
    x_rows = x + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = packed + rn.to(tl.int64)[:, None] * n_bytes
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_rows + (k0 + rk)[None, :], mask=row_ok[:, None] & (k0 + rk < K)[None, :], other=0.0)
        byte = tl.load(w_rows + (k0 // 2 + rb)[None, :], mask=col_ok[:, None] & (k0 // 2 + rb < n_bytes)[None, :],
                       other=0)  # fmt: skip
        q = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_K)).to(tl.int32) - 8
        if CONVERT == 0:
            w = q.to(tl.float32).to(tl.float8e4nv)
        else:
            w = (tl.abs(q) | ((q >> 24) & 0x80)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        if SWAP:
            acc += tl.dot(w, tl.trans(a), out_dtype=tl.float32)
        else:
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.float32)
    if SWAP:
        acc = tl.trans(acc)
    s = tl.load(scales + rn, mask=col_ok, other=0.0)
    if CONVERT == 1:
        s = s * 512.0
    acc = acc * s[None, :] * tl.load(x_scale + rm, mask=row_ok, other=0.0)[:, None]
    acc += tl.load(bias + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


def launch(x_q, s_x, packed, scales, bias, convert, swap, launch_config):
    bm, bn, bk, warps, stages = launch_config
    m, k = x_q.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x_q.device)
    _kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x_q, s_x, packed, scales, bias, out, m, n, k, packed.shape[1], x_q.stride(0), out.stride(0),
        CONVERT=convert, SWAP=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def show_ptx() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = _kernel.arg_names
    types = dict(x="*fp8e4nv", x_scale="*fp32", packed="*u8", scales="*fp32", bias="*bf16", out="*bf16", M="i32",
                 N="i32", n_bytes="i32", stride_xm="i32", stride_om="i32")  # fmt: skip
    for convert, swap, bm in itertools.product((0, 1), (0, 1), (64, 128)):
        constexprs = dict(K=1152, CONVERT=convert, SWAP=swap, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128)
        signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
        source = ASTSource(_kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["ptx"]
        a_in_registers = bool(re.search(r"wgmma\.mma_async[^\n]*\{[^}]*\}, \{", ptx))
        print(convert, swap, bm, sorted(set(re.findall(r"wgmma\.mma_async[^ ]*", ptx))), "A in registers" * a_in_registers)


def time_variants() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from timing import replay_us

    from ditq.kernels.triton.expand import expand_to_fp8
    from ditq.quant.primitives import fp8_quantize
    from ditq.quant.qlinear import QuantLinear
    from ditq.quant.spec import QuantSpec

    rows = []
    for name, m, k, n in SHAPES:
        torch.manual_seed(0)
        layers = 8 if m > 2048 else 32
        x_q, s_x = fp8_quantize(torch.randn(m, k, device="cuda"))
        s_x = s_x.float().contiguous()
        linears = [torch.nn.Linear(k, n, device="cuda") for _ in range(layers)]
        qs = [QuantLinear.from_linear(lin, QuantSpec(w_bits=4)).requires_grad_(False) for lin in linears]
        biases = [lin.bias.detach().to(torch.bfloat16) for lin in linears]
        cached = [(expand_to_fp8(q.qweight, 4, k), q.scales.reshape(1, n).float().contiguous(), b)
                  for q, b in zip(qs, biases, strict=True)]  # fmt: skip

        def cublas(x_q=x_q, s_x=s_x, cached=cached):
            return [torch._scaled_mm(x_q, w.t(), scale_a=s_x, scale_b=s, bias=b, out_dtype=torch.bfloat16)
                    for w, s, b in cached]  # fmt: skip

        row = {"shape": name, "cublas_fp8_cached_us": replay_us(cublas, rep=60) / layers}
        ref = (x_q.float() * s_x) @ qs[0].dequantized_weight(torch.float32).t() + biases[0].float()
        for convert, swap, config in itertools.product((0, 1), (0, 1), LAUNCHES):
            if swap and config[0] == 256:
                continue

            def fused(x_q=x_q, s_x=s_x, qs=qs, biases=biases, variant=(convert, swap, config)):
                return [launch(x_q, s_x, q.qweight, q.scales.reshape(-1), b, *variant)
                        for q, b in zip(qs, biases, strict=True)]  # fmt: skip

            err = float((fused()[0].float() - ref).norm() / ref.norm())
            row[f"c{convert}s{swap} {config}"] = (round(replay_us(fused, rep=60) / layers, 2), err)
        rows.append(row)
        best = sorted((v[0], key) for key, v in row.items() if isinstance(v, tuple))[:5]
        print(name, "cuBLAS FP8", round(row["cublas_fp8_cached_us"], 2), best, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "w4a8_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    show_ptx() if sys.argv[1:] == ["ptx"] else time_variants()

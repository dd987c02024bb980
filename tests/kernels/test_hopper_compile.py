"""Every Triton kernel compiles for Hopper (sm_90), through Triton's front end and the bundled ptxas, without a GPU,
and no launch of the input pre-pass spills registers to local memory (ptxas's report).

The CPU interpreter runs a kernel's Python, not its compilation: a kernel that the interpreter runs can still be
refused by the compiler (a function whose two constexpr branches return tiles of different shapes was, on an
H200). This compiles the launches the backends make, in a subprocess where `TRITON_INTERPRET` is unset (under
the interpreter `@triton.jit` gives objects the compiler cannot take), into a fresh cache.

    python tests/kernels/test_hopper_compile.py   # the same, printing each variant
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _variants() -> list[tuple]:
    """(kernel, argument types by name, constexprs, options) for each launch the backends make."""
    from ditq.kernels.triton import expand, lowbit_gemm, lowrank, rowquant

    def rows(dtype: str) -> dict[str, str]:
        p = "*" + dtype
        return dict(x=p, inv_smooth="*fp32", shift=p, scale_mod=p, codes="*fp8e4nv", scales="*fp32", M="i32", K="i32",
                    tokens="i32", eps="fp32", stride_xm="i32", stride_cm="i32", stride_mod="i32", norm_weight=p,
                    norm_bias=p, update=p, gate=p, x_out=p, stride_um="i32", stride_om="i32", second=p, split="i32",
                    stride_sm="i32")  # fmt: skip

    one_pass = dict(EMULATE=False, HAS_SMOOTH=False, ONE_SAMPLE=False, RESIDUAL=0, BLOCK_M=4, HEAD=1024, TAIL=128,
                    NORM=0, MODULATE=False, NORM_WEIGHT=False, NORM_BIAS=False, SECOND_ACT=0, CONCAT=0)  # fmt: skip
    adaln = dict(ACT=0, NORM=1, MODULATE=True)  # LayerNorm without affine + modulate
    cases = [  # (x dtype, what differs from one_pass)
        ("bf16", dict(ACT=2, BLOCK_M=1, HEAD=4096, TAIL=512)),  # fc2's GELU input
        ("bf16", dict(ACT=2, HAS_SMOOTH=True, BLOCK_M=1, HEAD=4096, TAIL=512)),  # ... before a branch
        ("bf16", dict(ACT=0, HAS_SMOOTH=True)),  # a smoothed layer's input
        ("bf16", adaln | dict(ONE_SAMPLE=True)),  # LayerNorm + modulate (qkv)
        ("bf16", adaln | dict(ONE_SAMPLE=True, RESIDUAL=1)),  # ... after the residual add (fc1)
        ("bf16", adaln | dict(HAS_SMOOTH=True, RESIDUAL=1, TAIL=0)),  # rows of several samples
        ("fp32", dict(ACT=1, TAIL=0)),
        ("fp32", adaln | dict(RESIDUAL=1)),
    ]
    variants = [(rowquant._rows_one_pass_kernel, rows(dtype), one_pass | diff, dict(num_warps=4)) for dtype, diff in cases]
    # the default launches at DiT-XL/2's widths: 2 rows of 1,152 in one warp, 1 row of 4,608 in two; smoothed,
    # 8 rows of 1,152 and 2 of 4,608 in 8 warps
    variants.append((rowquant._rows_one_pass_kernel, rows("bf16"), one_pass | cases[4][1] | dict(BLOCK_M=2),
                     dict(num_warps=1)))  # fmt: skip
    variants.append((rowquant._rows_one_pass_kernel, rows("bf16"), one_pass | cases[0][1], dict(num_warps=2)))
    variants.append((rowquant._rows_one_pass_kernel, rows("bf16"), one_pass | cases[4][1] | dict(BLOCK_M=8,
                     HAS_SMOOTH=True), dict(num_warps=8)))  # fmt: skip
    variants.append((rowquant._rows_one_pass_kernel, rows("bf16"), one_pass | cases[1][1] | dict(BLOCK_M=2),
                     dict(num_warps=8)))  # fmt: skip
    # inside a compiled model inductor launches it, passing the LayerNorm's eps as a float64
    variants.append((rowquant._rows_one_pass_kernel, rows("bf16") | {"eps": "fp64"}, one_pass | cases[4][1],
                     dict(num_warps=4)))  # fmt: skip
    # the producers other transformers feed their Linears, at the default launches for their widths (DiT-XL/2 and
    # PixArt 1,152, Large-DiT and SD3 1,536, FLUX 3,072; smoothed or not): SiLU (adaLN's input, a timestep MLP's),
    # LayerNorm with an affine, RMSNorm (torch's, diffusers'), with or without a modulate, an ungated residual
    for dtype, width, smoothed, diff in (
        ("bf16", 1152, False, dict(ACT=3)),
        ("bf16", 3072, True, dict(ACT=3)),
        ("bf16", 1536, False, dict(NORM=1, NORM_WEIGHT=True, NORM_BIAS=True)),
        ("bf16", 3072, True, adaln | dict(NORM_WEIGHT=True, NORM_BIAS=True, ONE_SAMPLE=True, RESIDUAL=2)),
        ("bf16", 1536, False, dict(NORM=2, NORM_WEIGHT=True, MODULATE=True, ONE_SAMPLE=True, RESIDUAL=1)),
        ("bf16", 3072, True, dict(NORM=3, NORM_WEIGHT=True, NORM_BIAS=True, MODULATE=True, ONE_SAMPLE=True,
                                  RESIDUAL=2)),  # fmt: skip
        ("bf16", 1152, False, adaln | dict(ONE_SAMPLE=True, RESIDUAL=2)),  # PixArt's fc1 input
        ("bf16", 1152, True, dict(RESIDUAL=2)),  # PixArt's cross-attention input
        ("fp32", 1152, False, dict(NORM=3, NORM_WEIGHT=True, NORM_BIAS=True, MODULATE=True, RESIDUAL=2)),
        ("bf16", 3072 + 12288, False, dict(CONCAT=1, SECOND_ACT=2)),  # FLUX's single blocks: cat([attn, GELU])
        ("bf16", 3072 + 12288, True, dict(CONCAT=1, SECOND_ACT=2)),
        ("bf16", 3072, False, adaln | dict(CONCAT=2, ONE_SAMPLE=True)),  # ... and their norm of cat([text, image])
    ):
        block_m, warps = rowquant.one_pass_launch(4096, width, smoothed)
        head, tail = rowquant.row_tiles(width)
        variants.append((rowquant._rows_one_pass_kernel, rows(dtype), one_pass | dict(ACT=0, HAS_SMOOTH=smoothed,
                         BLOCK_M=block_m, HEAD=head, TAIL=tail) | diff, dict(num_warps=warps)))  # fmt: skip
    multi = {k: v for k, v in rows("bf16").items() if k in rowquant._rows_multi_pass_kernel.arg_names}
    for norm, act, weight in ((1, 0, False), (0, 2, False), (0, 3, False), (1, 0, True), (3, 0, True)):
        variants.append((rowquant._rows_multi_pass_kernel, multi, dict(K=20480, ACT=act, NORM=norm, MODULATE=norm == 1,
                         NORM_WEIGHT=weight, NORM_BIAS=weight and norm != 2, HAS_SMOOTH=True, EMULATE=False,
                         ONE_SAMPLE=norm == 1, BLOCK_M=16, BLOCK_K=128), dict(num_warps=4)))  # fmt: skip
    variants.append((lowrank._lowrank_codes_kernel, dict(codes="*fp8e4nv", down="*fp8e4nv", down_scale="*fp32",
                     M="i32", stride_cm="i32"), dict(K=1152, R=32, EMULATE=False, BLOCK_M=128, BLOCK_K=256),
                     dict(num_warps=4, num_stages=3)))  # fmt: skip
    for slot, offset in ((4, 8), (2, 1)):
        variants.append((expand._expand_kernel, dict(packed="*u8", out="*fp8e4nv", n_rows="i32", n_cols="i32",
                         n_bytes="i32"), dict(SLOT=slot, OFFSET=offset, BLOCK_R=16, BLOCK_C=256), dict(num_warps=4)))  # fmt: skip
    gemm = dict(x="*bf16", x_scale="*fp32", packed="*u8", scales="*fp32", zeros="*fp32", bias="*bf16", out="*bf16",
                M="i32", N="i32", n_bytes="i32", n_groups="i32", stride_xm="i32", stride_om="i32", stride_os="i32")  # fmt: skip
    for slot, offset, group, zeros in ((4, 8, 0, False), (2, 1, 0, False), (4, 0, 64, True)):
        variants.append((lowbit_gemm._lowbit_gemm_kernel, gemm, dict(K=1152, SLOT=slot, OFFSET=offset, GROUP=group,
                         HAS_ZEROS=zeros, HAS_BIAS=True, HAS_XSCALE=False, FP32_DOT=False, BLOCK_M=16, BLOCK_N=32,
                         BLOCK_K=64, SPLIT_K=1), dict(num_warps=4, num_stages=3)))  # fmt: skip
    # e4m3 activation codes (W4A8-FP8, the FP8 backends' per-group layers): per group as the backends launch it
    # (many rows, groups of 32 and 64), per channel, and few rows
    for slot, offset, group, block_m, block_n, block_k in ((4, 8, 64, 128, 64, 64), (2, 1, 32, 128, 64, 32),
                                                           (4, 8, 0, 128, 64, 128), (4, 8, 128, 16, 32, 128)):
        variants.append((lowbit_gemm._lowbit_gemm_kernel, gemm | {"x": "*fp8e4nv"}, dict(K=1152, SLOT=slot,
                         OFFSET=offset, GROUP=group, HAS_ZEROS=False, HAS_BIAS=True, HAS_XSCALE=True, FP32_DOT=False,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1), dict(num_warps=4, num_stages=3)))  # fmt: skip
    # float32 output and the least launch (16 × 16 tiles, K blocks of 32), as the CPU tests run it
    variants.append((lowbit_gemm._lowbit_gemm_kernel, gemm | {"x": "*fp8e4nv", "bias": "*fp32", "out": "*fp32"},
                     dict(K=1152, SLOT=4, OFFSET=8, GROUP=32, HAS_ZEROS=False, HAS_BIAS=True, HAS_XSCALE=True,
                          FP32_DOT=False, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1), dict(num_warps=4, num_stages=3)))  # fmt: skip
    # split K for few rows (`split_k`): int4 per channel, bf16 in, float32 partials out, 9 steps of 128 in 3 splits
    variants.append((lowbit_gemm._lowbit_gemm_kernel, gemm | {"out": "*fp32"}, dict(K=1152, SLOT=4, OFFSET=8, GROUP=0, HAS_ZEROS=False,
                     HAS_BIAS=True, HAS_XSCALE=False, FP32_DOT=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=3),
                     dict(num_warps=4, num_stages=3)))  # fmt: skip
    return variants


def compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for kernel, types, constexprs, options in _variants():
        names = kernel.arg_names
        signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
        source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
        triton.compile(source, target=target, options=options)
        print(f"sm_90: {kernel.__name__} {constexprs}", flush=True)
    return 0


def test_every_kernel_launch_compiles_for_hopper_without_spilling(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # ptxas's report (registers, spills) of each kernel, printed by Triton to the same stdout
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "TRITON_DUMP_PTXAS_LOG": "1"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("sm_90:") == len(_variants())
    spilled, spill = [], None  # ptxas reports each variant's spills before its "sm_90:" line
    for line in result.stdout.splitlines():
        if found := re.search(r"(\d+) bytes spill stores", line):
            spill = int(found.group(1))
        elif line.startswith("sm_90:"):
            if line.startswith("sm_90: _rows") and spill != 0:  # the input pre-pass's
                spilled.append(f"{spill} bytes: {line}")
            spill = None
    assert not spilled, "\n".join(spilled)


if __name__ == "__main__":
    sys.exit(compile_all())

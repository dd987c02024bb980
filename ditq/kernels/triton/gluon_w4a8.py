"""W4A8-FP8 GEMM for Hopper in Gluon: packed 2–4-bit codes → e4m3 in registers, warp-specialized, TMA-fed.

    y[m, n] = s_x[m] · Σ_groups s[n, g] · Σ_{k ∈ g} x_q[m, k] · q[n, k]  (+ bias[n])

computed transposed (out = W · Xᵀ): the weights are wgmma's A operand, taken from registers, so they go from
shared memory straight into the tensor cores' fragment after a conversion, and the activations (e4m3 codes,
already in wgmma's K-major form) are B, read by the tensor cores from shared memory.

- One producer warp issues the TMA loads of each K block (128 columns): the activation tile and the weights'
  re-packed bytes (`wgmma_codes.py`), into a ring of `STAGES` buffers guarded by mbarriers.
- The consumer warpgroups (the default partition) load their fragment's bytes (one 16-byte load per row for
  4-bit codes), convert 8 codes per 32-bit word with 12 integer instructions (`prmt` byte lookups: |q| ≤ 8 is
  exact in e4m3) and issue `warpgroup_mma`. Per channel, the tensor cores accumulate over all of K (cuBLAS's
  fast accumulation, the FP8 backends' default); per group (64 or 128 columns), each group's product starts
  from zero and joins the float32 accumulator times its scale.
- The epilogue scales rows by the channel scales and columns by the token scales, adds the bias and writes the
  tile through shared memory with a TMA store, which clips the edges.
- The K loop is known to run at least once (`gl.assume`; the host refuses K = 0). A loop that may run zero
  times keeps an exit path that sets the accumulator's zeros; where LLVM places them after the loop's last
  wgmma and before its wait (it did for 4-bit codes, not for 2-bit), ptxas reports "(C7515) wgmma.mma_async
  instructions are serialized due to non wgmma instructions defining accumulator registers" and waits after
  every wgmma of the kernel.

The kernel needs sm_90 (wgmma, TMA, setmaxnreg). `tests/kernels/test_gluon_w4a8_compile.py` compiles it for
sm_90a on the CPU and checks registers, spills and the instructions; `bench/bench_gluon_w4a8.py` checks it
against `gluon_w4a8_reference` and times it on a GPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ditq.kernels.triton.wgmma_codes import K_BLOCK, unpack_wgmma
from ditq.quant.packing import packed_cols, signed_offset, slot_bits

__all__ = ["LAUNCH", "gluon_w4a8_linear", "gluon_w4a8_reference"]

# (warps of the consumer partition, pipeline stages, register budget per thread). The register budget is the
# kernel's `maxnreg`; the producer warp keeps 24 of it and the consumers get the rest (12 warps in all: 2 consumer
# warpgroups and the producer's).
LAUNCH = dict(num_warps=8, stages=4, maxnreg=168)
BLOCK_N = 128  # output channels per tile: two warpgroups of 64 rows (wgmma's M)
BLOCK_T = 128  # tokens per tile; 256 compiled for sm_90a without spills but gave wrong 2-bit products on an H100
BLOCK_K = gl.constexpr(K_BLOCK)  # K columns per pipeline step: a block of the re-packed layout
PRODUCER_REGS = gl.constexpr(24)  # registers per thread of the producer warp (the least setmaxnreg allows)
OUT_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


# --------------------------------------------------------------------------------------------
# Packed codes → e4m3, in the wgmma fragment
# --------------------------------------------------------------------------------------------


@gluon.constexpr_function
def _e4m3_bits(value: int) -> int:
    """The e4m3 byte of an integer |value| ≤ 15 (exact: 3 mantissa bits cover it)."""
    if value == 0:
        return 0
    magnitude = abs(value)
    exponent = magnitude.bit_length() - 1
    mantissa = (magnitude << 3 >> exponent) & 7
    return (0x80 if value < 0 else 0) | (exponent + 7) << 3 | mantissa


@gluon.constexpr_function
def _table(offset: int, first: int) -> list[str]:
    """Two 32-bit words holding the e4m3 bytes of stored codes first … first + 7 (code − offset), low byte first."""
    lut = [_e4m3_bits(code - offset) if code - offset <= 8 else 0 for code in range(first, first + 8)]
    return [f"0x{sum(b << 8 * i for i, b in enumerate(lut[w : w + 4])):08X}" for w in (0, 4)]


@gluon.constexpr_function
def _conversion_asm(slot: int, offset: int) -> str:
    """PTX turning one 32-bit word of re-packed codes ($in) into 2 (4-bit) or 4 (2-bit) words of e4m3 bytes.

    `prmt d, a, b, c` writes byte i of d from byte c[4i+2:4i] of the 8 bytes {b, a}, so a word of nibbles
    indexes a table of 8 bytes held in two registers. 4-bit codes (stored q + 8, or q + 4 for int3): the low 3
    bits look up the tables of codes 0–7 and 8–15, and bit 3 picks between the two results (a third `prmt`
    whose selectors are byte i + 4·bit3); the selector's own bit 3 (sign-replicate mode) is masked off first.
    2-bit codes (q + 2, or t + 1 ternary): the 4 entries fit one register, and each nibble holds two codes."""
    if slot == 4:
        low, high = _table(offset, 0), _table(offset, 8)
        return f"""{{
.reg .b32 i, j, s, t, la, ha, lb, hb;
and.b32 i, $2, 0x77777777;
shr.u32 j, i, 16;
shr.u32 s, $2, 1;
and.b32 s, s, 0x44444444;
or.b32 s, s, 0x32103210;
shr.u32 t, s, 16;
prmt.b32 la, {low[0]}, {low[1]}, i;
prmt.b32 ha, {high[0]}, {high[1]}, i;
prmt.b32 lb, {low[0]}, {low[1]}, j;
prmt.b32 hb, {high[0]}, {high[1]}, j;
prmt.b32 $0, la, ha, s;
prmt.b32 $1, lb, hb, t;
}}"""
    table = _table(offset, 0)[0]
    return f"""{{
.reg .b32 a, b, t;
mov.b32 t, {table};
and.b32 a, $4, 0x33333333;
shr.u32 b, $4, 2;
and.b32 b, b, 0x33333333;
prmt.b32 $0, t, 0, a;
prmt.b32 $2, t, 0, b;
shr.u32 a, a, 16;
shr.u32 b, b, 16;
prmt.b32 $1, t, 0, a;
prmt.b32 $3, t, 0, b;
}}"""


@gluon.constexpr_function
def _packed_layout(slot: int, block_n: int, num_warps: int) -> gl.DistributedLinearLayout:
    """Where the re-packed bytes (block_n, 128 · slot / 8) sit: the wgmma fragment's rows and lanes, each thread's
    run of 32 · slot / 8 bytes per row in consecutive registers (one vector load; every 4 make one word)."""
    run = 4 * slot  # bytes per thread and row
    regs = [[0, 1 << i] for i in range(run.bit_length() - 1)] + [[8, 0]]
    rows = 16 * num_warps
    while rows < block_n:  # more rows than the warps cover: repeated in registers
        regs.append([rows, 0])
        rows *= 2
    lanes = [[0, run], [0, 2 * run], [1, 0], [2, 0], [4, 0]]  # lane 4g + t: row g, thread t's run
    warps = [[16 << i, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(regs, lanes, warps, [], [block_n, K_BLOCK * slot // 8])


@gluon.jit
def _halves(packed):
    """A K block's (BLOCK_N, 128 · slot / 8) bytes as the two (BLOCK_N, 64 · slot / 8) halves of each thread's run:
    the codes of columns 0–63 and 64–127 (register subsets: nothing moves)."""
    BLOCK_N: gl.constexpr = packed.shape[0]
    HALF_RUN: gl.constexpr = packed.shape[1] // 8  # bytes per thread, row and half
    first, second = packed.reshape([BLOCK_N, 4, 2, HALF_RUN]).permute((0, 1, 3, 2)).split()
    return first.reshape([BLOCK_N, 4 * HALF_RUN]), second.reshape([BLOCK_N, 4 * HALF_RUN])


@gluon.jit
def _to_e4m3(half, SLOT: gl.constexpr, OFFSET: gl.constexpr, layout: gl.constexpr):
    """Half a K block's codes (BLOCK_N, 64 · SLOT / 8) bytes → its (BLOCK_N, 64) e4m3 weights in `layout` (wgmma's A
    fragment). The joins and permutes only rename registers: each output word of the conversion is the 4
    consecutive codes that one fragment register holds."""
    BLOCK_N: gl.constexpr = half.shape[0]
    asm: gl.constexpr = _conversion_asm(SLOT, OFFSET)
    if SLOT == 4:  # word c (byte 8t + 4c + b), nibble 4h + b → column 32c + 16h + 4t + b
        lo, hi = gl.inline_asm_elementwise(asm, "=r,=r,r", [half], dtype=(gl.float8e4nv, gl.float8e4nv),
                                           is_pure=True, pack=4)  # fmt: skip
        w = gl.join(lo, hi).reshape([BLOCK_N, 4, 2, 4, 2]).permute((0, 2, 4, 1, 3))
    else:  # bits 16h + 4b + 2r → column 32r + 16h + 4t + b
        a_lo, a_hi, b_lo, b_hi = gl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [half],
                                                           dtype=(gl.float8e4nv,) * 4, is_pure=True, pack=4)  # fmt: skip
        w = (
            gl.join(gl.join(a_lo, a_hi), gl.join(b_lo, b_hi))
            .reshape([BLOCK_N, 4, 4, 2, 2])
            .permute((0, 4, 3, 1, 2))
        )
    return gl.convert_layout(w.reshape([BLOCK_N, BLOCK_K // 2]), layout, assert_trivial=True)


# --------------------------------------------------------------------------------------------
# The partitions
# --------------------------------------------------------------------------------------------


@gluon.jit
def _produce(w_desc, x_desc, w_bufs, x_bufs, ready, empty, off_n, off_t, k_steps):
    """The producer warp: TMA loads of each K block into the ring, once the consumers have freed the slot."""
    STAGES: gl.constexpr = w_bufs.shape[0]
    W_BYTES: gl.constexpr = w_desc.block_type.shape[1]
    for i in range(k_steps):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        bar = ready.index(slot)
        mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [off_n, i * W_BYTES], bar, w_bufs.index(slot))
        tma.async_copy_global_to_shared(x_desc, [off_t, i * BLOCK_K], bar, x_bufs.index(slot))


@gluon.jit
def _consume(w_bufs, x_bufs, ready, empty, w_scales, off_n, N, n_groups, k_steps, SLOT: gl.constexpr,
             OFFSET: gl.constexpr, GROUP: gl.constexpr, BLOCK_T: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """The consumer warpgroups: per half of each K block (64 columns), convert the codes and issue its product,
    so the tensor cores multiply one half while the next is converted. Returns
    (the (BLOCK_N, BLOCK_T) float32 accumulator,), group scales applied, channel scales not.

    Waits are for every product in flight: at each block's first half (the previous block's products; then its
    slot is freed), and per group at each group's first half (the previous group's product, folded into the
    accumulator times its scale). Converted codes never cross an iteration: 8-bit values carried by the loop
    are unpacked and re-packed byte by byte."""
    STAGES: gl.constexpr = w_bufs.shape[0]
    BLOCK_N: gl.constexpr = w_bufs.shape[1]
    HALF: gl.constexpr = BLOCK_K // 2
    PER_GROUP: gl.constexpr = 2 if GROUP == 0 else GROUP // HALF  # halves per scale group
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_T, 32])  # fmt: skip
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=4)
    packed_layout: gl.constexpr = _packed_layout(SLOT, BLOCK_N, num_warps)
    rows = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, acc_layout))
    scale_rows = w_scales + rows * n_groups
    acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, acc_layout)
    product = warpgroup_mma_init(gl.zeros_like(acc))  # per group: the group's product, in flight
    scale = gl.zeros_like(rows).to(gl.float32)  # ... and its scale
    if GROUP == 0:  # per channel: the accumulator itself is in flight
        acc = warpgroup_mma_init(acc)
    for i in range(k_steps):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        halves = _halves(w_bufs.index(slot).load(packed_layout))
        for h in gl.static_range(2):
            w = _to_e4m3(halves[h], SLOT, OFFSET, a_layout)
            x = x_bufs.index(slot).slice(h * HALF, HALF, dim=1).permute((1, 0))  # K-major, as FP8 wgmma needs
            if GROUP == 0:
                if h == 0:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
                acc = warpgroup_mma(w, x, acc, is_async=True)
            elif h % PER_GROUP == 0:
                acc += warpgroup_mma_wait(num_outstanding=0, deps=(product,)) * scale[:, None]
                if h == 0:
                    mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
                scale = gl.load(scale_rows + (2 * i + h) // PER_GROUP, mask=rows < N, other=0.0)
                product = warpgroup_mma(w, x, gl.zeros_like(acc), use_acc=False, is_async=True)
            else:
                product = warpgroup_mma(w, x, product, is_async=True)
    if GROUP == 0:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    else:
        acc += warpgroup_mma_wait(num_outstanding=0, deps=(product,)) * scale[:, None]
    return (acc,)


@gluon.jit
def _w4a8_kernel(w_desc, x_desc, out_desc, w_scales, x_scales, bias, M, N, n_groups, SLOT: gl.constexpr,
                 OFFSET: gl.constexpr, GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
    """One (BLOCK_T tokens, BLOCK_N channels) tile of out (M, N); program (n tile, token tile), so programs in
    flight share their activation tile through the L2."""
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_T: gl.constexpr = x_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    off_n = gl.program_id(0) * BLOCK_N
    off_t = gl.program_id(1) * BLOCK_T
    k_steps = x_desc.shape[1] // BLOCK_K
    gl.assume(k_steps > 0)  # no zero-trip path: ptxas pipelines the wgmmas (module docstring)
    (acc,) = gl.warp_specialize([
        (_consume, (w_bufs, x_bufs, ready, empty, w_scales, off_n, N, n_groups, k_steps, SLOT, OFFSET, GROUP,
                    BLOCK_T, num_warps)),
        (_produce, (w_desc, x_desc, w_bufs, x_bufs, ready, empty, off_n, off_t, k_steps)),
    ], [1], [PRODUCER_REGS])  # fmt: skip

    acc_layout: gl.constexpr = acc.type.layout
    rows = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, acc_layout))
    cols = off_t + gl.arange(0, BLOCK_T, gl.SliceLayout(0, acc_layout))
    if GROUP == 0:
        acc *= gl.load(w_scales + rows, mask=rows < N, other=0.0)[:, None]
    acc *= gl.load(x_scales + cols, mask=cols < M, other=0.0)[None, :]
    if HAS_BIAS:
        acc += gl.load(bias + rows, mask=rows < N, other=0.0).to(gl.float32)[:, None]
    out = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
    out.store(gl.permute(acc.to(out_desc.dtype), (1, 0)))
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [off_t, off_n], out)
    tma.store_wait(pendings=0)


# --------------------------------------------------------------------------------------------
# Launch and reference
# --------------------------------------------------------------------------------------------


def gluon_w4a8_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    ternary: bool = False,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    num_warps: int = LAUNCH["num_warps"],
    stages: int = LAUNCH["stages"],
    maxnreg: int = LAUNCH["maxnreg"],
) -> torch.Tensor:
    """x (M, K) e4m3 codes with row scales x_scale (M, 1) float32, times the symmetric (or ternary) weights whose
    codes `packed` holds in the wgmma layout (`repack_for_wgmma`) and whose float32 scales are (N, 1) per channel
    or (N, K / group_size) per group of 64 or 128; + bias (N,). Returns (M, N) in `out_dtype`. sm_90 only."""
    m, k = x.shape
    n = packed.shape[0]
    _check(x, x_scale, packed, scales, bias, bits, group_size, out_dtype)
    byte_block = K_BLOCK * slot_bits(bits) // 8
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    w_desc = _descriptor(packed, [BLOCK_N, byte_block], gl.uint8)
    x_desc = _descriptor(x, [BLOCK_T, K_BLOCK], gl.float8e4nv)
    out_desc = _descriptor(out, [BLOCK_T, BLOCK_N], OUT_DTYPES[out_dtype])
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_T))
    _w4a8_kernel[grid](
        w_desc, x_desc, out_desc, scales, x_scale, scales if bias is None else bias, m, n, scales.shape[1],
        SLOT=slot_bits(bits), OFFSET=signed_offset(bits, ternary), GROUP=group_size or 0, HAS_BIAS=bias is not None,
        STAGES=stages, num_warps=num_warps, maxnreg=maxnreg,
    )  # fmt: skip
    return out


def _descriptor(t: torch.Tensor, block: list[int], dtype) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def _check(x, x_scale, packed, scales, bias, bits, group_size, out_dtype) -> None:
    """A ValueError naming the operand the kernel would read wrongly."""
    if x.ndim != 2 or x.dtype != torch.float8_e4m3fn or not x.is_contiguous():
        raise ValueError(f"x must be contiguous 2-D e4m3 codes, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if k == 0 or k % K_BLOCK:
        raise ValueError(f"K must be a positive multiple of {K_BLOCK}, got {k}")
    if x_scale.dtype != torch.float32 or x_scale.numel() != m or not x_scale.is_contiguous():
        raise ValueError(
            f"x_scale must be {m} contiguous float32 row scales, got {x_scale.dtype} {tuple(x_scale.shape)}"
        )
    if slot_bits(bits) == 8:
        raise ValueError(f"the kernel takes 2–4-bit codes; got bits={bits}")
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != packed_cols(k, bits):
        raise ValueError(
            f"packed must be uint8 (N, {packed_cols(k, bits)}) for K={k}, got {packed.dtype} {tuple(packed.shape)}"
        )
    n = packed.shape[0]
    if n % 8:
        raise ValueError(f"N must be a multiple of 8 (16-byte output rows), got {n}")
    if group_size not in (None, 64, 128):
        raise ValueError(f"group_size must be None (per channel), 64 or 128, got {group_size}")
    groups = k // group_size if group_size else 1
    if scales.dtype != torch.float32 or tuple(scales.shape) != (n, groups) or not scales.is_contiguous():
        raise ValueError(
            f"scales must be contiguous float32 ({n}, {groups}), got {scales.dtype} {tuple(scales.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous ({n},), got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {sorted(map(str, OUT_DTYPES))}, got {out_dtype}")


def gluon_w4a8_reference(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    ternary: bool = False,
    group_size: int | None = None,
) -> torch.Tensor:
    """The same product in float64 from the same operands, (M, N) float64: every group's sum of code products is
    exact there (each product is a multiple of 2^-9 below 2^12, so up to 2^32 of them fit 53 bits); the scalings
    and the sum over groups round in float64, far below the kernel's float32."""
    k = x.shape[1]
    codes = unpack_wgmma(packed, bits, k).double() - signed_offset(bits, ternary)  # (N, K)
    group = group_size or k
    sums = torch.einsum(
        "mgk,ngk->mng", x.double().reshape(x.shape[0], -1, group), codes.reshape(codes.shape[0], -1, group)
    )
    y = (sums * scales.double()).sum(-1) * x_scale.double().reshape(-1, 1)
    return y if bias is None else y + bias.double()

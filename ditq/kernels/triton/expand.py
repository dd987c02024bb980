"""Packed int codes → FP8 e4m3 (N, K): the weight operand of cuBLAS's FP8 GEMM, expanded in one pass.

Signed codes |q| ≤ 8 (int2–int4, ternary) are exact in e4m3, so the expansion loses nothing; the per-channel
scale is applied by the GEMM (`scale_b`). Reads the canonical packing of `ditq.quant.packing`: with a slot of
`SLOT` bits, byte j of a row holds columns (8 / SLOT)·j + k in bits SLOT·k … SLOT·k + SLOT − 1, stored as
q + OFFSET.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ditq.quant.packing import packed_cols, signed_offset, slot_bits

__all__ = ["expand_to_fp8", "expand_to_fp8_reference"]


@triton.jit
def _expand_kernel(
    packed,
    out,
    n_rows,
    n_cols,
    n_bytes,
    SLOT: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One (BLOCK_R, BLOCK_C) tile of the output per program: each column reads its byte (neighbours share
    it through the cache) and the stores are contiguous."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BLOCK_R,)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    PER_BYTE: tl.constexpr = 8 // SLOT
    byte = tl.load(packed + rows[:, None] * n_bytes + (cols // PER_BYTE)[None, :], mask=inside, other=0)
    shift = ((cols % PER_BYTE) * SLOT).to(tl.uint8)
    code = ((byte >> shift[None, :]) & ((1 << SLOT) - 1)).to(tl.int32) - OFFSET
    tl.store(out + rows[:, None] * n_cols + cols[None, :], code.to(tl.float32).to(tl.float8e4nv), mask=inside)


def expand_to_fp8(qweight: torch.Tensor, bits: int, n_cols: int, *, ternary: bool = False) -> torch.Tensor:
    """(N, n_cols) float8_e4m3fn codes from a packed uint8 (N, packed_cols) weight (symmetric or ternary)."""
    slot = slot_bits(bits)
    if slot == 8:
        raise ValueError(f"expand_to_fp8 takes 2–4-bit codes; got bits={bits}")
    n_rows, n_bytes = qweight.shape
    if n_bytes != packed_cols(n_cols, bits):
        raise ValueError(
            f"qweight has {n_bytes} bytes per row; {n_cols} {bits}-bit codes need {packed_cols(n_cols, bits)}"
        )
    out = torch.empty(n_rows, n_cols, dtype=torch.float8_e4m3fn, device=qweight.device)
    grid = (triton.cdiv(n_rows, 16), triton.cdiv(n_cols, 256))
    wrap_triton(_expand_kernel)[grid](
        qweight,
        out,
        n_rows,
        n_cols,
        n_bytes,
        SLOT=slot,
        OFFSET=signed_offset(bits, ternary),
        BLOCK_R=16,
        BLOCK_C=256,
    )
    return out


def expand_to_fp8_reference(
    qweight: torch.Tensor, bits: int, n_cols: int, *, ternary: bool = False
) -> torch.Tensor:
    """The same in PyTorch: unpack, undo the offset, cast."""
    from ditq.quant.packing import to_signed, unpack

    return to_signed(unpack(qweight, bits, n_cols), bits, ternary=ternary).float().to(torch.float8_e4m3fn)

"""The packed-code layout of the Hopper W4A8 kernel: each thread's wgmma fragment in contiguous bytes.

`warpgroup_mma` takes its A operand from registers in a fixed fragment (PTX ISA, "Register fragments" of
wgmma with 8-bit A): in every 64 × 32 block of A (output channels × K), lane 4g + t of warp w holds rows
16w + g and 16w + g + 8, and in each row the K columns 4t … 4t + 3 and 16 + 4t … 16 + 4t + 3. The kernel
feeds its weights as A (out = W · Xᵀ, transposed), so a thread needs, per row and per K block of 128
columns, the 32 codes k = 32c + 16h + 4t + b (chunk c < 4, half h < 2, byte b < 4).

The re-pack puts exactly those codes in one contiguous run of the row's bytes, thread t's run after thread
t − 1's, so one shared-memory load per row (16 bytes of 4-bit codes, 8 of 2-bit) fetches them, and orders
them inside each 32-bit word so that converting a word to e4m3 is a few byte permutes (`prmt`,
`gluon_w4a8.py`) whose output words are fragment registers: 4 consecutive columns of one row.

| slot | word of thread t's run | holds code … in bits …                                  |
|------|------------------------|---------------------------------------------------------|
| 4    | c < 4                  | 32c + 16h + 4t + b in 16h + 4b … 16h + 4b + 3            |
| 2    | u < 2                  | 64u + 32r + 16h + 4t + b in 16h + 4b + 2r, 16h + 4b + 2r + 1 |

(h, r < 2, b < 4.) Each half of a thread's run (words 0–1 of 4-bit codes, word 0 of 2-bit) holds the codes
of one half of the block, columns 0–63 or 64–127: the kernel converts and multiplies a block by halves.
Both layouts are a permutation of each block's 128 columns followed by the canonical packing
(`ditq.quant.packing`, words little-endian), so the stored codes (q + offset) and the bytes per row are the
checkpoint's. K must be a multiple of 128.
"""

from __future__ import annotations

import torch

from ditq.quant.packing import pack, slot_bits, unpack

__all__ = ["K_BLOCK", "repack_for_wgmma", "unpack_wgmma", "wgmma_column_order"]

K_BLOCK = 128  # columns of K per re-packed block: one pipeline step of the kernel


def wgmma_column_order(bits: int) -> torch.Tensor:
    """The 128 columns of a block in the order the re-packed row stores them (int64 indices)."""
    k = torch.arange(K_BLOCK)
    if slot_bits(bits) == 4:  # k = 32c + 16h + 4t + b, stored in the order (t, c, h, b)
        return k.reshape(4, 2, 4, 4).permute(2, 0, 1, 3).flatten()
    if slot_bits(bits) == 2:  # k = 64u + 32r + 16h + 4t + b, stored in the order (t, u, h, b, r)
        return k.reshape(2, 2, 2, 4, 4).permute(3, 0, 2, 4, 1).flatten()
    raise ValueError(f"the wgmma layout holds 2–4-bit codes; got bits={bits}")


def repack_for_wgmma(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Canonically packed uint8 codes (N, packed_cols(K, bits)) → the kernel's layout, same shape and bytes per row."""
    codes = unpack(qweight, bits, _checked_width(in_features))
    return pack(_blocks(codes)[..., wgmma_column_order(bits)].flatten(1), bits)


def unpack_wgmma(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `repack_for_wgmma`, to unsigned codes (N, K): what `unpack` gives for the canonical packing."""
    stored = _blocks(unpack(packed, bits, _checked_width(in_features)))
    return stored[..., torch.argsort(wgmma_column_order(bits))].flatten(1)


def _checked_width(in_features: int) -> int:
    if in_features % K_BLOCK:
        raise ValueError(f"the wgmma layout needs in_features divisible by {K_BLOCK}, got {in_features}")
    return in_features


def _blocks(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) → (N, K / 128, 128)."""
    return codes.reshape(codes.shape[0], -1, K_BLOCK)

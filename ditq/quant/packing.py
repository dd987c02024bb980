"""Bit packing of unsigned integer codes into uint8, row by row (the canonical checkpoint layout).

Codes are packed along the last dim (input channels), one row (output channel) at a time; each row
is padded with zero codes to a whole number of bytes, so `pack`/`unpack` round-trip every shape.

| bits            | slot | codes per byte | byte j of a row holds                                        |
|-----------------|------|----------------|--------------------------------------------------------------|
| 5, 6, 7, 8      | 8    | 1              | column j (one code per byte, high bits zero for b < 8)       |
| 3, 4            | 4    | 2              | column 2j in bits 0..3 (low nibble), column 2j+1 in bits 4..7 |
| 2 (and ternary) | 2    | 4              | column 4j+k in bits 2k..2k+1, k = 0..3                        |

`packed_cols(cols, bits) = ceil(cols * slot / 8)`.

Signed codes are stored offset to unsigned: a symmetric b-bit code q ∈ [-2^(b-1), 2^(b-1)-1] is
stored as q + 2^(b-1); a ternary code t ∈ {-1, 0, 1} is stored as t + 1 ∈ {0, 1, 2} in a 2-bit slot.
Asymmetric codes are already unsigned and stored as they are.
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "pack", "packed_cols", "signed_offset", "slot_bits", "to_signed", "to_unsigned", "unpack"]

# Packed layouts a `QuantSpec.layout` may name. Checkpoints hold "canonical" (this file); a kernel
# converter that re-packs a loaded model adds its layout here when it registers.
LAYOUTS: dict[str, str] = {"canonical": "row-major codes, low bits first (this module's table)"}


def slot_bits(bits: int) -> int:
    """Bits one code occupies in the packed layout: 8 (5–8 bits), 4 (3–4 bits) or 2 (2 bits)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} cannot be packed; supported: 2..8 (ternary packs as 2)")
    if bits >= 5:
        return 8
    return 4 if bits >= 3 else 2


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per packed row of `cols` codes."""
    per_byte = 8 // slot_bits(bits)
    return -(-cols // per_byte)


def signed_offset(bits: int, ternary: bool = False) -> int:
    """What is added to a signed code to store it unsigned: 2^(b-1), or 1 for ternary codes."""
    if ternary:
        return 1
    slot_bits(bits)  # validates bits
    return 2 ** (bits - 1)


def to_unsigned(codes: torch.Tensor, bits: int, ternary: bool = False) -> torch.Tensor:
    """Signed int8 codes → stored uint8 codes (q + offset)."""
    if codes.dtype != torch.int8:
        raise TypeError(f"signed codes must be int8, got {codes.dtype}")
    return (codes.to(torch.int16) + signed_offset(bits, ternary)).to(torch.uint8)


def to_signed(codes: torch.Tensor, bits: int, ternary: bool = False) -> torch.Tensor:
    """Stored uint8 codes → signed int8 codes (q - offset)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"stored codes must be uint8, got {codes.dtype}")
    return (codes.to(torch.int16) - signed_offset(bits, ternary)).to(torch.int8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (rows, cols), each < 2^bits, into uint8 (rows, packed_cols(cols, bits))."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack expects uint8 codes, got {codes.dtype} (use to_unsigned for signed codes)")
    if codes.ndim != 2:
        raise ValueError(f"pack expects a 2-D (rows, cols) tensor, got shape {tuple(codes.shape)}")
    slot = slot_bits(bits)
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"a code {int(codes.max())} does not fit in {bits} bits (max {2**bits - 1})")
    if slot == 8:
        return codes.clone()
    per_byte = 8 // slot
    rows, cols = codes.shape
    n_bytes = packed_cols(cols, bits)
    padded = torch.zeros(rows, n_bytes * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:, :cols] = codes
    lanes = padded.reshape(rows, n_bytes, per_byte)  # (rows, bytes, per_byte): lane k = column per_byte*j + k
    out = lanes[..., 0].clone()
    for k in range(1, per_byte):
        out |= lanes[..., k] << (slot * k)
    return out


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 (rows, packed_cols(cols, bits)) → uint8 codes (rows, cols)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack expects a uint8 packed tensor, got {packed.dtype}")
    if packed.ndim != 2:
        raise ValueError(f"unpack expects a 2-D (rows, bytes) tensor, got shape {tuple(packed.shape)}")
    slot = slot_bits(bits)
    if packed.shape[1] != packed_cols(cols, bits):
        raise ValueError(
            f"{cols} columns of {bits}-bit codes pack into {packed_cols(cols, bits)} bytes per row, "
            f"but the packed tensor has {packed.shape[1]}"
        )
    if slot == 8:
        return packed.clone()
    per_byte = 8 // slot
    mask = (1 << slot) - 1
    lanes = [(packed >> (slot * k)) & mask for k in range(per_byte)]
    rows, n_bytes = packed.shape
    return torch.stack(lanes, dim=-1).reshape(rows, n_bytes * per_byte)[:, :cols].contiguous()

"""Bit packing: exact round trips for every width and shape, and the documented bit order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.quant.packing import pack, packed_cols, signed_offset, to_signed, to_unsigned, unpack

SETTINGS = settings(max_examples=150, deadline=None)


def _codes(rows: int, cols: int, high: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (rows, cols), generator=g, dtype=torch.uint8)


@SETTINGS
@given(
    rows=st.integers(0, 6), cols=st.integers(1, 70), bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1)
)
def test_pack_unpack_roundtrip(rows, cols, bits, seed):
    codes = _codes(rows, cols, 2**bits, seed)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_cols(cols, bits))
    assert torch.equal(unpack(packed, bits, cols), codes)


@SETTINGS
@given(rows=st.integers(1, 6), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_ternary_roundtrip_through_signed_codes(rows, cols, seed):
    signed = (_codes(rows, cols, 3, seed).to(torch.int16) - 1).to(torch.int8)  # {-1, 0, 1}
    stored = to_unsigned(signed, 2, ternary=True)
    assert set(stored.unique().tolist()) <= {0, 1, 2}
    back = to_signed(unpack(pack(stored, 2), 2, cols), 2, ternary=True)
    assert torch.equal(back, signed)


@SETTINGS
@given(cols=st.integers(1, 40), bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_signed_roundtrip(cols, bits, seed):
    half = 2 ** (bits - 1)
    signed = (_codes(3, cols, 2**bits, seed).to(torch.int16) - half).to(torch.int8)
    stored = to_unsigned(signed, bits)
    assert int(stored.max()) < 2**bits
    assert torch.equal(to_signed(unpack(pack(stored, bits), bits, cols), bits), signed)


@pytest.mark.parametrize(
    ("bits", "cols", "expected"),
    [(8, 3, 3), (5, 3, 3), (4, 3, 2), (3, 4, 2), (2, 5, 2), (2, 4, 1), (2, 1, 1)],
)
def test_packed_cols(bits, cols, expected):
    assert packed_cols(cols, bits) == expected


def test_nibble_order_low_is_even_column():
    packed = pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0x21, 0x03]]


def test_two_bit_order_column_4j_plus_k_in_bits_2k():
    packed = pack(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 1]]


def test_signed_offsets():
    assert [signed_offset(b) for b in (2, 4, 8)] == [2, 8, 128]
    assert signed_offset(2, ternary=True) == 1


def test_pack_errors():
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(2, 4, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack(torch.full((2, 4), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="2..8"):
        pack(torch.zeros(2, 4, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(4, dtype=torch.uint8), 4)


def test_unpack_errors():
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(2, 2, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="pack into 3 bytes"):
        unpack(torch.zeros(2, 2, dtype=torch.uint8), 4, 5)
    with pytest.raises(TypeError, match="int8"):
        to_unsigned(torch.zeros(2, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="uint8"):
        to_signed(torch.zeros(2, dtype=torch.int8), 4)

"""The Hopper W4A8 kernel's GPU-free parts: the re-packed layout, the conversion PTX and the reference.

The conversion is checked by running its PTX text in a small interpreter (the handful of integer instructions
it uses, as the PTX ISA defines them) on re-packed codes, then joining and permuting its output words as the
kernel does: every code of every width must come out as the e4m3 byte of its value, in its column. What stays
for a GPU (`bench/bench_gluon_w4a8.py`): that `inline_asm_elementwise` hands each invocation 4 consecutive
register elements, and the kernel's pipeline.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.kernels.triton import gluon_w4a8
from ditq.kernels.triton.wgmma_codes import K_BLOCK, repack_for_wgmma, unpack_wgmma
from ditq.quant.packing import pack, signed_offset, slot_bits, to_unsigned, unpack

WIDTHS = [(4, False), (3, False), (2, False), (2, True)]  # (bits, ternary)


def random_codes(rows: int, cols: int, bits: int, ternary: bool, seed: int = 0) -> torch.Tensor:
    """Canonically packed codes of random signed values over the whole range."""
    g = torch.Generator().manual_seed(seed)
    low, high = (-1, 2) if ternary else (-(2 ** (bits - 1)), 2 ** (bits - 1))
    q = torch.randint(low, high, (rows, cols), generator=g, dtype=torch.int8)
    return pack(to_unsigned(q, bits, ternary), bits)


# --------------------------------------------------------------------------------------------
# The re-packed layout
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9), blocks=st.integers(1, 3), bits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 99)
)
def test_repacking_round_trips_to_the_canonical_codes(rows: int, blocks: int, bits: int, seed: int) -> None:
    codes = random_codes(rows, blocks * K_BLOCK, bits, False, seed)
    repacked = repack_for_wgmma(codes, bits, blocks * K_BLOCK)
    assert repacked.shape == codes.shape and repacked.dtype == torch.uint8
    assert torch.equal(unpack_wgmma(repacked, bits, blocks * K_BLOCK), unpack(codes, bits, blocks * K_BLOCK))


@pytest.mark.parametrize("k", [0, 5, 19, 37, 63, 64, 101, 127, 128 + 70])
def test_a_4bit_code_lands_where_thread_t_reads_chunk_c(k: int) -> None:
    """Column 128·blk + 32c + 16h + 4t + b: thread t's word c (byte 64·blk + 16t + 4c), nibble 4h + b."""
    blk, c, h, t, b = k // 128, k % 128 // 32, k % 32 // 16, k % 16 // 4, k % 4
    codes = torch.zeros(1, 256, dtype=torch.uint8)
    codes[0, k] = 0xB
    word = int.from_bytes(bytes(repack_for_wgmma(pack(codes, 4), 4, 256)[0].tolist()), "little") >> 8 * (
        64 * blk + 16 * t + 4 * c
    )
    assert word & 0xFFFFFFFF == 0xB << 4 * (4 * h + b)


@pytest.mark.parametrize("k", [0, 7, 33, 64, 90, 127])
def test_a_2bit_code_lands_where_thread_t_reads_half_u(k: int) -> None:
    """Column 64u + 32r + 16h + 4t + b: thread t's word u (byte 8t + 4u), bits 16h + 4b + 2r."""
    u, r, h, t, b = k // 64, k % 64 // 32, k % 32 // 16, k % 16 // 4, k % 4
    codes = torch.zeros(1, 128, dtype=torch.uint8)
    codes[0, k] = 0x2
    row = bytes(repack_for_wgmma(pack(codes, 2), 2, 128)[0].tolist())
    assert int.from_bytes(row, "little") == 0x2 << 8 * (8 * t + 4 * u) + 16 * h + 4 * b + 2 * r


def test_widths_not_a_multiple_of_the_block_are_refused() -> None:
    with pytest.raises(ValueError, match="the wgmma layout needs in_features divisible by 128, got 1088"):
        repack_for_wgmma(random_codes(2, 1088, 4, False), 4, 1088)
    with pytest.raises(ValueError, match=r"the wgmma layout holds 2–4-bit codes; got bits=8"):
        repack_for_wgmma(torch.zeros(2, 128, dtype=torch.uint8), 8, 128)


# --------------------------------------------------------------------------------------------
# The conversion PTX, run by an interpreter
# --------------------------------------------------------------------------------------------

MASK32 = 0xFFFFFFFF


def prmt(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """PTX `prmt.b32 d, a, b, c` (default mode): byte i of d is byte c[4i+2:4i] of {b, a} (a = bytes 0–3), or
    that byte's sign replicated when c[4i+3] is set."""
    source = a | b << 32
    out = torch.zeros_like(a)
    for i in range(4):
        selector = c >> 4 * i & 0xF
        byte = source >> 8 * (selector & 7) & 0xFF
        byte = torch.where(selector & 8 != 0, torch.where(byte & 0x80 != 0, 0xFF, 0), byte)
        out |= byte << 8 * i
    return out


def run_ptx(asm: str, operands: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a straight-line PTX block of mov/and/or/shr/prmt (b32) on int64 tensors of 32-bit values."""
    regs = dict(operands)

    def value(token: str) -> torch.Tensor:
        token = token.strip()
        return regs[token] if token in regs else torch.full_like(next(iter(operands.values())), int(token, 0))

    for line in asm.replace(";", ";\n").splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dest, *srcs = (a.strip() for a in args.split(","))
        v = [value(s) for s in srcs]
        if op == "mov.b32":
            result = v[0]
        elif op == "and.b32":
            result = v[0] & v[1]
        elif op == "or.b32":
            result = v[0] | v[1]
        elif op == "shr.u32":
            result = v[0] >> v[1]
        elif op == "prmt.b32":
            result = prmt(*v)
        else:
            raise AssertionError(f"the interpreter does not know {op}")
        regs[dest] = result & MASK32
    return regs


def convert_like_the_kernel(repacked: torch.Tensor, bits: int, ternary: bool) -> torch.Tensor:
    """The kernel's `_halves` + `_to_e4m3` on one K block of re-packed bytes (rows, 128 · slot / 8) → e4m3 bytes
    (rows, 128): its words through the PTX, the outputs joined and permuted in the same order."""
    slot = slot_bits(bits)
    asm = gluon_w4a8._conversion_asm.fn(slot, signed_offset(bits, ternary))
    rows = repacked.shape[0]
    half_run = repacked.shape[1] // 8
    halves = (
        repacked.reshape(rows, 4, 2, half_run).permute(0, 1, 3, 2).unbind(-1)
    )  # (rows, thread, byte) each
    converted = []
    for half in halves:
        words = half.reshape(rows, -1, 4).long()  # every 4 consecutive bytes: one 32-bit operand
        words = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
        n_out = 2 if slot == 4 else 4
        regs = run_ptx(asm, {f"${n_out}": words})
        outs = [
            torch.stack([regs[f"${i}"] >> 8 * j & 0xFF for j in range(4)], -1).reshape(rows, -1)
            for i in range(n_out)
        ]
        if slot == 4:
            w = torch.stack(outs, -1).reshape(rows, 4, 2, 4, 2).permute(0, 2, 4, 1, 3)
        else:
            w = torch.stack([torch.stack(outs[:2], -1), torch.stack(outs[2:], -1)], -1)
            w = w.reshape(rows, 4, 4, 2, 2).permute(0, 4, 3, 1, 2)
        converted.append(w.reshape(rows, 64))
    return torch.cat(converted, 1).to(torch.uint8)


@pytest.mark.parametrize(("bits", "ternary"), WIDTHS, ids=["int4", "int3", "int2", "ternary"])
def test_the_conversion_gives_every_code_its_e4m3_byte_in_its_column(bits: int, ternary: bool) -> None:
    codes = random_codes(64, K_BLOCK, bits, ternary, seed=bits)
    e4m3 = convert_like_the_kernel(repack_for_wgmma(codes, bits, K_BLOCK), bits, ternary)
    q = unpack(codes, bits, K_BLOCK).float() - signed_offset(bits, ternary)
    assert torch.equal(e4m3, q.to(torch.float8_e4m3fn).view(torch.uint8))


def test_the_interpreter_permutes_and_replicates_signs_as_ptx_does() -> None:
    a, b = torch.tensor([0x807F01FF]), torch.tensor([0x44332211])
    assert int(prmt(a, b, torch.tensor([0x0123]))) == 0xFF017F80  # bytes of a reversed
    assert int(prmt(a, b, torch.tensor([0x4567]))) == 0x11223344  # bytes of b reversed
    assert int(prmt(a, b, torch.tensor([0xBA98]))) == 0xFF0000FF  # the signs of a's bytes


# --------------------------------------------------------------------------------------------
# The reference and the launcher's checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 64, 128])
@pytest.mark.parametrize(("bits", "ternary"), WIDTHS, ids=["int4", "int3", "int2", "ternary"])
def test_the_reference_is_the_dequantized_product(bits: int, ternary: bool, group_size: int | None) -> None:
    m, k, n = 5, 256, 24
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(m, k, generator=g) * 40).to(torch.float8_e4m3fn)
    x_scale = torch.rand(m, 1, generator=g) + 0.5
    codes = random_codes(n, k, bits, ternary)
    scales = torch.rand(n, k // (group_size or k), generator=g) + 0.1
    bias = torch.randn(n, generator=g)
    y = gluon_w4a8.gluon_w4a8_reference(x, x_scale, repack_for_wgmma(codes, bits, k), scales, bias, bits=bits,
                                        ternary=ternary, group_size=group_size)  # fmt: skip
    q = unpack(codes, bits, k).double() - signed_offset(bits, ternary)
    weight = q * scales.double().repeat_interleave(group_size or k, dim=1)
    expected = (x.double() * x_scale.double()) @ weight.T + bias.double()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-9)


def operands(m: int = 4, k: int = 256, n: int = 16, bits: int = 4, group_size: int | None = None) -> dict:
    codes = repack_for_wgmma(random_codes(n, k, bits, False), bits, k)
    return dict(x=torch.zeros(m, k, dtype=torch.float8_e4m3fn), x_scale=torch.ones(m, 1), packed=codes,
                scales=torch.ones(n, k // (group_size or k)), bias=None)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(x=torch.zeros(4, 256)), r"x must be contiguous 2-D e4m3 codes, got torch.float32 \(4, 256\)"),
        (
            dict(x=torch.zeros(4, 192, dtype=torch.float8_e4m3fn)),
            "K must be a positive multiple of 128, got 192",
        ),
        (dict(x=torch.zeros(4, 0, dtype=torch.float8_e4m3fn)), "K must be a positive multiple of 128, got 0"),
        (
            dict(x_scale=torch.ones(3, 1)),
            r"x_scale must be 4 contiguous float32 row scales, got torch.float32 \(3, 1\)",
        ),
        (
            dict(packed=torch.zeros(16, 64, dtype=torch.uint8)),
            r"packed must be uint8 \(N, 128\) for K=256, got",
        ),
        (
            dict(packed=torch.zeros(12, 128, dtype=torch.uint8), scales=torch.ones(12, 1)),
            r"N must be a multiple of 8 \(16-byte output rows\), got 12",
        ),
        (
            dict(scales=torch.ones(16, 2)),
            r"scales must be contiguous float32 \(16, 1\), got torch.float32 \(16, 2\)",
        ),
        (dict(bias=torch.zeros(8)), r"bias must be contiguous \(16,\), got \(8,\)"),
    ],
    ids=["float-x", "k", "empty-k", "x-scale", "packed", "n", "scales", "bias"],
)
def test_operands_the_kernel_would_misread_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gluon_w4a8.gluon_w4a8_linear(**(operands() | change), bits=4)


def test_group_sizes_other_than_64_and_128_are_refused() -> None:
    with pytest.raises(ValueError, match="group_size must be None \\(per channel\\), 64 or 128, got 32"):
        gluon_w4a8.gluon_w4a8_linear(**operands(group_size=32), bits=4, group_size=32)


def test_the_kernel_takes_no_8bit_codes() -> None:
    with pytest.raises(ValueError, match="the kernel takes 2–4-bit codes; got bits=8"):
        gluon_w4a8.gluon_w4a8_linear(
            **(operands() | dict(packed=torch.zeros(16, 256, dtype=torch.uint8))), bits=8
        )


def test_the_tables_hold_exact_e4m3_bytes() -> None:
    values = torch.arange(-15, 16)
    expected = values.float().to(torch.float8_e4m3fn).view(torch.uint8)
    assert [gluon_w4a8._e4m3_bits.fn(int(v)) for v in values] == expected.tolist()


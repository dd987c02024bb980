"""The lowbit GEMM (packed codes read directly) against its reference and the oracle; the FP8 backends'
few-row route through it. Triton runs under `TRITON_INTERPRET=1` on the CPU: shapes are small and odd."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import prepare_for_inference
from ditq.kernels.lowbit import LOWBIT_MAX_ROWS, lowbit_gemm, lowbit_support
from ditq.kernels.triton.lowbit_gemm import effective_split, lowbit_linear, lowbit_linear_reference
from ditq.quant.packing import signed_offset
from ditq.quant.primitives import fp8_quantize
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from tests.kernels.test_backends import SPECS, inputs, layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KERNEL_CASES = {  # (spec, K, M): every slot width, sym/asym, per channel and every group size, odd M and K
    "int4 per-channel K131": (QuantSpec(w_bits=4), 131, 5),
    "int4 g16": (QuantSpec(w_bits=4, group_size=16), 96, 17),
    "int4 g32 asym": (QuantSpec(w_bits=4, group_size=32, symmetric=False), 128, 33),
    "int3 g64": (QuantSpec(w_bits=3, group_size=64), 192, 1),
    "int3 asym per-channel": (QuantSpec(w_bits=3, symmetric=False), 70, 70),
    "int2 g128": (QuantSpec(w_bits=2, group_size=128), 256, 3),
    "ternary K70": (QuantSpec(w_bits=2, w_format="ternary"), 70, 129),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_the_dequantized_reference(case):
    spec, k, m = KERNEL_CASES[case]
    g = torch.Generator().manual_seed(k + m)
    q = QuantLinear.from_linear(torch.nn.Linear(k, 40), spec).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    offset = signed_offset(spec.w_bits, spec.w_format == "ternary") if spec.symmetric else 0
    out = lowbit_linear(
        x,
        q.qweight,
        q.scales,
        q.zeros,
        q.bias,
        bits=spec.w_bits,
        offset=offset,
        group_size=spec.group_size,
        block_n=16,
        block_k=32,
    )
    ref = lowbit_linear_reference(x, q.dequantized_weight(torch.float32), q.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


FP8_CASES = {  # symmetric codes only: every slot width, per channel and every FP8 group size, odd M and K
    "int4 per-channel K131": (QuantSpec(w_bits=4), 131, 5),
    "int4 g32": (QuantSpec(w_bits=4, group_size=32), 128, 33),
    "int3 g64": (QuantSpec(w_bits=3, group_size=64), 192, 1),
    "int4 g128": (QuantSpec(w_bits=4, group_size=128), 384, 9),
    "int2 per-channel": (QuantSpec(w_bits=2), 96, 18),
    "ternary K70": (QuantSpec(w_bits=2, w_format="ternary"), 70, 17),
}


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_kernel_on_e4m3_activation_codes_matches_the_reference(case):
    """W4A8-FP8: e4m3 codes times the weight's codes, both scales in the epilogue; exact up to the float32
    accumulation order (and Hopper's FP8 accumulation on a GPU)."""
    spec, k, m = FP8_CASES[case]
    g = torch.Generator().manual_seed(k + m)
    q = QuantLinear.from_linear(torch.nn.Linear(k, 48), spec).to(DEVICE)
    codes, scale = fp8_quantize(torch.randn(m, k, generator=g).to(DEVICE))
    out = lowbit_linear(codes, q.qweight, q.scales, None, q.bias, bits=spec.w_bits,
                        offset=signed_offset(spec.w_bits, spec.w_format == "ternary"), group_size=spec.group_size,
                        x_scale=scale, out_dtype=torch.float32, block_m=16, block_n=16, block_k=32)  # fmt: skip
    ref = (codes.float() * scale) @ q.dequantized_weight(torch.float32).t() + q.bias
    tol = dict(rtol=2e-3, atol=2e-3) if codes.is_cuda else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)


def test_e4m3_codes_need_their_row_scales_and_symmetric_weights():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantSpec(w_bits=4, symmetric=False))
    codes, scale = fp8_quantize(torch.randn(3, 64))
    with pytest.raises(ValueError, match="need their row scales"):
        lowbit_linear(codes, q.qweight, q.scales, None, None, bits=4, offset=8, group_size=None)
    with pytest.raises(ValueError, match="symmetric weights only"):
        lowbit_linear(codes, q.qweight, q.scales, q.zeros, None, bits=4, offset=0, group_size=None, x_scale=scale,
                      out_dtype=torch.bfloat16)  # fmt: skip
    with pytest.raises(ValueError, match="3 float32 row scales"):
        lowbit_linear(codes, q.qweight, q.scales, None, None, bits=4, offset=8, group_size=None,
                      x_scale=scale[:2], out_dtype=torch.bfloat16)  # fmt: skip
    with pytest.raises(ValueError, match="e4m3 activation codes need an out_dtype"):
        lowbit_linear(codes, q.qweight, q.scales, None, None, bits=4, offset=8, group_size=None, x_scale=scale)
    with pytest.raises(ValueError, match="out_dtype must be"):
        lowbit_linear(codes, q.qweight, q.scales, None, None, bits=4, offset=8, group_size=None, x_scale=scale,
                      out_dtype=torch.int32)  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "k", "split_k", "codes"),
    [(QuantSpec(w_bits=4), 131, 3, False), (QuantSpec(w_bits=4, group_size=32, symmetric=False), 128, 2, False),
     (QuantSpec(w_bits=2, w_format="ternary"), 70, 4, False), (QuantSpec(w_bits=4, group_size=32), 128, 3, True)],
    ids=["int4_k131_3_splits", "int4_g32_asym_2_splits", "ternary_4_splits_one_past_k", "fp8_codes_g32_3_splits"],
)  # fmt: skip
def test_split_k_sums_its_partials_to_the_reference(spec, k, split_k, codes):
    """K's steps split over programs (131 = 5 steps of 32 in 3 splits; 70 = 3 steps asked in 4 splits, run in 3):
    every partial scaled, the bias added once, the same output as one program per tile."""
    g = torch.Generator().manual_seed(k + split_k)
    q = QuantLinear.from_linear(torch.nn.Linear(k, 40), spec).to(DEVICE)
    x = torch.randn(3, k, generator=g).to(DEVICE)
    kwargs = dict(bits=spec.w_bits, offset=signed_offset(spec.w_bits, spec.w_format == "ternary") if spec.symmetric
                  else 0, group_size=spec.group_size, block_n=16, block_k=32)  # fmt: skip
    if codes:
        x, scale = fp8_quantize(x)
        kwargs |= dict(x_scale=scale, out_dtype=torch.float32, block_m=16)
    whole = lowbit_linear(x, q.qweight, q.scales, q.zeros, q.bias, **kwargs)
    split = lowbit_linear(x, q.qweight, q.scales, q.zeros, q.bias, **kwargs, split_k=split_k)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    ref = lowbit_linear_reference(x.float() * (scale if codes else 1), q.dequantized_weight(torch.float32), q.bias)
    torch.testing.assert_close(split, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="split_k must be at least 1"):
        lowbit_linear(x, q.qweight, q.scales, q.zeros, q.bias, **kwargs, split_k=0)


def test_a_split_gives_every_program_an_equal_share_of_k():
    # DiT-XL/2's adaLN, K = 1152: 9 steps of 128 in 4 → 3 programs of 3, in 8 → 5 of 2; 2 steps of 1024 stay 2
    assert [effective_split(1152, 128, s) for s in (1, 2, 3, 4, 8, 9, 16)] == [1, 2, 3, 3, 5, 9, 9]
    assert [effective_split(1152, 1024, s) for s in (2, 4, 8)] == [2, 2, 2]
    assert effective_split(70, 32, 4) == 3 and effective_split(131, 32, 3) == 3


@pytest.mark.parametrize(("group", "k"), [(48, 96), (96, 192), (192, 384), (None, 300)])
def test_kernel_at_its_default_launch_config(group, k):
    """Group sizes that are not powers of two, and a per-channel K over one block but not a multiple of it."""
    spec = QuantSpec(w_bits=4, group_size=group)
    q = QuantLinear.from_linear(torch.nn.Linear(k, 40), spec).to(DEVICE)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k)).to(DEVICE)
    out = lowbit_linear(x, q.qweight, q.scales, q.zeros, q.bias, bits=4, offset=8, group_size=group)
    ref = lowbit_linear_reference(x, q.dequantized_weight(torch.float32), q.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_operands_that_do_not_fit():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantSpec(w_bits=4, group_size=32))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"scales must be contiguous \(16, 1\) for group_size=None"):
        lowbit_linear(x, q.qweight, q.scales, None, None, bits=4, offset=8, group_size=None)
    with pytest.raises(ValueError, match=r"scales must be contiguous \(16, 1\) for group_size=64"):
        lowbit_linear(x, q.qweight, q.scales, None, None, bits=4, offset=8, group_size=64)
    with pytest.raises(ValueError, match="multiple of 16 that divides K=64"):
        lowbit_linear(x, q.qweight, q.scales, None, None, bits=4, offset=8, group_size=24)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        lowbit_linear(x, q.qweight, q.scales, None, torch.zeros(8), bits=4, offset=8, group_size=32)
    with pytest.raises(ValueError, match="uint8"):
        lowbit_linear(x, q.qweight.to(torch.int8), q.scales, None, None, bits=4, offset=8, group_size=32)


def test_kernel_refuses_what_it_cannot_read():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantSpec(w_bits=4, group_size=32))
    with pytest.raises(ValueError, match="2-D"):
        lowbit_linear(torch.randn(2, 3, 64), q.qweight, q.scales, None, None, bits=4, offset=8, group_size=32)
    with pytest.raises(ValueError, match="bytes per row"):
        lowbit_linear(torch.randn(2, 62), q.qweight, q.scales, None, None, bits=4, offset=8, group_size=32)
    with pytest.raises(ValueError, match="2–4-bit"):
        lowbit_linear(torch.randn(2, 64), q.qweight, q.scales, None, None, bits=8, offset=8, group_size=32)


SUPPORTED = [name for name in SPECS if lowbit_support(layer(SPECS[name]).to(DEVICE)) is None]


def test_the_backend_takes_every_2_to_4_bit_spec_served_at_its_bits():
    assert set(SPECS) - set(SUPPORTED) == {"w5_a4g16_asym", "w8_a8_static", "w4_of_8"}


@pytest.mark.parametrize("name", SUPPORTED)
def test_backend_computes_the_oracle(name):
    m = layer(SPECS[name]).to(DEVICE)
    x = inputs(3, 7).to(DEVICE)
    ref = m(x)
    prepare_for_inference(m, "lowbit")
    assert m.backend == "lowbit"
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


def test_op_passes_opcheck():
    m = layer(SPECS["w3_asym"]).to(DEVICE)
    args = (inputs(2, 5).to(DEVICE), m.qweight, m.scales, m.zeros, m.bias, 3, 0, 0)
    torch.library.opcheck(lowbit_gemm, args, test_utils=("test_schema", "test_faketensor"))
    codes, scale = fp8_quantize(inputs(2, 5).reshape(10, -1).to(DEVICE))  # opcheck's schema test takes no float8
    m = layer(QuantSpec(w_bits=4, group_size=32)).to(DEVICE)
    args = (codes, m.qweight, m.scales, None, m.bias, 4, 8, 32, scale, torch.bfloat16)
    torch.library.opcheck(lowbit_gemm, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize(("spec", "reason"), [
    (QuantSpec(w_bits=8), "int2–int4"),
    (QuantSpec(w_bits=4, stored_bits=8), "served at their stored bits"),
    (QuantSpec(w_bits=4, group_size=8), "multiples of 16"),
], ids=["int8", "nested", "g8"])  # fmt: skip
def test_layers_it_cannot_run_keep_the_reference_and_say_why(spec, reason):
    m = QuantLinear.from_linear(torch.nn.Linear(64, 16), spec).to(DEVICE)
    assert reason in lowbit_support(m)
    prepare_for_inference(m, "lowbit")
    assert m.backend == "reference"


def test_the_per_call_fp8_backend_sends_few_rows_to_the_lowbit_kernel():
    spec = QuantSpec(w_bits=4, a_bits=8, a_format="fp8")
    m = QuantLinear.from_linear(torch.nn.Linear(48, 32), spec).to(DEVICE)
    few = torch.randn(LOWBIT_MAX_ROWS, 48, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    lowbit = QuantLinear.from_linear(torch.nn.Linear(48, 32), spec).to(DEVICE)
    lowbit.load_state_dict(m.state_dict())
    prepare_for_inference(lowbit, "lowbit")
    prepare_for_inference(m, "fp8")
    assert torch.equal(m(few), lowbit(few))
    many = torch.cat([few, few[:1]])  # one row more: the FP8 GEMM, same values up to its rounding
    assert not torch.equal(m(many)[:-1], lowbit(few))
    tol = (
        dict(rtol=1e-3, atol=2e-4) if few.is_cuda else dict(rtol=1e-4, atol=1e-5)
    )  # Hopper's FP8 accumulation
    torch.testing.assert_close(m(many)[:-1], lowbit(few), **tol)

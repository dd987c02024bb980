"""The FP8 path: Triton kernels against their PyTorch references (interpreter on CPU), the backends against
the oracle, opcheck, and compile. Shapes are small and odd on purpose (M not a multiple of anything, K past
a block edge)."""

from __future__ import annotations

import os

import pytest
import torch

from ditq.kernels import prepare_for_inference
from ditq.kernels.fp8 import LOWRANK_RANGE, _lowrank_parts, expand_fp8, fp8_support
from ditq.kernels.lowbit import lowbit_gemm
from ditq.kernels.triton.expand import expand_to_fp8, expand_to_fp8_reference
from ditq.quant.packing import pack, to_unsigned
from ditq.quant.primitives import fp8_quantize
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize(
    ("bits", "ternary"),
    [(4, False), (3, False), (2, False), (2, True)],
    ids=["int4", "int3", "int2", "ternary"],
)
@pytest.mark.parametrize("cols", [16, 50, 131])
def test_expansion_is_exact(bits, ternary, cols):
    g = torch.Generator().manual_seed(cols)
    lo, hi = (-1, 1) if ternary else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    codes = torch.randint(lo, hi + 1, (37, cols), generator=g, dtype=torch.int8)
    packed = pack(to_unsigned(codes, bits, ternary=ternary), bits).to(DEVICE)
    out = expand_to_fp8(packed, bits, cols, ternary=ternary)
    assert out.dtype == torch.float8_e4m3fn and out.shape == (37, cols)
    assert torch.equal(out.float().cpu(), codes.float())
    assert torch.equal(out.float(), expand_to_fp8_reference(packed, bits, cols, ternary=ternary).float())


SPECS = {
    "int4": QuantSpec(w_bits=4, a_bits=8, a_format="fp8"),
    "int2": QuantSpec(w_bits=2, a_bits=8, a_format="fp8"),
    "ternary": QuantSpec(w_bits=2, w_format="ternary", a_bits=8, a_format="fp8"),
    "int4_smooth_rank4": QuantSpec(w_bits=4, a_bits=8, a_format="fp8", smooth=True, rank=4),
}


def layer(spec: QuantSpec, dtype: torch.dtype = torch.float32) -> QuantLinear:
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(48, 32)
    kw = {}
    if spec.smooth:
        kw["smooth"] = torch.rand(48, generator=g) + 0.5
    if spec.rank:
        kw["lowrank_down"] = torch.randn(48, spec.rank, generator=g) * 0.1
        kw["lowrank_up"] = torch.randn(spec.rank, 32, generator=g) * 0.1
    return QuantLinear.from_linear(linear, spec, **kw).to(DEVICE, dtype)


def fp8_lowrank_oracle(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the FP8 backends compute for a layer with SVDQuant's branch, in float32 from the math of
    `ditq.kernels.fp8._lowrank_parts`: the main GEMM on the e4m3 input, plus the e4m3 low-rank codes P times
    U's two e4m3 parts."""
    up, down, down_scale, shift = _lowrank_parts(m)
    h = (x / m.smooth).reshape(-1, x.shape[-1])
    codes, scale_x = fp8_quantize(h)
    p = ((codes.float() @ down.float()) * down_scale).to(torch.float8_e4m3fn).float()
    high = up.to(torch.float8_e4m3fn).float()
    up_sum = high + (up - high).to(torch.float8_e4m3fn).float()
    lowrank = (p @ up_sum.t()) * scale_x * (m.scales.reshape(1, -1) * shift)
    y = (codes.float() * scale_x) @ m.dequantized_weight(torch.float32).t() + m.bias + lowrank
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
@pytest.mark.parametrize("name", list(SPECS))
def test_fp8_backends_compute_the_reference(name, backend):
    m = layer(SPECS[name])
    x = torch.randn(3, 47, 48, generator=torch.Generator().manual_seed(2)).to(
        DEVICE
    )  # > LOWBIT_MAX_ROWS rows
    ref = m(x) if m.lowrank_up is None else fp8_lowrank_oracle(m, x)
    prepare_for_inference(m, backend)
    assert m.backend == backend
    out = m(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # exact fp8 products summed in fp32 and scaled once, against fp32 dequantized operands; Hopper's FP8 tensor
    # cores accumulate with fewer mantissa bits than float32 (a few 1e-5 absolute at these sizes)
    tol = dict(rtol=1e-3, atol=2e-4) if out.is_cuda else dict(rtol=1e-4, atol=1e-5)
    if m.lowrank_up is not None and out.is_cuda:  # and there a low-rank code P, rounded from another float32
        # sum, lands one e4m3 step off at a rare row (seen on an H200: 29 of 4,512 outputs, 1.2e-2 apart)
        assert float((out - ref).norm() / ref.norm()) < 5e-3
        return
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
@pytest.mark.parametrize(
    ("spec", "k"),
    [(QuantSpec(w_bits=4, group_size=32, a_bits=8, a_format="fp8"), 96),
     (QuantSpec(w_bits=4, group_size=64, a_bits=8, a_format="fp8", smooth=True), 192),
     (QuantSpec(w_bits=2, w_format="ternary", group_size=32, a_bits=8, a_format="fp8"), 64)],
    ids=["int4_g32", "int4_g64_smooth", "ternary_g32"],
)  # fmt: skip
def test_per_group_layers_run_the_packed_codes_on_fp8_tensor_cores(spec, k, backend, monkeypatch):
    """A scale per group cannot ride in cuBLAS's row-wise scales: these layers take the lowbit kernel's FP8 mode,
    which reads the packed codes (nothing expanded or cached but the smoothing's reciprocal), and compute the
    oracle up to summation order."""
    from ditq.kernels import fp8

    g = torch.Generator().manual_seed(k)
    smooth = dict(smooth=torch.rand(k, generator=g) + 0.5) if spec.smooth else {}
    m = QuantLinear.from_linear(torch.nn.Linear(k, 48), spec, **smooth).to(DEVICE)
    x = torch.randn(2, 71, k, generator=g).to(DEVICE)  # > LOWBIT_MAX_ROWS rows: not the few-row route
    ref = m(x)
    calls = []

    def spy(*args):
        calls.append((args[0].dtype, args[1].dtype, args[-2].dtype))  # activations, weights, row scales
        return lowbit_gemm(*args)

    monkeypatch.setattr(fp8, "lowbit_gemm", spy)
    prepare_for_inference(m, backend)
    assert m.backend == backend and m.kernel_buffers == (("inv_smooth",) if spec.smooth else ())  # no weight copy
    out = m(x)
    assert calls == [(torch.float8_e4m3fn, torch.uint8, torch.float32)]  # e4m3 codes, packed codes, scales
    tol = dict(rtol=1e-3, atol=2e-4) if out.is_cuda else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch._dynamo.reset()
    monkeypatch.undo()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
def test_fp8_backends_smooth_by_the_reciprocal_in_every_path(backend, monkeypatch):
    """x / smooth is applied as x · inv_smooth, inv_smooth = 1/smooth computed once in float32 (kept so through
    `.to(bf16)`), the product kept in float32: the compiler's ordinary ops, eager and compiled, and the pre-pass
    give the same codes, from values at most one bf16 step from the quotient; "fp8"'s few-row route (the lowbit
    kernel) smooths by the same product."""
    from ditq.kernels import lowbit
    from ditq.kernels.fp8 import _input_codes, quantize_rows
    from ditq.quant.primitives import fp8_cast, fp8_scale

    m = layer(QuantSpec(w_bits=4, a_bits=8, a_format="fp8", smooth=True))
    prepare_for_inference(m, backend)
    m.to(torch.bfloat16)
    assert m.inv_smooth.dtype == torch.float32 and torch.equal(m.inv_smooth, 1 / m.smooth.float())
    x = (torch.randn(139, 48, generator=torch.Generator().manual_seed(7)) * 3).to(DEVICE, torch.bfloat16)
    product = x.float() * m.inv_smooth
    quotient = x / m.smooth.to(torch.bfloat16)
    assert 0 < (product.to(torch.bfloat16) != quotient).float().mean() < 0.5  # a product, not the quotient
    torch.testing.assert_close(product, quotient.float(), rtol=2**-7, atol=0)
    expected_scales = fp8_scale(product)
    expected = fp8_cast(product, expected_scales).float()
    assert (expected != fp8_cast(product.to(torch.bfloat16), expected_scales).float()).any()  # unrounded counts
    ordinary, ordinary_scales = _input_codes(m, x)
    torch._dynamo.reset()
    compiled, compiled_scales = torch.compile(lambda v: _input_codes(m, v), fullgraph=True)(x)
    pre_pass, pre_pass_scales, _ = quantize_rows(x, m.inv_smooth, "none")
    for codes, scales in ((ordinary, ordinary_scales), (compiled, compiled_scales), (pre_pass, pre_pass_scales)):
        assert torch.equal(scales, expected_scales) and torch.equal(codes.float(), expected)
    few = x[:5]
    y = m(few)
    assert y.dtype == torch.bfloat16 and y.shape == (5, m.out_features)
    seen = []  # what the lowbit route hands its oracle: the smoothed input, and no smooth left to divide by
    monkeypatch.setattr(lowbit, "linear_with", lambda matmul, h, smooth, *rest: seen.append((h, smooth)) or h)
    m(few)
    assert (backend == "fp8") == bool(seen)
    if seen:
        assert seen[0][1] is None and torch.equal(seen[0][0], product[:5])


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
@pytest.mark.parametrize("fast", [None, False, True], ids=["default", "off", "on"])
def test_the_gemm_asks_cublas_for_fast_accumulation_exactly_when_chosen(backend, fast, monkeypatch):
    from ditq.kernels import fp8

    m = layer(SPECS["int4"])
    prepare_for_inference(m, backend, fast_accumulation=not fp8.DEFAULT_FAST_ACCUMULATION)  # then switched
    x = torch.randn(139, 48, generator=torch.Generator().manual_seed(8)).to(DEVICE)  # past the few-row route
    other = m(x)
    asked = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: asked.append(kw["use_fast_accum"]) or scaled_mm(*a, **kw))
    prepare_for_inference(m, backend, fast_accumulation=fast)
    out = m(x)
    assert asked == [fp8.DEFAULT_FAST_ACCUMULATION if fast is None else fast]
    if not out.is_cuda:  # the CPU has one accumulation
        torch.testing.assert_close(out, other, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
@pytest.mark.parametrize("up_gain", [1.0, 300.0], ids=["fits", "rows_shifted"])
def test_the_fp8_low_rank_branch_stays_within_e4m3_rounding_of_the_16_bit_one(backend, up_gain):
    """The branch rides in the GEMM as e4m3 operands; rows whose up-projection outgrows e4m3 beside the
    weight's scale shift that scale by a power of two (`up_gain` forces them)."""
    m = layer(SPECS["int4_smooth_rank4"])
    x = torch.randn(139, 48, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        m.lowrank_up.mul_(up_gain)
        ref = m(x)  # the reference backend: the branch in x's dtype
        branch = (x / m.smooth) @ m.lowrank_down @ m.lowrank_up
        assert (_lowrank_parts(m)[3] > 1).any() == (up_gain > 1)
        prepare_for_inference(m, backend)
        out = m(x)
        error = float((out - ref).norm() / branch.norm())
        exact = fp8_lowrank_oracle(m, x)  # the shifted rows' main product too, which the branch dwarfs here
        main = ref - branch - m.bias
        assert float((out - exact).norm() / main.norm()) < (1e-2 if out.is_cuda else 1e-5)
    # the e4m3 roundings of the input and P (RMS 2⁻³/√12 ≈ 3.6% each), U's two parts about bf16's
    assert error < 0.06


@pytest.mark.parametrize("broken", ["huge_up", "zero_scale"])
def test_a_low_rank_branch_beyond_the_row_shifts_keeps_the_reference(broken):
    m = layer(SPECS["int4_smooth_rank4"])
    with torch.no_grad():
        if broken == "huge_up":
            m.lowrank_up[0, 0] = 1e9
        else:  # U would be infinite, or NaN in the rank's zero padding
            m.scales[0] = 0.0
    assert fp8_support(m) == LOWRANK_RANGE
    assert prepare_for_inference(m, "fp8-cached").backend == "reference"


def test_bf16_inputs_stay_within_bf16_rounding_of_the_reference():
    m = layer(SPECS["int4"], torch.bfloat16)
    x = torch.randn(139, 48, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    ref = m(x).float()
    prepare_for_inference(m, "fp8")
    out = m(x).float()
    assert out.dtype == torch.float32 and float((out - ref).norm() / ref.norm()) < 1e-2


def test_expansion_op_passes_opcheck():
    m = layer(SPECS["int4"])
    for args in ((m.qweight, 4, 48, False), (layer(SPECS["ternary"]).qweight, 2, 48, True)):
        torch.library.opcheck(expand_fp8, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
def test_fp8_layers_compile_fullgraph_to_what_eager_computes(backend):
    m = prepare_for_inference(layer(SPECS["int4_smooth_rank4"]), backend)
    x = torch.randn(130, 48, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (QuantSpec(w_bits=4, group_size=16, a_bits=8, a_format="fp8"), "groups of a multiple of 32 columns"),
        (QuantSpec(w_bits=4, group_size=48, a_bits=8, a_format="fp8", rank=4),
         "needs per-channel weight scales (the branch rides in cuBLAS's FP8 GEMM): quantize with "
         "SVDQuant(group_size=None, ...), not the svdquant-w4a8 preset"),
        (QuantSpec(w_bits=8, a_bits=8, a_format="fp8"), "int2–int4"),
        (QuantSpec(w_bits=4, symmetric=False, a_bits=8, a_format="fp8"), "symmetric"),
        (QuantSpec(w_bits=4, a_bits=8), "dynamic per-token FP8"),
        (QuantSpec(w_bits=4, stored_bits=8, a_bits=8, a_format="fp8"), "served at their stored bits"),
    ],
    ids=["g16", "groups_lowrank", "int8", "asym", "int8_acts", "nested"],
)
def test_layers_the_fp8_path_cannot_run_keep_the_reference_and_say_why(spec, reason):
    m = layer(spec)
    assert reason in fp8_support(m)
    prepare_for_inference(m, "fp8")
    assert m.backend == "reference"


def test_a_dtype_cast_after_prepare_keeps_the_kernel_format():
    m = prepare_for_inference(layer(SPECS["int4"]), "fp8-cached").to(torch.bfloat16)
    assert m.weight_fp8.dtype == torch.float8_e4m3fn and m.fp8_scale_w.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16
    x = torch.randn(131, 48, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    assert m(x).dtype == torch.bfloat16


@pytest.mark.skipif(DEVICE != "cuda", reason="codes are parked from a CUDA device in host memory")
@pytest.mark.parametrize("name", ["int4", "int4_smooth_rank4"])
def test_fp8_cached_parks_the_codes_in_host_memory_and_brings_them_back(name):
    m = layer(SPECS[name], torch.bfloat16)
    codes, device = m.qweight.clone(), m.qweight.device
    x = torch.randn(5, 48, device=DEVICE, dtype=torch.bfloat16)
    reference = m(x)
    prepare_for_inference(m, "fp8-cached")
    assert m.qweight.device.type == "cpu" and m.codes_home == device  # one copy of the weights on the device
    cached = m(x)
    m.to(DEVICE)  # a device move leaves parked codes parked
    assert m.qweight.device.type == "cpu" and torch.equal(m.state_dict()["qweight"], codes.cpu())
    assert torch.equal(m(x), cached)
    prepare_for_inference(m, "reference")  # dropping the backend's buffers brings the codes back
    assert m.codes_home is None and m.qweight.device == device and torch.equal(m.qweight, codes)
    assert torch.equal(m(x), reference)

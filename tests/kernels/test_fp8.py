"""The FP8 path: Triton kernels against their PyTorch references (interpreter on CPU), the backends against
the oracle, opcheck, and compile. Shapes are small and odd on purpose (M not a multiple of anything, K past
a block edge)."""

from __future__ import annotations

import os

import pytest
import torch

from ditq.kernels import prepare_for_inference
from ditq.kernels.fp8 import expand_fp8, fp8_support
from ditq.kernels.triton.expand import expand_to_fp8, expand_to_fp8_reference
from ditq.quant.packing import pack, to_unsigned
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


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
@pytest.mark.parametrize("name", list(SPECS))
def test_fp8_backends_compute_the_reference(name, backend):
    m = layer(SPECS[name])
    x = torch.randn(3, 47, 48, generator=torch.Generator().manual_seed(2)).to(
        DEVICE
    )  # > LOWBIT_MAX_ROWS rows
    ref = m(x)
    prepare_for_inference(m, backend)
    assert m.backend == backend
    out = m(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # exact fp8 products summed in fp32 and scaled once, against fp32 dequantized operands; Hopper's FP8 tensor
    # cores accumulate with fewer mantissa bits than float32 (a few 1e-5 absolute at these sizes)
    tol = dict(rtol=1e-3, atol=2e-4) if out.is_cuda else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)


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
        (QuantSpec(w_bits=4, group_size=16, a_bits=8, a_format="fp8"), "per-channel only"),
        (QuantSpec(w_bits=8, a_bits=8, a_format="fp8"), "int2–int4"),
        (QuantSpec(w_bits=4, symmetric=False, a_bits=8, a_format="fp8"), "symmetric"),
        (QuantSpec(w_bits=4, a_bits=8), "dynamic per-token FP8"),
        (QuantSpec(w_bits=4, stored_bits=8, a_bits=8, a_format="fp8"), "served at their stored bits"),
    ],
    ids=["groups", "int8", "asym", "int8_acts", "nested"],
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

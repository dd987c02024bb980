"""The kernel boundary: custom ops pass opcheck, backends are chosen once, and compiled == eager."""

from __future__ import annotations

import logging

import pytest
import torch

from ditq.kernels import BACKENDS, Backend, group_linear, prepare_for_inference, register_backend
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from tests.kernels.compiled import assert_compiled_matches_eager

IN, OUT = 64, 24

# Every kind of QuantSpec today: int 2–8 bits, ternary, groups, sym/asym, static/dynamic int and fp8
# activations, smoothing, low-rank, nested (stored 8, served 4).
SPECS = {
    "w2": QuantSpec(w_bits=2, group_size=32),
    "w3_asym": QuantSpec(w_bits=3, symmetric=False),
    "w4g32_a8": QuantSpec(w_bits=4, group_size=32, a_bits=8),
    "w5_a4g16_asym": QuantSpec(w_bits=5, a_bits=4, a_group_size=16, a_symmetric=False),
    "w8_a8_static": QuantSpec(w_bits=8, a_bits=8, a_dynamic=False),
    "ternary_a8": QuantSpec(w_bits=2, w_format="ternary", a_bits=8),
    "w4_fp8": QuantSpec(w_bits=4, group_size=32, a_bits=8, a_format="fp8"),
    "w4_fp8_static": QuantSpec(w_bits=4, a_bits=8, a_format="fp8", a_dynamic=False),
    "w4a4_smooth_rank8": QuantSpec(w_bits=4, group_size=16, a_bits=4, a_group_size=16, rank=8, smooth=True),
    "w4_of_8": QuantSpec(w_bits=4, stored_bits=8, group_size=32, a_bits=8),
}


def layer(spec: QuantSpec, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=g) * 0.1)
    kw = {}
    if spec.smooth:
        kw["smooth"] = torch.rand(IN, generator=g) + 0.5
    if spec.rank:
        kw["lowrank_down"] = torch.randn(IN, spec.rank, generator=g) * 0.1
        kw["lowrank_up"] = torch.randn(spec.rank, OUT, generator=g) * 0.1
    if spec.a_bits is not None and not spec.a_dynamic:
        kw["act_scale"] = torch.tensor([0.05])
    return QuantLinear.from_linear(linear, spec, **kw)


def inputs(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape, IN, generator=torch.Generator().manual_seed(1))
    x[..., 3] *= 10  # an outlier channel
    return x


@pytest.mark.parametrize("name", list(SPECS))
def test_custom_op_passes_opcheck(name):
    m = layer(SPECS[name])
    x = inputs(2, 5).requires_grad_(True)
    args = (
        x,
        m.qweight,
        m.scales,
        m.zeros,
        m.bias,
        m.smooth,
        m.lowrank_down,
        m.lowrank_up,
        m.act_scale,
        m.act_zero,
        m.spec_json,
    )
    torch.library.opcheck(torch.ops.ditq.quant_linear.default, args)


@pytest.mark.parametrize("backend", ["reference", "dequantized", "lowbit"])
@pytest.mark.parametrize("name", list(SPECS))
def test_fullgraph_compile_equals_eager(name, backend):
    torch._dynamo.reset()
    m = prepare_for_inference(layer(SPECS[name]), backend)
    x = inputs(3, 7)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_dequantized_backend_matches_reference(name):
    m = layer(SPECS[name])
    x = inputs(4, 3)
    ref = m(x)
    prepare_for_inference(m, "dequantized")
    assert m.backend == "dequantized" and m.weight_dq.dtype == torch.float32
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert "weight_dq" not in m.state_dict()  # kernel buffers never reach a checkpoint
    prepare_for_inference(m, "emulated")  # switching back drops the precomputed weight
    assert m.backend == "reference" and not hasattr(m, "weight_dq")
    assert torch.equal(m(x), ref)


def test_reference_is_differentiable_in_x_through_the_op():
    m = layer(SPECS["w4a4_smooth_rank8"])
    x = inputs(5).requires_grad_(True)
    m(x).sum().backward()
    w_eff = (m.dequantized_weight() + (m.lowrank_down @ m.lowrank_up).T) / m.smooth
    torch.testing.assert_close(x.grad, w_eff.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_a_tiny_quantized_dit_compiles_fullgraph_with_every_backend(tiny_dit):
    import ditq

    ditq.quantize(tiny_dit, ditq.RTN(w_bits=4, group_size=64, a_bits=8))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    for backend in ("reference", "dequantized", "lowbit"):
        assert_compiled_matches_eager(prepare_for_inference(tiny_dit, backend), x, t, y)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'triton' is not one of .*dequantized.*emulated.*reference"):
        prepare_for_inference(torch.nn.Sequential(layer(SPECS["w2"])), "triton")


@pytest.mark.parametrize("backend", ["reference", "lowbit"])
def test_fast_accumulation_is_refused_for_backends_without_fp8_gemms(backend):
    with pytest.raises(ValueError, match=f"fast_accumulation is an option of the FP8 backends .* not of '{backend}'"):
        prepare_for_inference(torch.nn.Sequential(layer(SPECS["w4_fp8"])), backend, fast_accumulation=True)


def test_fast_accumulation_must_be_a_bool():
    with pytest.raises(TypeError, match="fast_accumulation must be True, False or None, got 1"):
        prepare_for_inference(torch.nn.Sequential(layer(SPECS["w4_fp8"])), "fp8", fast_accumulation=1)


def test_a_backend_that_declines_a_layer_leaves_it_on_the_reference_and_says_why(caplog):
    picky = Backend(
        "picky",
        forward=BACKENDS["reference"].forward,
        supports=lambda m: None if m.spec.w_bits == 4 else "only 4-bit weights",
    )
    register_backend(picky)
    try:
        model = torch.nn.Sequential(layer(SPECS["w4g32_a8"]), torch.nn.Linear(OUT, IN), layer(SPECS["w2"]))
        model[1] = torch.nn.Identity()
        with caplog.at_level(logging.WARNING, logger="ditq.kernels"):
            prepare_for_inference(model, "picky")
        assert [model[0].backend, model[2].backend] == ["picky", "reference"]
        assert "cannot run 1 layer(s) (only 4-bit weights)" in caplog.text
        with pytest.raises(ValueError, match="already registered"):
            register_backend(picky)
    finally:
        del BACKENDS["picky"]


def test_input_group_outputs_come_from_one_quantized_input():
    spec = QuantSpec(
        w_bits=4, group_size=16, a_bits=4, a_group_size=16, smooth=True, rank=4, input_group="qkv"
    )
    g = torch.Generator().manual_seed(3)
    smooth, down = torch.rand(IN, generator=g) + 0.5, torch.randn(IN, 4, generator=g) * 0.1
    members = []
    for _ in range(3):
        linear = torch.nn.Linear(IN, OUT)
        members.append(
            QuantLinear.from_linear(
                linear,
                spec,
                smooth=smooth,
                lowrank_down=down,
                lowrank_up=torch.randn(4, OUT, generator=g) * 0.1,
            )
        )
    x = inputs(2, 6)
    for together, alone in zip(group_linear(x, members), members, strict=True):
        torch.testing.assert_close(together, alone(x), rtol=1e-6, atol=1e-6)
    members[1].smooth.mul_(2)
    with pytest.raises(ValueError, match="input group 'qkv' hold different 'smooth'"):
        group_linear(x, members)


def test_new_codes_drop_what_a_backend_precomputed():
    m = prepare_for_inference(layer(SPECS["w4g32_a8"]), "dequantized")
    m.quantize_weight_(torch.randn(OUT, IN) * 0.3)
    assert m.backend == "reference" and not hasattr(m, "weight_dq")
    x = inputs(2, 3)
    ref = m(x)
    prepare_for_inference(m, "dequantized")
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_loaded_tensors_drop_what_a_backend_precomputed_and_say_so():
    source = layer(SPECS["w4g32_a8"])
    source.quantize_weight_(torch.randn(OUT, IN) * 0.3)
    m = prepare_for_inference(layer(SPECS["w4g32_a8"]), "dequantized")
    with pytest.warns(UserWarning, match="'dequantized' backend's buffers .* prepare_for_inference"):
        m.load_state_dict(source.state_dict())
    assert m.backend == "reference" and not hasattr(m, "weight_dq")
    x = inputs(2, 3)
    assert torch.equal(m(x), source(x))  # the loaded weights, not the stale precomputed ones

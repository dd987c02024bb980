"""QuantLinear: buffers, from_linear (RTN), forward vs the dequantized weight, state_dict, dtype moves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.quant.primitives import compute_qparams, ternary_absmean
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

WEIGHT_ONLY = {
    "w8_per_ch": QuantSpec(w_bits=8),
    "w4_g32": QuantSpec(w_bits=4, group_size=32),
    "w3_g64_asym": QuantSpec(w_bits=3, group_size=64, symmetric=False),
    "w6_asym": QuantSpec(w_bits=6, symmetric=False),
    "w2_g32": QuantSpec(w_bits=2, group_size=32),
    "ternary": QuantSpec(w_bits=2, w_format="ternary"),
}
WITH_ACTS = {
    "w4a8_g32_dyn": QuantSpec(w_bits=4, group_size=32, a_bits=8),
    "w4a4_tokgroup_asym": QuantSpec(w_bits=4, group_size=32, a_bits=4, a_group_size=32, a_symmetric=False),
    "w4a8_fp8": QuantSpec(w_bits=4, group_size=64, a_bits=8, a_format="fp8"),
    "w8a8_static_asym": QuantSpec(w_bits=8, a_bits=8, a_dynamic=False, a_symmetric=False),
    "w4a4_svdquant": QuantSpec(w_bits=4, group_size=32, a_bits=4, a_group_size=32, rank=8, smooth=True),
}
ALL = {**WEIGHT_ONLY, **WITH_ACTS}


def _linear(in_f=128, out_f=48, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _extras(spec: QuantSpec, lin: nn.Linear) -> dict:
    """The tensors a method would pass for the optional parts of `spec`."""
    g = torch.Generator().manual_seed(1)
    kw = {}
    if spec.smooth:
        kw["smooth"] = torch.rand(lin.in_features, generator=g) + 0.5
    if spec.rank:
        kw["lowrank_down"] = torch.randn(lin.in_features, spec.rank, generator=g) * 0.1
        kw["lowrank_up"] = torch.randn(spec.rank, lin.out_features, generator=g) * 0.1
    if spec.a_bits is not None and not spec.a_dynamic:
        scale, zero = compute_qparams(
            torch.randn(512, lin.in_features, generator=g).reshape(1, -1), spec.a_bits, None, spec.a_symmetric
        )
        kw["act_scale"] = scale.reshape(1)
        if zero is not None:
            kw["act_zero"] = zero.reshape(1)
    return kw


def _make(spec: QuantSpec, **lin_kw) -> tuple[QuantLinear, nn.Linear]:
    lin = _linear(**lin_kw)
    return QuantLinear.from_linear(lin, spec, **_extras(spec, lin)), lin


@pytest.mark.parametrize("name", list(WEIGHT_ONLY))
def test_weight_only_forward_equals_dequantized_linear(name):
    q, _ = _make(WEIGHT_ONLY[name])
    x = torch.randn(3, 5, 128)
    assert torch.equal(q(x), F.linear(x, q.dequantized_weight(), q.bias))


@pytest.mark.parametrize("name", list(ALL))
def test_output_close_to_float_layer(name):
    q, lin = _make(ALL[name])
    x = torch.randn(16, 128)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    bound = 0.6 if ALL[name].w_bits <= 2 else 0.25
    assert rel < bound


@pytest.mark.parametrize("name", [n for n, s in WEIGHT_ONLY.items() if s.w_format == "int"])
def test_dequantized_weight_within_half_step(name):
    q, lin = _make(WEIGHT_ONLY[name])
    step = q.scales.repeat_interleave(128 // q.scales.shape[1], dim=1)
    assert ((lin.weight - q.dequantized_weight()).abs() <= step / 2 * (1 + 1e-6)).all()


def test_ternary_stores_absmean_codes_and_gamma():
    q, lin = _make(WEIGHT_ONLY["ternary"])
    codes, gamma = ternary_absmean(lin.weight)
    assert torch.equal(q.weight_codes(), codes)
    assert q.scales.shape == (48, 1) and (q.scales == gamma).all()
    assert torch.equal(q.dequantized_weight(), codes.float() * gamma)


def test_rtn_error_decreases_with_bits():
    lin = _linear(256, 64)
    x = torch.randn(64, 256)
    ref = lin(x)
    errors = []
    for bits in range(2, 9):
        q = QuantLinear.from_linear(lin, QuantSpec(w_bits=bits, group_size=64))
        errors.append(((q(x) - ref).norm() / ref.norm()).item())
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.01


def test_smooth_and_low_rank_reconstruct_the_layer():
    spec = QuantSpec(w_bits=8, rank=4, smooth=True)
    lin = _linear()
    kw = _extras(spec, lin)
    q = QuantLinear.from_linear(lin, spec, **kw)
    effective = (q.dequantized_weight() + (q.lowrank_down @ q.lowrank_up).T) / q.smooth  # acts on x, not x/s
    assert torch.allclose(effective, lin.weight, atol=2e-3)
    x = torch.randn(4, 128)
    assert torch.allclose(q(x), lin(x), atol=2e-2)


def test_explicit_weight_is_quantized_as_given():
    lin = _linear()
    w = torch.zeros(48, 128)
    q = QuantLinear.from_linear(lin, QuantSpec(w_bits=4), weight=w)
    assert torch.equal(q.dequantized_weight(), w)
    assert torch.equal(q.bias, lin.bias.detach())


def test_clip_ratio_is_used():
    lin = _linear()
    q_full = QuantLinear.from_linear(lin, QuantSpec(w_bits=4))
    q_clip = QuantLinear.from_linear(lin, QuantSpec(w_bits=4), clip_ratio=0.5)
    assert torch.allclose(q_clip.scales, q_full.scales * 0.5)


def test_buffers_names_dtypes_shapes():
    spec = QuantSpec(
        w_bits=4,
        group_size=32,
        symmetric=False,
        a_bits=8,
        a_group_size=64,
        a_dynamic=False,
        a_symmetric=False,
        rank=8,
        smooth=True,
    )
    m = QuantLinear(128, 48, spec, dtype=torch.bfloat16)
    expected = {
        "qweight": (torch.uint8, (48, 64)),
        "scales": (torch.float32, (48, 4)),
        "zeros": (torch.uint8, (48, 4)),
        "bias": (torch.bfloat16, (48,)),
        "smooth": (torch.float32, (128,)),
        "lowrank_down": (torch.bfloat16, (128, 8)),
        "lowrank_up": (torch.bfloat16, (8, 48)),
        "act_scale": (torch.float32, (2,)),
        "act_zero": (torch.uint8, (2,)),
    }
    sd = m.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == expected
    assert list(m.parameters()) == []


def test_minimal_buffers():
    m = QuantLinear(64, 8, QuantSpec(w_bits=2, w_format="ternary"), bias=False)
    assert set(m.state_dict()) == {"qweight", "scales"}
    assert m.qweight.shape == (8, 16) and m.bias is None and m.zeros is None


@pytest.mark.parametrize("name", list(ALL))
def test_state_dict_roundtrip(name):
    q, _ = _make(ALL[name])
    fresh = QuantLinear(128, 48, ALL[name])
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(6, 128)
    assert torch.equal(fresh(x), q(x))


def test_state_dict_roundtrip_assign_on_meta():
    q, _ = _make(WITH_ACTS["w4a4_svdquant"])
    with torch.device("meta"):
        skeleton = QuantLinear(128, 48, q.spec)
    skeleton.load_state_dict(q.state_dict(), assign=True)
    x = torch.randn(2, 128)
    assert torch.equal(skeleton(x), q(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtype_cast_keeps_format_buffers(dtype):
    q, _ = _make(WITH_ACTS["w4a4_svdquant"])
    x = torch.randn(4, 128)
    ref = q(x)
    q = q.to(dtype)
    assert q.qweight.dtype == torch.uint8
    assert q.scales.dtype == q.smooth.dtype == torch.float32
    assert q.bias.dtype == q.lowrank_down.dtype == q.lowrank_up.dtype == dtype
    y = q(x.to(dtype))
    assert y.dtype == dtype
    assert (y.float() - ref).norm() / ref.norm() < 0.05
    assert q(x).dtype == torch.float32  # output dtype follows x, not the module


def test_half_keeps_qweight_uint8():
    q, _ = _make(WEIGHT_ONLY["w3_g64_asym"])
    h = q.half()
    assert h.qweight.dtype == torch.uint8 and h.zeros.dtype == torch.uint8
    assert h.scales.dtype == torch.float32
    assert h(torch.randn(2, 128, dtype=torch.float16)).dtype == torch.float16


def test_meta_then_to_empty():
    with torch.device("meta"):
        m = QuantLinear(64, 16, QuantSpec(w_bits=4, rank=2, smooth=True))
    m = m.to_empty(device="cpu")
    assert m.qweight.device.type == "cpu" and m.scales.dtype == torch.float32


def test_extra_repr_shows_spec():
    q, _ = _make(WITH_ACTS["w4a4_svdquant"])
    text = repr(q)
    assert "W4 g32 sym" in text and "A4 int g32" in text and "rank=8" in text and "smooth" in text


# ---- errors ----------------------------------------------------------------------------------------


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide in_features=100"):
        QuantLinear(100, 8, QuantSpec(w_bits=4, group_size=64))


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="w_bits=9"):
        QuantSpec(w_bits=9)


def test_input_size_mismatch_names_both_sizes():
    q, _ = _make(WEIGHT_ONLY["w8_per_ch"])
    with pytest.raises(ValueError, match=r"shape \(2, 64\) does not end in in_features=128"):
        q(torch.randn(2, 64))


def test_wrong_dtype_of_packed_buffer_in_state_dict():
    q, _ = _make(WEIGHT_ONLY["w3_g64_asym"])
    sd = q.state_dict()
    sd["qweight"] = sd["qweight"].to(torch.int32)
    with pytest.raises(RuntimeError, match="qweight: packed/integer buffer must be uint8, got torch.int32"):
        QuantLinear(128, 48, q.spec).load_state_dict(sd)
    sd = q.state_dict()
    sd["zeros"] = sd["zeros"].float()
    with pytest.raises(RuntimeError, match="zeros"):
        QuantLinear(128, 48, q.spec).load_state_dict(sd)


def test_dequantize_rejects_corrupted_buffer_dtype():
    q, _ = _make(WEIGHT_ONLY["w8_per_ch"])
    q.qweight = q.qweight.to(torch.int16)
    with pytest.raises(TypeError, match="uint8"):
        q.dequantized_weight()


def test_from_linear_requires_what_the_spec_uses():
    lin = _linear()
    with pytest.raises(ValueError, match="lowrank_down"):
        QuantLinear.from_linear(lin, QuantSpec(rank=4))
    with pytest.raises(ValueError, match="smooth"):
        QuantLinear.from_linear(lin, QuantSpec(smooth=True))
    with pytest.raises(ValueError, match="act_scale"):
        QuantLinear.from_linear(lin, QuantSpec(a_bits=8, a_dynamic=False))
    with pytest.raises(ValueError, match="does not use it"):
        QuantLinear.from_linear(lin, QuantSpec(), smooth=torch.ones(128))
    with pytest.raises(ValueError, match="shape"):
        QuantLinear.from_linear(lin, QuantSpec(), weight=torch.zeros(128, 48))
    with pytest.raises(ValueError, match="smooth has shape"):
        QuantLinear.from_linear(lin, QuantSpec(smooth=True), smooth=torch.ones(64))
    with pytest.raises(ValueError, match="ternary"):
        QuantLinear.from_linear(lin, QuantSpec(w_bits=2, w_format="ternary"), clip_ratio=0.9)


def test_set_codes_validation():
    m = QuantLinear(64, 8, QuantSpec(w_bits=4))
    with pytest.raises(TypeError, match="int8"):
        m.set_codes(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        m.set_codes(torch.full((8, 64), 9, dtype=torch.int8), torch.ones(8, 1))
    with pytest.raises(ValueError, match="zeros"):
        QuantLinear(64, 8, QuantSpec(w_bits=4, symmetric=False)).set_codes(
            torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1)
        )


def test_spec_type_is_checked():
    with pytest.raises(TypeError, match="QuantSpec"):
        QuantLinear(64, 8, {"w_bits": 4})


def test_float16_scales_halve_their_cost_and_codes_use_the_stored_scale(tmp_path):
    import ditq

    spec = QuantSpec(w_bits=4, group_size=64, scale_dtype="float16")
    assert spec.bits_per_weight(128, 256) == 4.25 and QuantSpec(w_bits=4, group_size=64).bits_per_weight(128, 256) == 4.5
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 128, generator=g) * 0.05)
    q = QuantLinear.from_linear(lin, spec)
    assert q.scales.dtype == torch.float16
    codes = q.weight_codes().float().reshape(32, 2, 64)
    assert torch.equal(q.dequantized_weight(), (codes * q.scales.float().unsqueeze(-1)).reshape(32, 128))
    # rounding the scale before rounding the weights keeps every code the nearest one for the stored scale
    nearest = torch.round(lin.weight.detach().reshape(32, 2, 64) / q.scales.float().unsqueeze(-1)).clamp(-8, 7)
    assert torch.equal(codes, nearest)
    model = torch.nn.Sequential(q)
    path = ditq.save(model, tmp_path / "f16.safetensors")
    loaded = ditq.load(path, model=torch.nn.Sequential(torch.nn.Linear(128, 32)))
    assert loaded[0].scales.dtype == torch.float16 and torch.equal(loaded[0].scales, q.scales)
    with pytest.raises(ValueError, match="scale_dtype='bfloat16' is not one of"):
        QuantSpec(w_bits=4, scale_dtype="bfloat16")

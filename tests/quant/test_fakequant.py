"""FakeQuantLinear: the served weight, its straight-through gradients, ternary and nested slices, entries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.quant.fakequant import FakeQuantLinear, set_served_bits
from ditq.quant.primitives import fake_quantize
from ditq.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


INT4_G32 = QuantSpec(w_bits=4, group_size=32)
TERNARY = QuantSpec(w_bits=2, w_format="ternary")
NESTED_8_4 = QuantSpec(w_bits=4, stored_bits=8, group_size=32)


def linear(in_features: int = 64, out_features: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def int_weight(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The textbook symmetric group quantizer, written out: s = absmax / qmax, Ŵ = s·clamp(round(W/s))."""
    qmax = 2 ** (bits - 1) - 1
    wg = w.detach().reshape(w.shape[0], -1, group)
    s = wg.abs().amax(-1, keepdim=True) / qmax
    return (torch.round(wg / s).clamp(-qmax - 1, qmax) * s).reshape(w.shape)


def test_int_forward_is_the_dequantized_weight_matmul() -> None:
    lin = linear()
    fq = FakeQuantLinear.from_linear(lin, INT4_G32)
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, int_weight(lin.weight, 4, 32), lin.bias)
    torch.testing.assert_close(fq(x), expected, rtol=0, atol=1e-6)
    assert len(torch.unique(fq.quantized_weight().detach()[0, :32])) <= 16  # a 4-bit grid per group


def test_asymmetric_forward_and_activation_fake_quant() -> None:
    lin = linear()
    spec = QuantSpec(w_bits=3, group_size=16, symmetric=False, a_bits=6)
    fq = FakeQuantLinear.from_linear(lin, spec)
    x = torch.randn(4, 64)
    w_hat = fake_quantize(lin.weight.detach(), 3, 16, False)
    expected = F.linear(fake_quantize(x, 6, None, True), w_hat, lin.bias)
    assert torch.equal(fq(x), expected)
    assert not torch.equal(fq(x), F.linear(x, w_hat, lin.bias))  # the input really is quantized


def test_ste_gradient_reaches_the_latent_weight_unchanged() -> None:
    fq = FakeQuantLinear.from_linear(linear(), INT4_G32)
    x, g = torch.randn(7, 64), torch.randn(7, 48)
    (fq(x) * g).sum().backward()
    torch.testing.assert_close(fq.weight.grad, g.T @ x)  # dL/dW = dL/dŴ
    torch.testing.assert_close(fq.bias.grad, g.sum(0))


def test_learnable_int_scale_gets_the_lsq_gradient() -> None:
    fq = FakeQuantLinear.from_linear(linear(), INT4_G32, learnable_scale=True)
    s0 = fq.scale.detach().clone()
    torch.testing.assert_close(s0, fq.weight.detach().reshape(48, 2, 32).abs().amax(-1) / 7)
    with torch.no_grad():
        fq.scale.mul_(0.8)  # some weights now clip at the ends of the grid
    x, g = torch.randn(7, 64), torch.randn(7, 48)
    (fq(x) * g).sum().backward()
    dw_hat = (g.T @ x).reshape(48, 2, 32)
    s = fq.scale.detach()
    v = fq.weight.detach().reshape(48, 2, 32) / s.unsqueeze(-1)
    q = torch.round(v).clamp(-8, 7)
    inside = (torch.round(v) >= -8) & (torch.round(v) <= 7)
    d_hat_d_s = torch.where(inside, q - v, q)  # LSQ: ∂Ŵ/∂s
    expected = (dw_hat * d_hat_d_s).sum(-1) / math.sqrt(32 * 7)
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-4, atol=1e-6)
    assert fq.weight.grad.reshape(48, 2, 32)[~inside].abs().max() == 0  # clipped weights get no gradient
    assert fq.weight.grad.abs().sum() > 0


def test_ternary_codes_alpha_init_and_gradients() -> None:
    lin = linear()
    fq = FakeQuantLinear.from_linear(lin, TERNARY, learnable_scale=True)
    gamma = lin.weight.detach().abs().mean()
    assert fq.scale.shape == (1,) and float(fq.scale.detach()) > 0
    torch.testing.assert_close(fq.scale.detach(), gamma.reshape(1))
    codes, scales, zeros = fq.codes_and_scales()
    assert zeros is None and set(codes.unique().tolist()) == {-1, 0, 1} and codes.dtype == torch.int8
    expected_codes = torch.round(lin.weight.detach() / (gamma + 1e-6)).clamp(-1, 1)
    assert torch.equal(codes.float(), expected_codes)
    assert torch.equal(fq.quantized_weight().detach(), fq.scale.detach() * expected_codes)
    x, g = torch.randn(7, 64), torch.randn(7, 48)
    (fq(x) * g).sum().backward()
    dw_hat = g.T @ x
    torch.testing.assert_close(
        fq.scale.grad, ((dw_hat * expected_codes).sum() / math.sqrt(64 * 48)).reshape(1)
    )
    torch.testing.assert_close(fq.weight.grad, dw_hat * fq.scale.detach())  # identity STE on W̃: α·∂L/∂Ŵ


def test_ternary_without_learnable_scale_serves_gamma() -> None:
    lin = linear()
    fq = FakeQuantLinear.from_linear(lin, TERNARY)
    codes, scales, _ = fq.codes_and_scales()
    gamma = lin.weight.detach().abs().mean()
    assert fq.scale is None and scales.shape == (48, 1) and torch.allclose(scales, gamma)
    assert torch.equal(fq.quantized_weight().detach(), gamma * codes.float())


def test_nested_slice_of_8_bit_codes_follows_the_formula() -> None:
    lin = linear()
    fq = FakeQuantLinear.from_linear(lin, NESTED_8_4)
    codes, scales, _ = fq.codes_and_scales()  # the stored int8 codes and their shared scale
    assert codes.min() >= -128 and codes.max() <= 127 and len(codes.unique()) > 16
    sliced = torch.round(codes.float() / 16).clamp(-8, 7) * 16  # S(q, 4)
    expected = (sliced.reshape(48, 2, 32) * scales.unsqueeze(-1)).reshape(48, 64)
    assert torch.equal(fq.quantized_weight().detach(), expected)
    assert torch.equal(
        sliced[codes == 127], torch.full_like(sliced[codes == 127], 112.0)
    )  # top bucket clamped
    set_served_bits(fq, 8)
    eight = (codes.float().reshape(48, 2, 32) * scales.unsqueeze(-1)).reshape(48, 64)
    assert torch.equal(fq.quantized_weight().detach(), eight)
    assert torch.equal(fq.codes_and_scales()[0], codes)  # serving another slice keeps the stored codes


def test_nested_learnable_scale_gradients_flow_through_the_slice() -> None:
    fq = FakeQuantLinear.from_linear(linear(), NESTED_8_4, learnable_scale=True)
    codes, scales, _ = fq.codes_and_scales()
    sliced = torch.round(codes.float() / 16).clamp(-8, 7) * 16
    assert torch.equal(
        fq.quantized_weight().detach(), (sliced.reshape(48, 2, 32) * scales.unsqueeze(-1)).reshape(48, 64)
    )
    fq(torch.randn(5, 64)).square().sum().backward()
    assert fq.weight.grad.abs().sum() > 0 and fq.scale.grad.abs().sum() > 0


def test_set_served_bits_changes_nested_layers_only() -> None:
    model = nn.Sequential(
        FakeQuantLinear.from_linear(linear(), NESTED_8_4),
        FakeQuantLinear.from_linear(linear(64, 64), INT4_G32),
        FakeQuantLinear.from_linear(linear(64, 48), TERNARY),
    )
    assert set_served_bits(model, 2) == 1
    assert [m.spec.w_bits for m in model] == [2, 4, 2] and model[0].spec.stored_bits == 8
    with pytest.raises(ValueError, match=r"layer '0': bits=9 must be an int in 2\.\.8"):
        set_served_bits(model, 9)
    with pytest.raises(ValueError, match="matches pattern '1'"):
        set_served_bits(model, 4, pattern="1")


def test_header_entry_rebuilds_the_same_module() -> None:
    fq = FakeQuantLinear.from_linear(linear(), NESTED_8_4, learnable_scale=True)
    entry = fq.header_entry()
    again = FakeQuantLinear.skeleton(nn.Linear(64, 48), entry)
    assert again.spec == fq.spec and again.learnable_scale and again.scale.shape == fq.scale.shape
    again.load_state_dict(fq.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(again(x), fq(x))
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        FakeQuantLinear.skeleton(nn.Linear(64, 48), {**entry, "rank": 2})
    with pytest.raises(ValueError, match=r"missing fields \['learnable_scale'\]"):
        FakeQuantLinear.skeleton(nn.Linear(64, 48), {"spec": entry["spec"], "bias": True})
    with pytest.raises(ValueError, match="bias"):
        FakeQuantLinear.skeleton(nn.Linear(64, 48), {**entry, "bias": "yes"})
    with pytest.raises(ValueError, match="w_bits"):
        FakeQuantLinear.skeleton(nn.Linear(64, 48), {**entry, "spec": {**entry["spec"], "w_bits": 9}})


@pytest.mark.parametrize(
    "spec, learnable, field",
    [
        (QuantSpec(w_bits=4, rank=8), False, "rank"),
        (QuantSpec(w_bits=4, smooth=True), False, "smooth"),
        (QuantSpec(w_bits=4, a_bits=8, a_dynamic=False), False, "a_dynamic"),
        (QuantSpec(w_bits=4, symmetric=False), True, "learnable_scale"),
        (QuantSpec(w_bits=4, group_size=48), False, "group_size"),
    ],
)
def test_unsupported_specs_are_refused_naming_the_field(spec: QuantSpec, learnable: bool, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FakeQuantLinear.from_linear(linear(), spec, learnable_scale=learnable)

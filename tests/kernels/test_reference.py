"""The PyTorch oracle against a composition of the primitives, step by step (atol=0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditq.kernels.reference import quantize_activations
from ditq.quant.primitives import compute_qparams, dequantize, fake_quantize, fp8_dequantize, fp8_quantize
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

IN, OUT = 64, 24


def _layer(spec: QuantSpec, **kw) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(torch.nn.Linear(IN, OUT), spec, **kw)


def _x(*shape) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(*shape, IN)
    x[..., 3] *= 20  # outlier channel
    return x


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("a_group_size", [None, 16], ids=["per_token", "token_group16"])
@pytest.mark.parametrize("a_bits", [4, 8], ids=lambda b: f"a{b}")
def test_dynamic_int_activations(a_bits, a_group_size, symmetric):
    spec = QuantSpec(w_bits=4, group_size=32, a_bits=a_bits, a_group_size=a_group_size, a_symmetric=symmetric)
    m = _layer(spec)
    x = _x(2, 5)
    x_q = fake_quantize(x, a_bits, a_group_size, symmetric)
    assert torch.equal(quantize_activations(x, m.spec), x_q)
    assert torch.equal(m(x), F.linear(x_q, m.dequantized_weight(), m.bias))


@pytest.mark.parametrize("a_group_size", [None, 32], ids=["per_token", "token_group32"])
def test_dynamic_fp8_activations(a_group_size):
    m = _layer(QuantSpec(w_bits=4, a_bits=8, a_format="fp8", a_group_size=a_group_size))
    x = _x(7)
    q, scale = fp8_quantize(x, a_group_size)
    assert torch.equal(m(x), F.linear(fp8_dequantize(q, scale), m.dequantized_weight(), m.bias))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_static_int_activations_per_channel_group(symmetric):
    spec = QuantSpec(w_bits=8, a_bits=8, a_group_size=32, a_dynamic=False, a_symmetric=symmetric)
    calib = _x(64)
    scale, zero = compute_qparams(calib.T.reshape(2, -1), 8, None, symmetric)  # one per channel group
    kw = {"act_scale": scale.reshape(2)} | ({} if symmetric else {"act_zero": zero.reshape(2)})
    m = _layer(spec, **kw)
    x = _x(3)
    qparams = (m.act_scale, m.act_zero)
    x_q = fake_quantize(x, 8, None, symmetric, qparams=qparams)
    assert torch.equal(m(x), F.linear(x_q, m.dequantized_weight(), m.bias))


def test_static_fp8_activations():
    m = _layer(QuantSpec(w_bits=4, a_bits=8, a_format="fp8", a_dynamic=False), act_scale=torch.tensor([0.05]))
    x = _x(4)
    x_q = (x / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.05
    assert torch.equal(m(x), F.linear(x_q, m.dequantized_weight(), m.bias))


def test_smoothing_and_low_rank_branch():
    spec = QuantSpec(w_bits=4, group_size=32, a_bits=4, a_group_size=32, rank=4, smooth=True)
    torch.manual_seed(2)
    smooth = torch.rand(IN) + 0.5
    down, up = torch.randn(IN, 4) * 0.1, torch.randn(4, OUT) * 0.1
    m = _layer(spec, smooth=smooth, lowrank_down=down, lowrank_up=up)
    x = _x(2, 3)
    h = x / smooth
    expected = F.linear(fake_quantize(h, 4, 32, True), m.dequantized_weight(), m.bias) + (h @ down) @ up
    assert torch.equal(m(x), expected)


def test_gradient_flows_to_input_through_activation_quant():
    m = _layer(QuantSpec(w_bits=4, a_bits=8))
    x = _x(3).requires_grad_()
    m(x).sum().backward()
    expected = m.dequantized_weight().sum(0).expand(3, IN)  # STE: d/dx of sum(x W^T)
    assert torch.allclose(x.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_input_gives_same_dtype(dtype):
    m = _layer(
        QuantSpec(w_bits=4, group_size=32, a_bits=8, rank=2, smooth=True),
        smooth=torch.ones(IN),
        lowrank_down=torch.zeros(IN, 2),
        lowrank_up=torch.zeros(2, OUT),
    )
    x = _x(4)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    assert torch.allclose(y.float(), m(x), rtol=0.05, atol=0.05)


def test_nested_codes_serve_their_most_significant_bits():
    """stored_bits=8, w_bits=4: the layer runs on round(q / 16)·16 of its int8 codes, same scale."""
    spec = QuantSpec(w_bits=4, stored_bits=8, group_size=32)
    m = _layer(spec)
    q = m.weight_codes()  # int8 codes on the 8-bit grid
    served = (torch.round(q.float() / 16).clamp(-8, 7) * 16).to(torch.int8)
    expected = dequantize(served, m.scales, None, 32)
    assert torch.equal(m.dequantized_weight(), expected)
    x = _x(3)
    assert torch.equal(m(x), F.linear(x, expected, m.bias))

"""Ternary absmean, FP8 e4m3fn casts and the clipping search."""

from __future__ import annotations

import pytest
import torch

from ditq.quant.clip_search import clip_search
from ditq.quant.primitives import (
    FP8_DTYPE,
    compute_qparams,
    dequantize,
    fp8_cast,
    fp8_dequantize,
    fp8_quantize,
    quantize,
    ternary_absmean,
)

# ---- ternary ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ternary_absmean(dtype):
    w = (torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    codes, gamma = ternary_absmean(w)
    wf = w.float()
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    assert gamma.dtype == torch.float32 and gamma.ndim == 0
    assert gamma.item() == wf.abs().mean().item()
    assert torch.equal(codes, torch.round(wf / (gamma + 1e-6)).clamp(-1, 1).to(torch.int8))
    # the threshold is |w| > γ/2 (up to ties)
    assert ((codes != 0) == (wf.abs() > 0.5 * (gamma + 1e-6))).float().mean() > 0.99


def test_ternary_all_zero_matrix_is_finite():
    codes, gamma = ternary_absmean(torch.zeros(4, 8))
    assert gamma.item() == 0.0 and torch.equal(codes, torch.zeros(4, 8, dtype=torch.int8))


# ---- fp8 -------------------------------------------------------------------------------------------


def test_fp8_exact_for_small_integers_and_ternary():
    ints = torch.arange(-7, 8, dtype=torch.float32)
    assert torch.equal(ints.to(FP8_DTYPE).float(), ints)
    rows = torch.stack([ints, ints.flip(0), torch.tensor([-1.0, 0.0, 1.0] * 5)])  # absmax 7, 7, 1
    q, scale = fp8_quantize(rows)
    assert q.dtype == FP8_DTYPE and scale.shape == (3, 1)
    assert torch.equal(fp8_dequantize(q, scale), rows)


@pytest.mark.parametrize("group_size", [None, 16], ids=["per_row", "g16"])
def test_fp8_scale_is_absmax_over_448(group_size):
    x = torch.randn(4, 64) * 10
    q, scale = fp8_quantize(x, group_size)
    g = 64 if group_size is None else group_size
    amax = x.reshape(4, 64 // g, g).abs().amax(-1)
    assert torch.equal(scale, amax * (1 / 448.0))
    assert q.float().abs().max() == 448.0
    x_hat = fp8_dequantize(q, scale, torch.bfloat16)
    assert x_hat.dtype == torch.bfloat16
    assert torch.allclose(x_hat.float(), x, rtol=0.07, atol=1e-6)


def test_fp8_per_tensor_and_zero_rows():
    x = torch.randn(3, 2, 32)
    x[1] = 0
    q, scale = fp8_quantize(x, per_tensor=True)
    assert scale.shape == (1, 1, 1) and torch.equal(scale.flatten(), (x.abs().max() * (1 / 448.0)).reshape(1))
    q_rows, s_rows = fp8_quantize(x)
    assert torch.isfinite(fp8_dequantize(q_rows, s_rows)).all()
    assert torch.equal(fp8_dequantize(q_rows, s_rows)[1], torch.zeros(2, 32))


def test_fp8_cast_saturates_instead_of_nan():
    q = fp8_cast(torch.tensor([[1e6, -1e6, 1.0]]), torch.ones(1, 1))
    assert q.float().tolist() == [[448.0, -448.0, 1.0]]


def test_fp8_dequantize_rejects_non_fp8():
    with pytest.raises(TypeError, match="float8"):
        fp8_dequantize(torch.zeros(2, 4), torch.ones(2, 1))


# ---- clipping search -------------------------------------------------------------------------------


def _rtn_residual(w, bits, group_size, symmetric, ratio):
    scale, zero = compute_qparams(w, bits, group_size, symmetric, ratio)
    return w - dequantize(quantize(w, scale, zero, bits, symmetric), scale, zero, group_size)


def _heavy_tailed(shape, seed):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(2.0).sample(shape) * 0.02


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 32], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("with_inputs", [True, False], ids=["output_mse", "weight_mse"])
def test_clip_search_never_worse_than_no_clipping(with_inputs, group_size, symmetric):
    w = _heavy_tailed((48, 128), 0)
    x = torch.randn(256, 128) * torch.linspace(0.1, 3, 128) if with_inputs else None
    ratio = clip_search(w, 3, group_size, symmetric, x)
    assert ratio.shape == (48, 1 if group_size is None else 4) and ratio.dtype == torch.float32
    base = _rtn_residual(w, 3, group_size, symmetric, 1.0)
    best = _rtn_residual(w, 3, group_size, symmetric, ratio)
    if with_inputs:
        err_base, err_best = (x @ base.T).square().mean(), (x @ best.T).square().mean()
    else:
        err_base, err_best = base.square().mean(), best.square().mean()
    assert err_best <= err_base * (1 + 1e-5)
    assert err_best < err_base * 0.98  # heavy tails: clipping really helps at 3 bits
    assert (ratio > 0).all() and (ratio <= 1).all()


def test_clip_search_per_layer():
    w = _heavy_tailed((16, 64), 1)
    x = torch.randn(64, 64)
    ratio = clip_search(w, 3, 32, True, x, per_layer=True)
    assert ratio.shape == (1, 1)
    base = (x @ _rtn_residual(w, 3, 32, True, 1.0).T).square().mean()
    best = (x @ _rtn_residual(w, 3, 32, True, ratio).T).square().mean()
    assert best <= base * (1 + 1e-5)


def test_clip_search_input_size_mismatch():
    with pytest.raises(ValueError, match="in_features=64"):
        clip_search(torch.randn(8, 64), 4, None, True, torch.randn(4, 32))

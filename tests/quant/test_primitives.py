"""Integer primitives against a hand-written NumPy reference, exactly (atol=0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.quant.primitives import (
    FP8_MAX,
    SCALE_FLOOR,
    compute_qparams,
    dequantize,
    fake_quantize,
    fp8_scale,
    per_tensor_qparams,
    qrange,
    quantize,
    straight_through,
)

BITS = list(range(2, 9))
GROUPS = [None, 32, 64, 128]
DTYPES = [torch.float32, torch.bfloat16]


def ref_quantize(x: np.ndarray, bits: int, group: int | None, symmetric: bool, clip: float = 1.0):
    """Textbook uniform quantizer in float32 NumPy: (scale, zero | None, codes, x_hat), grouped."""
    k = x.shape[-1]
    g = k if group is None else group
    xg = x.astype(np.float32).reshape(*x.shape[:-1], k // g, g)
    f32 = np.float32
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(xg).max(-1) * f32(clip)
        scale = np.maximum(amax / f32(qmax), f32(SCALE_FLOOR))
        codes = np.clip(np.round(xg / scale[..., None]), -qmax - 1, qmax)
        x_hat = codes * scale[..., None]
        return scale, None, codes.astype(np.int8).reshape(x.shape), x_hat.reshape(x.shape)
    top = 2**bits - 1
    lo = np.minimum(xg.min(-1), f32(0)) * f32(clip)
    hi = np.maximum(xg.max(-1), f32(0)) * f32(clip)
    scale = np.maximum((hi - lo) / f32(top), f32(SCALE_FLOOR))
    zero = np.clip(np.round(-lo / scale), 0, top)
    codes = np.clip(np.round(xg / scale[..., None]) + zero[..., None], 0, top)
    x_hat = (codes - zero[..., None]) * scale[..., None]
    return scale, zero.astype(np.uint8), codes.astype(np.uint8).reshape(x.shape), x_hat.reshape(x.shape)


def _randn(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 3
    x[..., 5] += 4.0  # an outlier channel, as DiT activations have
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_qparams_codes_dequant_match_reference(bits, group_size, symmetric, dtype):
    x = _randn((6, 256), dtype, seed=bits)
    scale, zero = compute_qparams(x, bits, group_size, symmetric)
    codes = quantize(x, scale, zero, bits, symmetric)
    x_hat = dequantize(codes, scale, zero, group_size)
    r_scale, r_zero, r_codes, r_hat = ref_quantize(x.float().numpy(), bits, group_size, symmetric)
    assert scale.dtype == torch.float32
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert torch.equal(scale, torch.from_numpy(r_scale))
    assert torch.equal(codes, torch.from_numpy(r_codes))
    assert torch.equal(x_hat, torch.from_numpy(r_hat))
    if symmetric:
        assert zero is None
    else:
        assert zero.dtype == torch.uint8 and torch.equal(zero, torch.from_numpy(r_zero))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_roundtrip_error_at_most_half_step(bits, group_size, symmetric):
    x = _randn((8, 256), torch.float32, seed=100 + bits)
    scale, zero = compute_qparams(x, bits, group_size, symmetric)
    x_hat = dequantize(quantize(x, scale, zero, bits, symmetric), scale, zero, group_size)
    step = scale.repeat_interleave(256 // scale.shape[-1], dim=-1)
    assert ((x - x_hat).abs() <= step / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_codes_stay_in_range(bits):
    x = _randn((4, 128), torch.float32)
    for symmetric in (True, False):
        qmin, qmax = qrange(bits, symmetric)
        scale, zero = compute_qparams(x, bits, 32, symmetric)
        codes = quantize(x, scale, zero, bits, symmetric).int()
        assert codes.min() >= qmin and codes.max() <= qmax


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["per_token", "token_group32"])
def test_activation_granularity_per_token(group_size, symmetric):
    x = _randn((2, 5, 64), torch.bfloat16)  # (N, T, C)
    scale, zero = compute_qparams(x, 8, group_size, symmetric)
    assert scale.shape == (2, 5, 1 if group_size is None else 2)
    flat_scale, _ = compute_qparams(x.reshape(10, 64), 8, group_size, symmetric)
    assert torch.equal(scale.reshape(10, -1), flat_scale)
    r_scale, _, r_codes, _ = ref_quantize(x.float().numpy(), 8, group_size, symmetric)
    assert torch.equal(scale, torch.from_numpy(r_scale))
    assert torch.equal(quantize(x, scale, zero, 8, symmetric), torch.from_numpy(r_codes))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_per_tensor_qparams(symmetric):
    x = _randn((3, 4, 64), torch.float32)
    scale, zero = per_tensor_qparams(x, 4, symmetric)
    assert scale.shape == (1, 1, 1)
    r_scale, r_zero, r_codes, _ = ref_quantize(x.numpy().reshape(1, -1), 4, None, symmetric)
    assert scale.item() == r_scale.item()
    assert torch.equal(quantize(x, scale, zero, 4, symmetric).reshape(1, -1), torch.from_numpy(r_codes))
    if not symmetric:
        assert zero.item() == r_zero.item()


def test_static_scale_per_channel_group_broadcasts_over_tokens():
    x = _randn((7, 64), torch.float32)
    scale = torch.tensor([0.05, 0.1])  # (n_groups,), shared by all tokens
    codes = quantize(x, scale, None, 8, True)
    expected = torch.cat([torch.round(x[:, :32] / 0.05), torch.round(x[:, 32:] / 0.1)], 1).clamp(-128, 127)
    assert torch.equal(codes, expected.to(torch.int8))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_all_zero_rows_give_finite_zero_output(symmetric):
    x = torch.zeros(3, 64)
    x[1] = torch.linspace(-1, 1, 64)
    scale, zero = compute_qparams(x, 4, 32, symmetric)
    assert torch.isfinite(scale).all() and (scale >= SCALE_FLOOR).all()
    x_hat = dequantize(quantize(x, scale, zero, 4, symmetric), scale, zero, 32)
    assert torch.isfinite(x_hat).all()
    assert torch.equal(x_hat[0], torch.zeros(64)) and torch.equal(x_hat[2], torch.zeros(64))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_clip_ratio_matches_reference_and_saturates(symmetric):
    x = _randn((4, 128), torch.float32)
    scale, zero = compute_qparams(x, 4, 64, symmetric, clip_ratio=0.7)
    r_scale, _, r_codes, _ = ref_quantize(x.numpy(), 4, 64, symmetric, clip=0.7)
    assert torch.equal(scale, torch.from_numpy(r_scale))
    codes = quantize(x, scale, zero, 4, symmetric)
    assert torch.equal(codes, torch.from_numpy(r_codes))
    assert (codes.int() == qrange(4, symmetric)[1]).any()  # clipped values saturate at the top code


def test_clip_ratio_tensor_per_group():
    x = _randn((4, 128), torch.float32)
    ratio = torch.tensor([[1.0, 0.5]]).expand(4, 2)
    scale, _ = compute_qparams(x, 4, 64, True, clip_ratio=ratio)
    full, _ = compute_qparams(x, 4, 64, True)
    assert torch.equal(scale[:, 0], full[:, 0])
    assert torch.allclose(scale[:, 1], full[:, 1] * 0.5)


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        compute_qparams(torch.randn(2, 64), bits, None, True)


def test_group_not_dividing_raises():
    with pytest.raises(ValueError, match="does not divide the last dim 96"):
        compute_qparams(torch.randn(2, 96), 4, 64, True)


def test_bad_clip_ratio_raises():
    with pytest.raises(ValueError, match="clip_ratio"):
        compute_qparams(torch.randn(2, 64), 4, None, True, clip_ratio=1.5)


def test_dequantize_rejects_mismatched_group_size():
    x = torch.randn(2, 128)
    scale, zero = compute_qparams(x, 4, 32, True)
    codes = quantize(x, scale, zero, 4, True)
    with pytest.raises(ValueError, match="groups"):
        dequantize(codes, scale, zero, 64)
    with pytest.raises(ValueError, match="one group per row"):
        dequantize(codes, scale, zero, None)


# ---- fake quantization and the straight-through estimator ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 32], ids=lambda g: f"g{g}")
def test_fake_quantize_equals_quantize_dequantize(group_size, symmetric, dtype):
    x = _randn((4, 64), dtype)
    scale, zero = compute_qparams(x, 4, group_size, symmetric)
    expected = dequantize(quantize(x, scale, zero, 4, symmetric), scale, zero, group_size, dtype=dtype)
    out = fake_quantize(x, 4, group_size, symmetric)
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_fake_quantize_backward_is_identity(symmetric):
    x = _randn((4, 64), torch.float32).requires_grad_()
    y = fake_quantize(x, 3, 32, symmetric)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad)


def test_fake_quantize_mask_zeroes_gradient_outside_clip_range():
    x = torch.tensor([[0.1, -0.2, 0.3, 5.0]], requires_grad=True)
    y = fake_quantize(x, 4, None, True, clip_ratio=0.1, mask_outside_clip=True)
    y.sum().backward()
    # scale = 0.5/7: 0.1, -0.2, 0.3 stay in range, 5.0 saturates
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_fake_quantize_with_static_qparams():
    x = _randn((5, 64), torch.float32)
    scale = torch.full((1,), 0.02)
    out = fake_quantize(x, 8, None, True, qparams=(scale, None))
    assert torch.equal(out, torch.round(x / 0.02).clamp(-128, 127) * scale)


def test_straight_through_value_is_exact():
    x = torch.randn(10, requires_grad=True)
    x_hat = torch.round(x.detach() * 3) / 3
    y = straight_through(x, x_hat)
    assert torch.equal(y, x_hat)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


@pytest.mark.parametrize(("k", "group_size"), [(512, None), (512, 256), (200, None), (128, None), (384, 128)])
def test_fp8_scale_is_the_group_absmax_over_448_whatever_the_chunking(k, group_size):
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(k)) * torch.rand(k) * 4
    x[1, 2] = 0  # an all-zero row takes the floor
    groups = 1 if group_size is None else k // group_size
    amax = x.reshape(3, 5, groups, k // groups).abs().amax(-1)
    assert torch.equal(fp8_scale(x, group_size), (amax * (1.0 / FP8_MAX)).clamp_min(SCALE_FLOOR))

"""The FP8 input pre-pass (`ditq::quantize_rows_fp8`) against its PyTorch reference; `test_fusion.py` tests the
graph pass that folds producers into it. Triton runs under `TRITON_INTERPRET=1` on the CPU: shapes are small and
odd (M not a multiple of anything; widths 48 = 32 + 16, 50 = 32 + 18 and 131 = 128 + 3 columns)."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels.fp8 import quantize_rows
from ditq.kernels.reference import Modulation, Residual, residual_added
from ditq.kernels.triton import rowquant
from ditq.kernels.triton.lowrank import append_lowrank_codes_reference
from ditq.kernels.triton.rowquant import quantize_rows_fp8, quantize_rows_fp8_reference
from tests.kernels.test_lowrank import assert_low_rank_codes_round_the_exact_sums, low_rank_down

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def operands(m: int, k: int, dtype: torch.dtype, smooth: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(DEVICE, dtype)
    s = (torch.rand(k, generator=g) + 0.5).to(DEVICE) if smooth else None
    return x, s


def assert_codes_match(codes, scales, ref_codes, ref_scales, exact: bool, scale_rtol: float = 3e-7):
    """Exact where both sides compute the same float32 values; else (GELU: libm against the kernel's erf/exp,
    up to 7e-5 apart) a rare code one e4m3 step off and scales a float32 ulp or two off (one from the GELU, one
    more from the smoothing's product after it)."""
    if exact:
        assert torch.equal(scales, ref_scales) and torch.equal(codes.float(), ref_codes.float())
        return
    torch.testing.assert_close(scales, ref_scales, rtol=scale_rtol, atol=0)
    a, b = codes.float() * scales, ref_codes.float() * ref_scales
    torch.testing.assert_close(a, b, rtol=2**-3, atol=float(scales.max()) * 2**-9)
    assert (codes.float() != ref_codes.float()).float().mean() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize(("m", "k"), [(7, 48), (7, 50), (7, 131), (70, 96)])
def test_pre_pass_computes_the_reference(m, k, smooth, activation, dtype):
    x, s = operands(m, k, dtype, smooth, seed=k)
    codes, scales = quantize_rows_fp8(x, s, activation)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, activation)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scales.shape == (m, 1)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=activation == "none")


def test_pre_pass_writes_into_the_first_columns_of_out():
    x, s = operands(9, 50, torch.bfloat16, True)
    out = torch.full((9, 66), 3.0, device=DEVICE).to(torch.float8_e4m3fn)
    codes, scales = quantize_rows_fp8(x, s, "gelu_tanh", out=out)
    assert codes.data_ptr() == out.data_ptr()
    ref_codes, ref_scales = quantize_rows_fp8(x, s, "gelu_tanh")
    assert torch.equal(out[:, :50].float(), ref_codes.float()) and torch.equal(scales, ref_scales)
    assert out[:, 50:].float().eq(3.0).all()  # the columns behind are the caller's


def modulation(samples: int, tokens: int, k: int, dtype: torch.dtype, seed: int = 0) -> Modulation:
    g = torch.Generator().manual_seed(seed)
    shift, scale = ((torch.randn(samples, k, generator=g) * 0.5).to(DEVICE, dtype) for _ in "ab")
    return Modulation(shift, scale, tokens, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize(("samples", "tokens", "k"), [(2, 7, 48), (3, 5, 131), (2, 35, 96), (2, 64, 131), (2, 32, 50)])
def test_pre_pass_applies_layer_norm_and_modulate_per_sample(samples, tokens, k, smooth, dtype):
    x, s = operands(samples * tokens, k, dtype, smooth, seed=k)
    x = x + 2.0  # a mean far from zero: the variance must be centred
    mod = modulation(samples, tokens, k, dtype, seed=k)
    codes, scales = quantize_rows_fp8(x, s, "none", mod)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, "none", mod)
    # the kernel's mean and variance are a float32 ulp off PyTorch's at places (another summation order)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=False, scale_rtol=1e-6)
    rows_of_other_samples = quantize_rows_fp8(x, s, "none", mod._replace(shift=mod.shift.flip(0)))[0]
    assert not torch.equal(rows_of_other_samples.float(), codes.float())  # each row reads its own sample


def test_rows_too_wide_to_hold_take_the_multi_pass_kernel(monkeypatch):
    monkeypatch.setattr(rowquant, "MAX_RESIDENT", 32)
    x, s = operands(5, 131, torch.bfloat16, smooth=True)
    codes, scales = quantize_rows_fp8(x, s, "none")
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, "none")
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=True)
    mod = modulation(1, 5, 131, torch.bfloat16)
    codes, scales = quantize_rows_fp8(x + 2.0, s, "none", mod)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x + 2.0, s, "none", mod)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=False, scale_rtol=1e-6)


def residual(samples: int, tokens: int, k: int, dtype: torch.dtype, seed: int = 0) -> Residual:
    g = torch.Generator().manual_seed(seed)
    update = (torch.randn(samples * tokens, k, generator=g) * 2).to(DEVICE, dtype)
    return Residual(update, (torch.randn(samples, k, generator=g) * 0.7).to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("samples", "tokens", "k", "wide"), [(2, 7, 48, False), (3, 5, 131, False), (2, 32, 50, False),
                                                               (1, 5, 131, True)])  # fmt: skip
def test_pre_pass_adds_the_gated_residual_first_and_writes_the_sum(samples, tokens, k, wide, dtype, monkeypatch):
    if wide:  # rows too wide to hold: the sum is added by PyTorch's ops, then the multi-pass kernel runs
        monkeypatch.setattr(rowquant, "MAX_RESIDENT", 32)
    x, s = operands(samples * tokens, k, dtype, True, seed=k)
    mod, res = modulation(samples, tokens, k, dtype, seed=k), residual(samples, tokens, k, dtype, seed=k)
    total = torch.full_like(x, float("nan"))
    codes, scales = quantize_rows_fp8(x, s, "none", mod, residual=res, residual_out=total)
    expected = residual_added(x, res, tokens)
    assert torch.equal(total, expected)  # each product and sum rounded where PyTorch rounds them
    if dtype == torch.bfloat16:  # one rounding fewer (a fused multiply-add) would show here
        fused = (x.float() + res.gate.float().repeat_interleave(tokens, 0) * res.update.float()).to(dtype)
        assert not torch.equal(fused, expected)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, "none", mod, res)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=False, scale_rtol=1e-6)
    assert torch.equal(codes.float(), quantize_rows_fp8(expected, s, "none", mod)[0].float())


@pytest.mark.parametrize(("samples", "tokens", "k", "wide"), [(5, 4, 48, False), (2, 40, 131, False), (1, 5, 131, True)],
                         ids=["one_pass", "one_pass_odd_k", "multi_pass"])  # fmt: skip
def test_pre_pass_appends_the_low_rank_codes_of_its_own_codes(samples, tokens, k, wide, monkeypatch):
    """With SVDQuant's branch the pre-pass fills the codes' last 2R columns with P of the codes it wrote (the
    low-rank kernel after either pre-pass kernel); the codes, scales and the residual sum are those of the
    pre-pass without a branch."""
    if wide:
        monkeypatch.setattr(rowquant, "MAX_RESIDENT", 32)
    x, s = operands(samples * tokens, k, torch.bfloat16, True, seed=k)
    mod, res = modulation(samples, tokens, k, torch.bfloat16, seed=k), residual(samples, tokens, k, torch.bfloat16)
    down, scale = low_rank_down(k, 16, seed=k)
    total, plain_total = torch.empty_like(x), torch.empty_like(x)
    codes, scales = quantize_rows_fp8(x, s, "none", mod, residual=res, residual_out=total, lowrank=(down, scale))
    plain, plain_scales = quantize_rows_fp8(x, s, "none", mod, residual=res, residual_out=plain_total)
    assert codes.shape == (x.shape[0], k + 32) and torch.equal(total, plain_total)
    assert torch.equal(codes[:, :k].float(), plain.float()) and torch.equal(scales, plain_scales)
    expected = codes.clone()
    append_lowrank_codes_reference(expected, down, scale)
    assert_low_rank_codes_round_the_exact_sums(codes, expected, down, scale)  # float32 sums in other orders
    assert expected[:, k:].float().abs().max() > 8


def test_a_low_rank_branch_needs_its_columns_in_out():
    x, s = operands(3, 48, torch.bfloat16, True)
    with pytest.raises(ValueError, match=r"out must have 48 \+ 2·16 columns"):
        quantize_rows_fp8(x, s, "none", out=torch.empty(3, 48, dtype=torch.float8_e4m3fn, device=DEVICE),
                          lowrank=low_rank_down(48, 16))  # fmt: skip
    with pytest.raises(ValueError, match=r"down must be contiguous e4m3 \(48, R\)"):
        quantize_rows_fp8(x, s, "none", lowrank=low_rank_down(50, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("samples", "tokens", "k", "wide"), [(3, 5, 131, False), (2, 32, 48, False), (1, 5, 131, True)],
                         ids=["mixed", "one_sample", "multi_pass"])  # fmt: skip
def test_pre_pass_quantizes_a_gated_sum_without_a_modulation(samples, tokens, k, wide, dtype, monkeypatch):
    """x + gate·update read as it is (PixArt's cross-attention query): the gate's rows per sample come with the
    residual; the codes are the sum's, exactly."""
    if wide:
        monkeypatch.setattr(rowquant, "MAX_RESIDENT", 32)
    x, s = operands(samples * tokens, k, dtype, True, seed=k)
    res = residual(samples, tokens, k, dtype, seed=k)._replace(tokens=tokens)
    total = torch.full_like(x, float("nan"))
    codes, scales = quantize_rows_fp8(x, s, "none", residual=res, residual_out=total)
    assert torch.equal(total, residual_added(x, res, tokens))
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, "none", residual=res)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=True)
    swapped = torch.empty_like(x)
    quantize_rows_fp8(x, s, "none", residual=res._replace(gate=res.gate.flip(0)), residual_out=swapped)
    assert samples == 1 or not torch.equal(swapped, total)  # each row reads its own sample's gate


def test_the_residual_gate_is_read_per_sample():
    x, _ = operands(2 * 32, 48, torch.bfloat16, False)
    mod, res = modulation(2, 32, 48, torch.bfloat16), residual(2, 32, 48, torch.bfloat16)
    total, swapped = torch.empty_like(x), torch.empty_like(x)
    quantize_rows_fp8(x, None, "none", mod, residual=res, residual_out=total)
    quantize_rows_fp8(x, None, "none", mod, residual=res._replace(gate=res.gate.flip(0)), residual_out=swapped)
    assert torch.equal(total, residual_added(x, res, 32)) and not torch.equal(swapped, total)


def test_an_empty_batch_gives_empty_outputs():
    x, s = operands(0, 48, torch.float32, True)
    codes, scales = quantize_rows_fp8(x, s, "none", modulation(0, 3, 48, torch.float32))
    assert codes.shape == (0, 48) and scales.shape == (0, 1)


def test_a_zero_row_gets_the_scale_floor_and_zero_codes():
    x = torch.zeros(3, 50, device=DEVICE)
    x[1] = 1.0
    codes, scales = quantize_rows_fp8(x, None, "gelu")
    assert scales[0].item() == torch.tensor(1e-8).item() and not codes[0].float().any() and codes[1].float().eq(448).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(x=torch.zeros(2, 3, 4)), "2-D float x"),
        (dict(x=torch.zeros(2, 4, dtype=torch.int32)), "2-D float x"),
        (dict(activation="relu"), "activation 'relu' is not one of"),
        (dict(inv_smooth=torch.ones(5)), r"inv_smooth must be contiguous \(4,\)"),
        (dict(out=torch.zeros(2, 3, dtype=torch.float8_e4m3fn)), r"out must be e4m3 \(2, >= 4\)"),
        (dict(out=torch.zeros(2, 4)), "out must be e4m3"),
        (dict(out=torch.zeros(4, 2, dtype=torch.float8_e4m3fn).t()), "unit column stride"),
        (dict(modulation=Modulation(torch.zeros(1, 4), torch.zeros(1, 4), 3, 1e-6)), "not whole samples"),
        (dict(modulation=Modulation(torch.zeros(2, 4), torch.zeros(2, 5), 1, 1e-6)), r"scale must be \(2, 4\)"),
        (dict(modulation=Modulation(torch.zeros(2, 4), torch.zeros(2, 4), 1, 1e-6), activation="gelu"),
         "takes activation 'none'"),
        (dict(residual=Residual(torch.zeros(2, 4), torch.zeros(2, 4)), residual_out=torch.zeros(2, 4)),
         "without a modulation, its tokens must divide the 2 rows, got tokens=0"),
        (dict(modulation=Modulation(torch.zeros(2, 4), torch.zeros(2, 4), 1, 1e-6),
              residual=Residual(torch.zeros(2, 3), torch.zeros(2, 4)), residual_out=torch.zeros(2, 4)),
         r"residual update must be torch.float32 \(2, 4\)"),
        (dict(modulation=Modulation(torch.zeros(2, 4), torch.zeros(2, 4), 1, 1e-6),
              residual=Residual(torch.zeros(2, 4), torch.zeros(1, 4)), residual_out=torch.zeros(2, 4)),
         r"residual gate must be \(2, 4\)"),
        (dict(modulation=Modulation(torch.zeros(2, 4), torch.zeros(2, 4), 1, 1e-6),
              residual=Residual(torch.zeros(2, 4), torch.zeros(2, 4))), "residual_out must be contiguous"),
    ],
    ids=["3d", "int", "activation", "smooth", "out_shape", "out_dtype", "out_stride", "tokens", "mod_shape", "mod_act",
         "res_no_mod", "res_update", "res_gate", "res_out"],  # fmt: skip
)
def test_bad_operands_are_refused_by_name(kwargs, message):
    args = dict(x=torch.zeros(2, 4), inv_smooth=None, activation="none") | kwargs
    with pytest.raises(ValueError, match=message):
        quantize_rows_fp8(**args)


def test_pre_pass_op_passes_opcheck():
    g = torch.Generator().manual_seed(0)
    down = (torch.randn(48, 16, generator=g) * 50).to(DEVICE).to(torch.float8_e4m3fn)  # (K, rank)
    down_scale = torch.rand(1, 16, generator=g).to(DEVICE) / 448
    x, s = operands(6, 48, torch.float32, True)
    mod = modulation(2, 3, 48, torch.float32)
    for args, utils in (
        ((x, None, "gelu_tanh"), ("test_schema", "test_faketensor")),
        ((x, s, "none", mod.shift, mod.scale, 3, 1e-6), ("test_schema", "test_faketensor")),
        # opcheck's schema test cannot handle float8 inputs ("mul" is not implemented for them)
        ((x, s, "none", mod.shift, mod.scale, 3, 1e-6, down, down_scale), ("test_faketensor",)),
        ((x, s, "none", mod.shift, mod.scale, 3, 1e-6, None, None, x.flip(0), mod.shift.flip(1)),
         ("test_schema", "test_faketensor")),
    ):
        torch.library.opcheck(quantize_rows, args, test_utils=utils)


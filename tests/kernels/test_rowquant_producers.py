"""The FP8 input pre-pass's producers beyond the zoo DiT's (`ditq::quantize_rows_fp8`): SiLU, LayerNorm with an
affine, RMSNorm as torch and as diffusers compute it, each with or without adaLN's modulate, and an ungated
residual add, against the PyTorch reference. Triton runs under `TRITON_INTERPRET=1` on the CPU: small odd shapes
(M not a multiple of the row block; width 131 = 128 + 3 past a tile's or a K block's edge), and the multi-pass
kernel forced; a program's rows of one sample or of several.

RMS norms are compared on small-integer inputs: their sums of squares are then exact in any order, so kernel and
reference compute the same float32 values and must give the same codes bit for bit (which catches a rounding
to x's dtype made at another place). LayerNorm's statistics are a float32 ulp apart at places (another summation
order), and SiLU's exponential is libm's against the kernel's: those allow the rare code one step off."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels.fp8 import quantize_rows
from ditq.kernels.reference import Norm, Residual
from ditq.kernels.triton import rowquant
from ditq.kernels.triton.rowquant import quantize_rows_fp8, quantize_rows_fp8_reference
from tests.kernels.test_rowquant import DEVICE, assert_codes_match, modulation, operands, residual

# PyTorch's CPU rsqrt is correctly rounded as the kernel's is; its CUDA one is a float32 ulp or two apart
EXACT_RMS = DEVICE == "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(params=[False, True], ids=["one_pass", "multi_pass"])
def multi_pass(request, monkeypatch):
    """Both kernels: rows held whole, or (MAX_RESIDENT below every width here) walked once per step."""
    if request.param:
        monkeypatch.setattr(rowquant, "MAX_RESIDENT", 32)
    return request.param


def integers(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """x of small integers: sums of their squares are exact in float32 in any order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (m, k), generator=g).to(DEVICE, dtype)


def norm_of(kind: str, k: int, dtype: torch.dtype, weight: bool, bias: bool, seed: int = 0) -> Norm:
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(k, generator=g) * 1.5 + 0.25).to(DEVICE, dtype) if weight else None
    b = (torch.randn(k, generator=g) * 0.3).to(DEVICE, dtype) if bias else None
    return Norm(kind, 1e-6, w, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's e^100, inf as on a GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("m", "k", "smooth"), [(7, 131, False), (70, 96, True)], ids=["plain", "smooth"])
def test_pre_pass_applies_silu(m, k, smooth, dtype, multi_pass):
    x, s = operands(m, k, dtype, smooth, seed=k)
    x[0, :4] = torch.tensor([-100.0, -87.0, 0.0, 90.0])  # e^-x past float32's range on both sides
    codes, scales = quantize_rows_fp8(x, s, "silu")
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, "silu")
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=False, scale_rtol=1e-6)
    gelu = quantize_rows_fp8_reference(x, s, "gelu")[0]
    assert (gelu.float() != ref_codes.float()).float().mean() > 0.2  # SiLU's codes, not another activation's


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "weight", "bias"), [("rms", False, False), ("rms", True, False),
                         ("rms_cast", False, False), ("rms_cast", True, False), ("rms_cast", True, True)],
                         ids=["rms", "rms_w", "cast", "cast_w", "cast_wb"])  # fmt: skip
def test_pre_pass_applies_rms_norm_exactly(weight, bias, kind, dtype, multi_pass):
    m, k = 7, 131
    x, norm = integers(m, k, dtype, seed=k), norm_of(kind, k, dtype, weight, bias, seed=k)
    s = operands(m, k, dtype, True, seed=k)[1]
    codes, scales = quantize_rows_fp8(x, s, "none", norm=norm)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, "none", norm=norm)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=EXACT_RMS, scale_rtol=1e-6)


def test_torch_and_diffusers_rms_norms_round_at_different_places():
    """F.rms_norm rounds once after its weight, diffusers' RMSNorm before it too: in bf16 they differ, and the
    kernel gives each one's codes."""
    x, norm = integers(9, 131, torch.bfloat16), norm_of("rms", 131, torch.bfloat16, True, False)
    for kind, other in (("rms", "rms_cast"), ("rms_cast", "rms")):
        codes, scales = quantize_rows_fp8(x, None, "none", norm=norm._replace(kind=kind))
        ref_codes, ref_scales = quantize_rows_fp8_reference(x, None, "none", norm=norm._replace(kind=kind))
        assert_codes_match(codes, scales, ref_codes, ref_scales, exact=EXACT_RMS, scale_rtol=1e-6)
        other_codes = quantize_rows_fp8_reference(x, None, "none", norm=norm._replace(kind=other))[0]
        assert (other_codes.float() != codes.float()).sum() > 5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("weight", "bias"), [(True, False), (False, True), (True, True)], ids=["w", "b", "wb"])
def test_pre_pass_applies_affine_layer_norm(weight, bias, dtype, multi_pass):
    m, k = 7, 131
    x, s = operands(m, k, dtype, True, seed=k)
    x = x + 2.0  # a mean far from zero: the variance must be centred
    norm = norm_of("layer", k, dtype, weight, bias, seed=k)
    codes, scales = quantize_rows_fp8(x, s, "none", norm=norm)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, s, "none", norm=norm)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=False, scale_rtol=1e-6)
    plain = quantize_rows_fp8_reference(x, s, "none", norm=Norm("layer", norm.eps))[0]
    assert (plain.float() != ref_codes.float()).float().mean() > 0.2  # the affine is applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["layer", "rms", "rms_cast"])
@pytest.mark.parametrize(("samples", "tokens", "k"), [(3, 5, 131), (2, 32, 131)], ids=["mixed", "one_sample"])
def test_pre_pass_modulates_any_norm_per_sample(samples, tokens, k, kind, dtype, multi_pass):
    x = integers(samples * tokens, k, dtype, seed=k) + (2 if kind == "layer" else 0)
    norm = norm_of(kind, k, dtype, weight=True, bias=kind != "rms", seed=k)
    mod = modulation(samples, tokens, k, dtype, seed=k)
    codes, scales = quantize_rows_fp8(x, None, "none", mod, norm=norm)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, None, "none", mod, norm=norm)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=EXACT_RMS and kind != "layer", scale_rtol=1e-6)
    rows_of_other_samples = quantize_rows_fp8(x, None, "none", mod._replace(shift=mod.shift.flip(0)), norm=norm)[0]
    assert not torch.equal(rows_of_other_samples.float(), codes.float())  # each row reads its own sample


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "modulated"), [(None, False), ("rms_cast", False), ("layer", True)],
                         ids=["no_norm", "rms_cast", "layer_modulated"])  # fmt: skip
def test_pre_pass_adds_an_ungated_residual_first_and_writes_the_sum(kind, modulated, dtype, multi_pass):
    samples, tokens, k = 2, 32, 131  # 16 rows of 131 per program (one-pass and multi-pass): one sample each
    x, update = integers(samples * tokens, k, dtype, seed=1), operands(samples * tokens, k, dtype, False, seed=2)[0]
    norm = None if kind is None else norm_of(kind, k, dtype, weight=True, bias=True)
    mod = modulation(samples, tokens, k, dtype) if modulated else None
    total = torch.full_like(x, float("nan"))
    codes, scales = quantize_rows_fp8(x, None, "none", mod, norm=norm, residual=Residual(update), residual_out=total)
    assert torch.equal(total, x + update)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, None, "none", mod, Residual(update), norm)
    # without a norm the codes are the sum's; with one, its statistics are a float32 ulp apart at places
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=kind is None, scale_rtol=1e-6)


def test_the_op_passes_the_new_producers_to_the_kernel():
    samples, tokens, k = 2, 5, 48
    x = integers(samples * tokens, k, torch.bfloat16)
    mod, res = modulation(samples, tokens, k, torch.bfloat16), residual(samples, tokens, k, torch.bfloat16)
    norm = norm_of("rms_cast", k, torch.bfloat16, weight=True, bias=True)
    codes, scales, total = quantize_rows(x, None, "none", mod.shift, mod.scale, tokens, norm.eps, None, None,
                                         res.update, None, norm="rms_cast", norm_weight=norm.weight,
                                         norm_bias=norm.bias)  # fmt: skip
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, None, "none", mod, Residual(res.update), norm)
    assert torch.equal(total, x + res.update)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=EXACT_RMS)
    # without `norm` the op keeps its first meaning: adaLN's LayerNorm without affine with a shift
    codes = quantize_rows(x, None, "none", mod.shift, mod.scale, tokens, 1e-6)[0]
    assert torch.equal(codes.float(), quantize_rows_fp8(x, None, "none", mod)[0].float())
    silu = quantize_rows(x, None, "silu")[0]
    assert torch.equal(silu.float(), quantize_rows_fp8(x, None, "silu")[0].float())


def test_the_op_with_new_producers_passes_opcheck():
    x, s = operands(6, 48, torch.float32, True)
    mod, res = modulation(2, 3, 48, torch.float32), residual(2, 3, 48, torch.float32)
    norm = norm_of("layer", 48, torch.float32, weight=True, bias=True)
    for args, kwargs in (
        ((x, None, "silu"), {}),
        ((x, s, "none", None, None, 1, 1e-5), dict(norm="layer", norm_weight=norm.weight, norm_bias=norm.bias)),
        ((x, s, "none", mod.shift, mod.scale, 3, 1e-6, None, None, res.update, None), dict(norm="rms")),
        ((x, None, "none", None, None, 1, 0.0, None, None, res.update), {}),
    ):
        torch.library.opcheck(quantize_rows, args, kwargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(norm=Norm("batch", 1e-6)), r"norm 'batch' is not one of \('layer', 'rms', 'rms_cast'\)"),
        (dict(norm=Norm("rms", 1e-6, None, torch.zeros(4))), "norm 'rms' takes no bias"),
        (dict(norm=Norm("layer", 1e-6, torch.zeros(5))), r"norm weight must be contiguous \(4,\) in torch.float32"),
        (dict(norm=Norm("rms_cast", 1e-6, torch.zeros(4, dtype=torch.bfloat16))), "norm weight must be"),
        (dict(norm=Norm("layer", 1e-6, None, torch.zeros(8)[::2])), r"norm bias must be contiguous \(4,\)"),
        (dict(norm=Norm("layer", 1e-6), activation="silu"), "takes activation 'none'"),
        (dict(residual=Residual(torch.zeros(2, 4)), residual_out=torch.zeros(2, 4), activation="gelu"),
         "takes activation 'none'"),
        (dict(residual=Residual(torch.zeros(2, 4), torch.zeros(2, 4)), residual_out=torch.zeros(2, 4),
              norm=Norm("rms", 1e-6)), "gated residual .* its tokens must divide the 2 rows, got tokens=0"),
        (dict(residual=Residual(torch.zeros(2, 4), torch.zeros(3, 4), tokens=2), residual_out=torch.zeros(2, 4)),
         r"residual gate must be \(1, 4\) in torch.float32 for 2 rows of 2 tokens, got torch.float32 \(3, 4\)"),
    ],
    ids=["kind", "rms_bias", "weight_shape", "weight_dtype", "bias_stride", "norm_act", "residual_act", "gate_no_mod",
         "gate_shape"],
)
def test_bad_producers_are_refused_by_name(kwargs, message):
    args = dict(x=torch.zeros(2, 4), inv_smooth=None, activation="none") | kwargs
    with pytest.raises(ValueError, match=message):
        quantize_rows_fp8(**args)


@pytest.mark.parametrize("shift", [False, True], ids=["alone", "with_shift"])
def test_the_op_refuses_a_norm_weight_without_a_norm(shift):
    x = torch.zeros(2, 4)
    modulation_rows = (x, x, 2, 1e-6) if shift else ()
    with pytest.raises(ValueError, match="norm_weight and norm_bias need a norm"):
        quantize_rows(x, None, "none", *modulation_rows, norm_bias=torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize(("m", "k", "k2", "smooth"), [(7, 48, 83, False), (70, 20, 76, True), (5, 128, 3, True)],
                         ids=["plain", "smooth", "short_second"])  # fmt: skip
def test_pre_pass_concatenates_a_second_part_through_its_activation(m, k, k2, smooth, activation, dtype,
                                                                     multi_pass):  # fmt: skip
    """cat([x, act(second)], -1): the second part's columns sit across a tile's edge (48 + 83 = 131 = 128 + 3)."""
    x, s = operands(m, k + k2, dtype, smooth, seed=k2)
    first, second = x[:, :k].contiguous(), x[:, k:].contiguous() * 2
    codes, scales = quantize_rows_fp8(first, s, activation, second=second)
    ref_codes, ref_scales = quantize_rows_fp8_reference(first, s, activation, second=second)
    assert codes.shape == (m, k + k2) and scales.shape == (m, 1)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=activation == "none", scale_rtol=1e-6)
    if activation != "none":  # the activation is the second part's alone
        everywhere = quantize_rows_fp8_reference(torch.cat([first, second], -1), s, activation)[0]
        assert (everywhere[:, :k].float() != ref_codes[:, :k].float()).any()


def test_the_op_concatenates_and_its_fake_has_both_parts_columns():
    x, s = operands(6, 48, torch.bfloat16, True)
    first, second = x[:, :16], x[:, 16:]
    codes, scales, _ = quantize_rows(first.contiguous(), s, "gelu_tanh", second=second.contiguous())
    ref_codes, ref_scales = quantize_rows_fp8_reference(first, s, "gelu_tanh", second=second)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=False, scale_rtol=1e-6)
    torch.library.opcheck(quantize_rows, (first.contiguous(), s, "gelu"), dict(second=second.contiguous()),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(second=torch.zeros(3, 4)), r"second must be torch.float32 \(2, K₂ ≥ 1\)"),
        (dict(second=torch.zeros(2, 0)), "second must be"),
        (dict(second=torch.zeros(2, 4, dtype=torch.bfloat16)), "second must be"),
        (dict(second=torch.zeros(2, 4), norm=Norm("rms", 1e-6)), "takes no norm, modulation or residual"),
        (dict(second=torch.zeros(2, 4), inv_smooth=torch.ones(4)), r"inv_smooth must be contiguous \(8,\)"),
    ],
    ids=["rows", "empty", "dtype", "norm", "smooth_width"],
)
def test_a_bad_second_part_is_refused_by_name(kwargs, message):
    args = dict(x=torch.zeros(2, 4), inv_smooth=None, activation="none") | kwargs
    with pytest.raises(ValueError, match=message):
        quantize_rows_fp8(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("producer", ["modulate", "rms_norm", "gelu"])
@pytest.mark.parametrize(("samples", "first", "more", "k"), [(2, 3, 5, 48), (3, 2, 6, 131), (1, 7, 9, 50),
                                                          (2, 16, 48, 131)],
                         ids=["2x3+5", "3x2+6", "1x7+9", "one_sample"])  # fmt: skip
def test_pre_pass_concatenates_tokens_per_sample(samples, first, more, k, producer, dtype, multi_pass):
    """cat([x (N, T₁, K), second (N, T₂, K)], 1) read part by part: each program's rows (16 at these widths) from
    both tensors, the modulation's rows per sample of T₁ + T₂ tokens (one_sample: 64 tokens, a program's rows
    within one sample)."""
    def rows(n: int, seed: int) -> torch.Tensor:  # RMS norms on small integers: their sums are exact (module doc)
        return integers(n, k, dtype, seed) if producer == "rms_norm" else operands(n, k, dtype, False, seed)[0]

    x, second = rows(samples * first, 1), rows(samples * more, 2)
    kwargs = dict(gelu=dict(activation="gelu_tanh"), rms_norm=dict(norm=norm_of("rms", k, dtype, True, False)),
                  modulate=dict(modulation=modulation(samples, first + more, k, dtype)))[producer]  # fmt: skip
    codes, scales = quantize_rows_fp8(x, None, second=second, first_tokens=first, **kwargs)
    joined = torch.cat([x.reshape(samples, first, k), second.reshape(samples, more, k)], 1).reshape(-1, k)
    ref_codes, ref_scales = quantize_rows_fp8_reference(joined, None, **kwargs)
    assert torch.equal(quantize_rows_fp8_reference(x, None, second=second, first_tokens=first, **kwargs)[0].float(),
                       ref_codes.float())  # fmt: skip
    assert codes.shape == (samples * (first + more), k)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=producer == "rms_norm" and EXACT_RMS,
                       scale_rtol=1e-6)  # fmt: skip


def test_the_op_concatenates_tokens_and_its_fake_has_both_parts_rows():
    x, second = operands(6, 48, torch.float32, False)[0], operands(4, 48, torch.float32, False, seed=1)[0]
    mod = modulation(2, 5, 48, torch.float32)
    codes, scales, _ = quantize_rows(x, None, "none", mod.shift, mod.scale, 5, 1e-6, second=second, first_tokens=3)
    ref_codes, ref_scales = quantize_rows_fp8_reference(x, None, "none", mod, second=second, first_tokens=3)
    assert_codes_match(codes, scales, ref_codes, ref_scales, exact=False, scale_rtol=1e-6)
    torch.library.opcheck(quantize_rows, (x, None, "none", mod.shift, mod.scale, 5, 1e-6),
                          dict(second=second, first_tokens=3), test_utils=("test_schema", "test_faketensor"))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(second=torch.zeros(3, 4), first_tokens=4), "whole samples of first_tokens=4"),
        (dict(second=torch.zeros(3, 5), first_tokens=2), r"second torch.float32 \(rows, 4\)"),
        (dict(second=torch.zeros(3, 4), first_tokens=1), "must be whole tokens of x's 2 samples"),
        (dict(first_tokens=1), "needs a second part"),
        (dict(second=torch.zeros(4, 4), first_tokens=1, modulation=modulation(2, 2, 4, torch.float32)),
         "must be the concatenation's 3 tokens"),
    ],
    ids=["samples", "width", "tokens", "no_second", "modulation_tokens"],
)
def test_a_bad_token_concatenation_is_refused_by_name(kwargs, message):
    args = dict(x=torch.zeros(2, 4), inv_smooth=None, activation="none") | kwargs
    with pytest.raises(ValueError, match=message):
        quantize_rows_fp8(**args)

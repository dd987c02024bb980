"""MatQuant deployment: `export_served` turns each served slice into a plain QuantLinear of its width, which
computes what the slice computes, packs small and runs on the kernel backends that read packed codes."""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ditq
from ditq.io import model_size_bytes, stored_tensors
from ditq.kernels import prepare_for_inference
from ditq.kernels.lowbit import LOWBIT_MAX_ROWS
from ditq.qat import QAT, convert, prepare
from ditq.quant.export import served_layer
from ditq.quant.packing import packed_cols
from ditq.quant.qlinear import QuantLinear, quantize_activations
from ditq.quant.spec import QuantSpec
from tests.test_matquant import NESTED, packed_layers, sliced_weight
from tests.test_qat import inputs, qat_steps, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER_BYTES_MAX = 64 * 1024  # a checkpoint's JSON header: what the file holds beyond its tensors
U = 2.0**-24  # unit roundoff of float32


@pytest.fixture(scope="module")
def nested_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: see the one_thread fixture
    try:
        torch.manual_seed(0)
        fake = prepare(tiny(), NESTED)
        qat_steps(fake, 2)
        return ditq.save(convert(fake), tmp_path_factory.mktemp("export") / "nested.safetensors")
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# A whole model: the same outputs, reloaded, smaller
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_exported_model_is_the_sliced_model_bit_for_bit(nested_file: Path, tmp_path: Path, bits: int) -> None:
    """Codes k = S(q, r) / 2^(8−r) and scales s·2^(8−r) give Ŵ = k·s·2^(8−r), the sliced weight exactly (a
    power of two scales without rounding), so the reference op computes the same outputs."""
    sliced = ditq.load(nested_file, bits=bits)
    exported = copy.deepcopy(sliced)
    nested, replaced = packed_layers(sliced), packed_layers(exported)
    assert ditq.export_served(exported) is exported
    for name, layer in packed_layers(exported).items():
        assert layer.spec == QuantSpec(**{**nested[name].spec.to_dict(), "stored_bits": None}), name
        assert layer.layer_name == name and layer.backend == "reference", name
        assert int(layer.weight_codes().abs().max()) <= 2 ** (bits - 1), name
        assert torch.equal(layer.dequantized_weight(), sliced_weight(nested[name], bits)), name
        assert layer.bias is replaced[name].bias, name  # carried, not copied
    with torch.no_grad():
        served = sliced(*inputs())
        assert torch.equal(exported(*inputs()), served)
        path = ditq.save(exported, tmp_path / f"w{bits}.safetensors")
        reloaded = ditq.load(path)
        assert torch.equal(reloaded(*inputs()), served)
    assert all(m.spec.stored_bits is None for m in packed_layers(reloaded).values())
    saved = sum(m.out_features * (packed_cols(m.in_features, 8) - packed_cols(m.in_features, bits))
                for m in nested.values())  # fmt: skip
    assert model_size_bytes(exported) == model_size_bytes(sliced) - saved
    assert saved > 0 or bits >= 5  # 5–7-bit codes still take a byte each
    for file, model in ((nested_file, sliced), (path, exported)):
        assert 0 < os.path.getsize(file) - model_size_bytes(model) < HEADER_BYTES_MAX


def test_a_per_layer_plan_exports_each_layer_at_its_width(nested_file: Path) -> None:
    plan = {"blocks.0.attn.*": 8, "blocks.0.mlp.fc1": 4, "*": 2}
    sliced = ditq.load(nested_file, bits=plan)
    exported = ditq.export_served(copy.deepcopy(sliced))
    widths = {name: layer.spec.w_bits for name, layer in packed_layers(exported).items()}
    assert widths == {"blocks.0.attn.qkv": 8, "blocks.0.attn.proj": 8, "blocks.0.mlp.fc1": 4, "blocks.0.mlp.fc2": 2}
    with torch.no_grad():
        assert torch.equal(exported(*inputs()), sliced(*inputs()))


def test_an_extra_precision_int2_slice_exports_as_3_bit_codes_bit_for_bit(tmp_path: Path) -> None:
    """The extra level, +2 in the slice's units, needs a third bit: the export is a 3-bit layer holding the
    five levels, and computes what the served slice computes (its top bucket is not clamped)."""
    torch.manual_seed(0)
    fake = prepare(tiny(), replace(NESTED, extra_precision=True))
    qat_steps(fake, 2)
    sliced = convert(fake)
    ditq.set_served_bits(sliced, 2)
    exported = ditq.export_served(copy.deepcopy(sliced))
    top = 0
    for name, layer in packed_layers(exported).items():
        assert layer.spec == replace(packed_layers(sliced)[name].spec, w_bits=3, stored_bits=None,
                                     extra_precision=False), name
        codes = layer.weight_codes()
        assert int(codes.min()) >= -2 and int(codes.max()) <= 2, name
        top += int((codes == 2).sum())
    assert top > 0  # the extra level is exported, not clamped onto +1
    with torch.no_grad():
        served = sliced(*inputs())
        assert torch.equal(exported(*inputs()), served)
        reloaded = ditq.load(ditq.save(exported, tmp_path / "ep2.safetensors"))
        assert torch.equal(reloaded(*inputs()), served)


def test_every_exported_layer_of_at_most_4_bits_takes_the_lowbit_kernel(nested_file: Path) -> None:
    """The sliced layers are declined (tests/test_matquant.py); their exports are not. The layer tests below
    compare the kernels' numbers."""
    exported = ditq.export_served(ditq.load(nested_file, bits=4))
    prepare_for_inference(exported, "lowbit")
    assert {m.backend for m in packed_layers(exported).values()} == {"lowbit"}


def test_layers_of_one_input_group_keep_sharing_their_tensors() -> None:
    """q, k and v of a diffusers attention read one input: their exports keep one smoothing vector, so the
    checkpoint stores it once."""
    spec = QuantSpec(w_bits=8, stored_bits=8, smooth=True, input_group="attn")
    smooth = torch.rand(16, generator=torch.Generator().manual_seed(0)) + 0.5
    model = torch.nn.ModuleDict({n: QuantLinear.from_linear(torch.nn.Linear(16, 8), spec, smooth=smooth)
                                 for n in ("q", "k", "v")})  # fmt: skip
    for layer in model.values():
        layer.smooth = model["q"].smooth
    ditq.set_served_bits(model, 2)
    ditq.export_served(model)
    assert model["k"].smooth is model["q"].smooth and model["v"].smooth is model["q"].smooth
    tensors, groups = stored_tensors(model)
    assert groups == {"attn": ["q", "k", "v"]}
    assert [k for k in tensors if k.endswith("smooth")] == ["input_groups.attn.smooth"]


# --------------------------------------------------------------------------------------------
# One layer on each kernel backend
# --------------------------------------------------------------------------------------------


def nested_layer(group_size: int | None, a_format: str | None, bits: int) -> QuantLinear:
    """A nested 64 → 32 layer served at `bits`, with power-of-two scales: every product and partial sum of a
    GEMM on integer-valued inputs is then exact in float32, whatever the summation order."""
    g = torch.Generator().manual_seed(bits)
    acts = {} if a_format is None else {"a_bits": 8, "a_format": a_format}
    spec = QuantSpec(w_bits=8, stored_bits=8, group_size=group_size, **acts)
    layer = QuantLinear(64, 32, spec, bias=False)
    codes = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8)
    scales = 2.0 ** -torch.randint(2, 7, (32, spec.n_groups(64)), generator=g).float()
    layer.set_codes(codes, scales)
    layer.serve_bits(bits)
    return layer


def integer_inputs(rows: int) -> torch.Tensor:
    return torch.randint(-8, 9, (rows, 64), generator=torch.Generator().manual_seed(rows)).float()


@pytest.mark.parametrize("group_size", [None, 32], ids=["per-channel", "g32"])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_lowbit_kernel_runs_the_exported_slice_exactly(bits: int, group_size: int | None) -> None:
    sliced = nested_layer(group_size, None, bits)
    x = integer_inputs(5)
    plain = prepare_for_inference(served_layer(sliced), "lowbit")
    assert plain.backend == "lowbit"
    assert torch.equal(plain(x), sliced(x))


@pytest.mark.parametrize("backend", ["fp8", "fp8-cached"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["per-channel", "g32"])
@pytest.mark.parametrize("bits", [4, 2])
def test_fp8_backends_run_the_exported_slice(bits: int, group_size: int | None, backend: str) -> None:
    """Inputs in −8..8 become e4m3 codes that are multiples of 4 below 448: their products with the weight codes
    and every partial sum are integers below 2^24, exact in float32, and the kernels round only when they
    scale by the activation and weight scales (≤ 3 roundings per group, 2 groups). The reference rounds each
    h_q = code·scale_x, each h_q·Ŵ term (Ŵ = k·s is exact) and K − 1 partial sums. With M = |h_q| @ |Ŵ|ᵀ, the
    reference is within (K + 1)·u·M of the exact value and the kernels within 6·u·M, to first order: so
    |y − ŷ| ≤ (K + 8)·u·M."""
    sliced = nested_layer(group_size, "fp8", bits)
    x = integer_inputs(LOWBIT_MAX_ROWS + 2)  # past the few-row route of "fp8": its FP8 GEMM
    plain = prepare_for_inference(served_layer(sliced), backend)
    assert plain.backend == backend
    ref = sliced(x)
    magnitude = quantize_activations(x, sliced.spec).abs() @ sliced.dequantized_weight().abs().T
    assert bool(((plain(x) - ref).abs() <= (64 + 8) * U * magnitude).all())


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_a_model_without_nested_layers_is_refused() -> None:
    model = convert(prepare(tiny(), QAT(w_bits=4, group_size=32)))
    with pytest.raises(ValueError, match=r"DiT has no nested layer \(spec\.stored_bits set\) to export"):
        ditq.export_served(model)


def test_a_model_still_in_training_is_refused() -> None:
    model = prepare(tiny(), NESTED)
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.attn\.qkv' is a FakeQuantLinear .* ditq\.convert"):
        ditq.export_served(model)


def test_float16_scales_that_overflow_at_the_served_width_are_refused_before_any_change() -> None:
    """float16 holds scales up to 65504: a scale of 1100 (weights near 1.4e5) times 2^6 does not fit."""
    spec = QuantSpec(w_bits=2, stored_bits=8, scale_dtype="float16")
    linear = torch.nn.Linear(16, 16)
    with torch.no_grad():
        linear.weight.uniform_(-1, 1)
    model = torch.nn.Sequential(QuantLinear.from_linear(linear, spec), QuantLinear.from_linear(linear, spec))
    with torch.no_grad():
        model[1].scales[0, 0] = 1100.0
    with pytest.raises(ValueError, match=r"layer '1': its torch\.float16 scales overflow when multiplied by 64"):
        ditq.export_served(model)
    assert all(m.spec.stored_bits == 8 for m in model)

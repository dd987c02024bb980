"""MatQuant serving: nested slices of one stored int8 checkpoint, on FakeQuantLinear and QuantLinear alike,
in memory (`set_served_bits`) and on loading (`ditq.load(path, bits=...)`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import ditq
from ditq.kernels import fp8, lowbit, prepare_for_inference
from ditq.qat import QAT, convert, prepare
from ditq.quant.fakequant import FakeQuantLinear
from ditq.quant.primitives import dequantize, qrange, slice_codes
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from tests.test_qat import inputs, qat_steps, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

NESTED = QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2), group_size=32)
ATTN = ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
MLP = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def packed_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def sliced_weight(layer: QuantLinear, bits: int) -> torch.Tensor:
    """Ŵ at `bits` computed here from the stored codes, independently of the layer's own spec."""
    codes = slice_codes(layer.weight_codes(), layer.spec.code_bits, bits)
    return dequantize(codes, layer.scales, layer.zeros, layer.spec.group_size)


# --------------------------------------------------------------------------------------------
# The slice formula, on every code of every stored width
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", range(2, 9))
def test_slices_stay_in_range_on_nested_grids(stored: int) -> None:
    lo, hi = qrange(stored, symmetric=True)
    q = torch.arange(lo, hi + 1, dtype=torch.int8)
    assert torch.equal(slice_codes(q, stored, stored), q)
    for r in range(2, stored):
        step = 2 ** (stored - r)
        r_lo, r_hi = qrange(r, symmetric=True)
        s = slice_codes(q, stored, r)
        assert s.dtype == torch.int8 and bool((s % step == 0).all())
        assert int(s.min()) == r_lo * step and int(s.max()) == r_hi * step  # every r-bit code is reached
        assert bool((s[1:] >= s[:-1]).all())  # monotone in the stored code
        # round to nearest, except the top bucket, clamped onto the largest r-bit code
        top = q.int() > r_hi * step + step // 2
        assert bool(((s.int() - q.int()).abs()[~top] <= step // 2).all())
        assert bool((s[top] == r_hi * step).all())
        # nested grids: an r-bit slice is a point of every wider slice, which serves it unchanged
        for wider in range(r + 1, stored + 1):
            assert torch.equal(slice_codes(s, stored, wider), s)
        # and it is the (r+1)-bit slice or one of its two (r+1)-grid neighbours: ≤ step/2 + step/4 apart, on one grid
        assert int((s.int() - slice_codes(q, stored, r + 1).int()).abs().max()) <= step // 2
        # re-slicing the (r+1)-bit slice rounds twice: at most one r-bit step off the r-bit slice
        twice = slice_codes(slice_codes(q, stored, r + 1), stored, r)
        assert int((twice.int() - s.int()).abs().max()) <= step


def test_reslicing_a_slice_is_not_the_slice() -> None:
    """Why every width is sliced from the stored codes: 5 (of 5 bits) is 8 at 2 bits, but its 3-bit slice
    4 sits on a tie at 2 bits and rounds (half to even) to 0."""
    q = torch.tensor([5], dtype=torch.int8)
    assert slice_codes(q, 5, 3).item() == 4 and slice_codes(q, 5, 2).item() == 8
    assert slice_codes(slice_codes(q, 5, 3), 5, 2).item() == 0


# --------------------------------------------------------------------------------------------
# A converted nested QAT model, in memory and reloaded at every width
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nested_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """(the trained FakeQuantLinear model, its converted copy, the converted copy's checkpoint)."""
    torch.manual_seed(0)
    fake = prepare(tiny(), NESTED)
    qat_steps(fake, 2)
    packed = convert(copy.deepcopy(fake))
    path = ditq.save(packed, tmp_path_factory.mktemp("matquant") / "nested.safetensors")
    return fake, packed, path


@pytest.mark.parametrize("bits", range(2, 9))
def test_checkpoint_reloads_at_every_width(nested_models, bits: int) -> None:
    fake, packed, path = nested_models
    fake, packed = copy.deepcopy(fake), copy.deepcopy(packed)
    loaded = ditq.load(path, bits=bits)
    assert ditq.set_served_bits(packed, bits) == 4 and ditq.set_served_bits(fake, bits) == 4
    fake_weights = {n: m.quantized_weight().detach() for n, m in fake.named_modules()
                    if isinstance(m, FakeQuantLinear)}
    in_memory = packed_layers(packed)
    for name, layer in packed_layers(loaded).items():
        assert (layer.spec.w_bits, layer.spec.stored_bits) == (bits, 8), name
        weight = layer.dequantized_weight()
        assert torch.equal(weight, sliced_weight(layer, bits)), name
        assert torch.equal(weight, in_memory[name].dequantized_weight()), name
        assert torch.equal(weight, fake_weights[name]), name
    with torch.no_grad():
        served = loaded(*inputs())  # the reference op: its spec (spec_json) serves the slice
        assert torch.equal(served, packed(*inputs()))
        assert torch.equal(served, prepare_for_inference(loaded, "dequantized")(*inputs()))  # Ŵ checked above


@pytest.mark.parametrize("as_file", [False, True], ids=["mapping", "json-file"])
def test_per_layer_plan_first_match_wins(nested_models, tmp_path: Path, as_file: bool) -> None:
    _, packed, path = nested_models
    plan = {"blocks.0.attn.*": 8, "*": 2, "blocks.0.mlp.fc1": 6}  # fc1 is taken by "*" first
    if as_file:
        (tmp_path / "plan.json").write_text(json.dumps(plan))
    loaded = ditq.load(path, bits=tmp_path / "plan.json" if as_file else plan)
    stored = packed_layers(packed)
    for name, layer in packed_layers(loaded).items():
        bits = 8 if name in ATTN else 2
        assert layer.spec.w_bits == bits, name
        assert torch.equal(layer.dequantized_weight(), sliced_weight(stored[name], bits)), name


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, message",
    [
        (9, r"bits: pattern '\*' → 9: bits must be an int in 2\.\.8"),
        (1, r"pattern '\*' → 1: bits must be an int in 2\.\.8"),
        (True, "bits must be an int, a non-empty mapping"),
        ({}, "bits must be an int, a non-empty mapping"),
        ({"*": 4.0}, r"pattern '\*' → 4\.0: bits must be an int"),
        ({"blocks.9.*": 4, "*": 2}, r"no nested layer .* matches pattern 'blocks\.9\.\*'"),
        ({"blocks.0.attn.q": 4}, r"matches pattern 'blocks\.0\.attn\.q'"),
        ("missing.json", r"bits plan missing\.json: cannot be read as JSON"),
    ],
)
def test_bad_widths_and_plans_are_refused(nested_models, bits, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ditq.load(nested_models[2], bits=bits)


def test_plan_file_must_hold_a_mapping(nested_models, tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text("[4, 2]")
    with pytest.raises(ValueError, match=r"bits plan .*plan\.json must be an int, a non-empty mapping"):
        ditq.load(nested_models[2], bits=tmp_path / "plan.json")


def test_widths_above_the_stored_bits_are_refused_naming_the_layer(tmp_path: Path) -> None:
    model = convert(prepare(tiny(), QAT(w_bits=4, stored_bits=6, nested_bits=(6, 4), group_size=32)))
    path = ditq.save(model, tmp_path / "six.safetensors")
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.mlp\.fc1': bits=7 must be an int in 2\.\.6"):
        ditq.load(path, bits={"blocks.0.attn.*": 4, "blocks.0.mlp.fc1": 7})
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.attn\.qkv': bits=8 must be an int in 2\.\.6"):
        ditq.set_served_bits(model, 8)
    assert {m.spec.w_bits for m in packed_layers(model).values()} == {4}  # nothing changed


def test_a_checkpoint_without_nested_layers_refuses_bits(tmp_path: Path) -> None:
    model = convert(prepare(tiny(), QAT(w_bits=4, group_size=32)))
    path = ditq.save(model, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"no nested layer \(spec\.stored_bits set\) .* pattern '\*'"):
        ditq.load(path, bits=4)
    layer = model.get_submodule("blocks.0.mlp.fc1")
    with pytest.raises(ValueError, match=r"stores its codes at its one bit-width \(W4 g32"):
        layer.serve_bits(2)  # its packed 4-bit codes have no 2-bit slice
    assert layer.spec.w_bits == 4


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def test_serving_another_width_drops_a_prepared_backend(nested_models) -> None:
    packed = prepare_for_inference(copy.deepcopy(nested_models[1]), "dequantized")
    layers = packed_layers(packed)
    assert all(m.backend == "dequantized" and hasattr(m, "weight_dq") for m in layers.values())
    with pytest.warns(UserWarning, match=r"^4 layer\(s\) \(first 'blocks\.0\.attn\.qkv'\) served at 2 bits") as seen:
        ditq.set_served_bits(packed, 2)
    assert len(seen) == 1
    for name, layer in layers.items():
        assert layer.backend == "reference" and not hasattr(layer, "weight_dq"), name
        assert json.loads(layer.spec_json)["w_bits"] == 2, name
    prepare_for_inference(packed, "dequantized")
    assert all(torch.equal(m.weight_dq, sliced_weight(m, 2)) for m in layers.values())


@pytest.mark.parametrize("support", [fp8.fp8_support, lowbit.lowbit_support], ids=["fp8", "lowbit"])
def test_packed_code_kernels_refuse_a_sliced_layer(monkeypatch, support) -> None:
    """The kernels read the packed codes at their stored width: a sliced layer is declined, on the CPU (the
    device check is lifted; no kernel runs)."""
    monkeypatch.setattr(fp8, "device_support", lambda *args: None)
    monkeypatch.setattr(lowbit, "device_support", lambda *args: None)
    spec = QuantSpec(w_bits=4, stored_bits=4, group_size=32, a_bits=8, a_format="fp8")
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 64), spec)
    assert support(layer) is None
    layer.serve_bits(2)
    assert "served at their stored bits" in support(layer)

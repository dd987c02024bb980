"""QAT: the recipe, prepare → save/load, and convert to packed QuantLinears after a few trained steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ditq
from ditq.qat import QAT, convert, prepare
from ditq.quant.fakequant import FakeQuantLinear, set_served_bits
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import recipe_from_dict
from tests.tiny import make_tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


TARGETS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def tiny() -> torch.nn.Module:
    return make_tiny_dit(depth=1)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([1, 100, 500, 999]), torch.tensor([0, 3, 7, 10])


def fake_layers(model: torch.nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def qat_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """A few Adam steps towards a random target, so latent weights and scales move off their start."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x, t, y = inputs(2)
    target = torch.randn_like(model(x, t, y))
    for _ in range(steps):
        opt.zero_grad()
        (model(x, t, y) - target).square().mean().backward()
        opt.step()
    model.eval()


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def test_recipe_round_trips_and_builds_the_spec() -> None:
    recipe = QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2), group_size=32, learnable_scale=True)
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe and hash(again) == hash(recipe)
    spec = recipe.spec()
    assert (spec.w_bits, spec.stored_bits, spec.code_bits, spec.group_size) == (4, 8, 8, 32)
    assert recipe.served_bits == (8, 4, 2) and QAT(w_bits=3).served_bits == (3,)
    assert recipe_from_dict({"method": "qat", "nested_bits": [8, 4], "stored_bits": 8}).nested_bits == (8, 4)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"nested_bits": (8, 4)}, "nested_bits"),  # 8 is above the stored bits (w_bits=4)
        ({"w_bits": 4, "stored_bits": 6, "nested_bits": (8, 4)}, "nested_bits"),
        ({"w_bits": 3, "stored_bits": 8, "nested_bits": (8, 4)}, "w_bits"),
        ({"w_format": "ternary", "w_bits": 2, "stored_bits": 8, "nested_bits": (8, 2)}, "stored_bits"),
        ({"w_bits": 4, "stored_bits": 8, "nested_bits": (4, 4)}, "nested_bits"),
        ({"w_format": "ternary"}, "w_bits"),
        ({"w_bits": 9}, "w_bits"),
        ({"symmetric": False, "learnable_scale": True}, "learnable_scale"),
        ({"group_size": 0}, "group_size"),
        ({"w_format": "fp4"}, "w_format"),
        ({"learnable_scale": "yes"}, "learnable_scale"),
    ],
)
def test_bad_recipes_name_the_field(fields: dict, field: str) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        QAT(**fields)


def test_unknown_recipe_key_is_named() -> None:
    with pytest.raises(ValueError, match="nested_bitz"):
        recipe_from_dict({"method": "qat", "nested_bitz": [8, 4]})


# --------------------------------------------------------------------------------------------
# prepare, save, load
# --------------------------------------------------------------------------------------------


def test_prepare_swaps_the_targets_in_place() -> None:
    model = tiny()
    x, t, y = inputs()
    fp = model(x, t, y)
    out = prepare(model, QAT(w_bits=8))
    assert out is model and sorted(fake_layers(model)) == sorted(TARGETS)
    assert isinstance(model.final_layer.linear, torch.nn.Linear)  # the zoo's default skips hold
    q = model(x, t, y)
    assert not torch.equal(q, fp) and torch.allclose(q, fp, atol=0.05)  # 8 bits: close, not equal
    assert model.ditq_recipe["method"] == "qat"
    with pytest.raises(ValueError, match="already holds quantized layers"):
        prepare(model, QAT())
    with pytest.raises(TypeError, match="QAT"):
        prepare(tiny(), ditq.RTN())


def test_prepare_is_transactional() -> None:
    model = tiny()
    recipe = QAT(group_size=32, overrides={"blocks.0.mlp.fc2": {"group_size": 96}})  # 96 does not divide 512
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc2.*group_size=96"):
        prepare(model, recipe)
    assert not fake_layers(model)


@pytest.mark.parametrize(
    "recipe",
    [
        QAT(w_bits=4, group_size=32, learnable_scale=True, a_bits=8),
        QAT(w_format="ternary", w_bits=2, learnable_scale=True),
        QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2), group_size=32),
    ],
    ids=["int4-g32-a8", "ternary", "nested"],
)
def test_prepared_model_saves_and_loads_bit_exactly(tmp_path: Path, recipe: QAT) -> None:
    model = prepare(tiny(), recipe)
    qat_steps(model, 2)
    if recipe.nested_bits:
        set_served_bits(model, 2)  # the served slice is part of what is saved
    path = ditq.save(model, tmp_path / "qat.safetensors")
    loaded = ditq.load(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: m.header_entry() for n, m in fake_layers(loaded).items()} == {
        n: m.header_entry() for n, m in fake_layers(model).items()
    }
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------

# The converted layer multiplies by the same Ŵ (bit for bit, checked below); outputs may differ only by
# float rounding of the matmul path, far below one quantization step.
CONVERT_ATOL = 1e-5


@pytest.mark.parametrize(
    "recipe, served",
    [
        (QAT(w_bits=4, group_size=32), None),
        (QAT(w_bits=4, group_size=32, learnable_scale=True), None),
        (QAT(w_format="ternary", w_bits=2, learnable_scale=True), None),
        (QAT(w_bits=8, stored_bits=8, nested_bits=(8, 4, 2), group_size=32, learnable_scale=True), 4),
    ],
    ids=["int4-g32", "int4-g32-lsq", "ternary", "nested-8-4-2-at-4"],
)
def test_convert_after_training_matches_the_prepared_model(recipe: QAT, served: int | None) -> None:
    model = prepare(tiny(), recipe)
    qat_steps(model)
    if served is not None:
        set_served_bits(model, served)
    weights = {n: m.quantized_weight().detach() for n, m in fake_layers(model).items()}
    x, t, y = inputs()
    with torch.no_grad():
        prepared = model(x, t, y)
        convert(model)
        converted = model(x, t, y)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(packed) == sorted(TARGETS) and not fake_layers(model)
    for name, module in packed.items():
        assert torch.equal(module.dequantized_weight(), weights[name]), name
        if served is not None:
            assert (module.spec.w_bits, module.spec.stored_bits) == (served, 8)
    torch.testing.assert_close(converted, prepared, rtol=0, atol=CONVERT_ATOL)


def test_convert_needs_a_prepared_model() -> None:
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        convert(tiny())

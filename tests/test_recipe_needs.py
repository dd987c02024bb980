"""Every preset says what it needs before quantizing, and `quantize` agrees with what it says."""

import pytest

import ditq
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import PRESETS
from tests.tiny import make_tiny_dit


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_needs_what_it_says(name):
    recipe, model = PRESETS[name], make_tiny_dit()
    needs = recipe.needs()
    if needs == "nothing":
        assert any(isinstance(m, QuantLinear) for m in ditq.quantize(model, recipe).modules())
    elif needs == "calibration":
        with pytest.raises(ValueError, match="calibration data"):
            ditq.quantize(model, recipe)
    else:
        assert needs == "training"
        with pytest.raises(ValueError, match="trained, not applied"):
            ditq.quantize(model, recipe)
        ditq.prepare(model, recipe)  # QAT: prepare → train → convert

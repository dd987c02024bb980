"""`tests.kernels.compiled`: a code that compiled and eager round either way at a tie passes, a compiled model
that quantizes other values fails."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import prepare_for_inference
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from tests.kernels.compiled import assert_compiled_matches_eager

# (spec, backend, row absmax giving a scale of exactly 1): the FP8 pre-pass (absmax · (1/448) rounds to 1)
# and dynamic int8 fake quantization (absmax / 127); both then round x = 8.5, a tie, to 8 (even) and one ulp
# more to 9
QUANTIZERS = {
    "fp8_pre_pass": (QuantSpec(w_bits=4, a_bits=8, a_format="fp8"), "fp8-cached", 448.0),
    "int8": (QuantSpec(w_bits=4, a_bits=8), "reference", 127.0),
}


class NudgedWhenCompiled(torch.nn.Module):
    """`layer` on x + `nudge` when compiled, on x in eager: a compiled producer's other rounding."""

    def __init__(self, layer: torch.nn.Module, nudge: torch.Tensor):
        super().__init__()
        self.layer, self.nudge = layer, nudge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x + self.nudge if torch.compiler.is_compiling() else x)


def layer_and_input(name: str) -> tuple[QuantLinear, torch.Tensor]:
    spec, backend, absmax = QUANTIZERS[name]
    torch.manual_seed(0)
    layer = prepare_for_inference(QuantLinear.from_linear(torch.nn.Linear(48, 16), spec), backend)
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    x[:, 0] = absmax
    x[0, 1] = 8.5
    return layer, x


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_a_code_rounded_the_other_way_at_a_tie_is_one_step_and_the_rest_is_compared_on_shared_codes(name):
    layer, x = layer_and_input(name)
    nudge = torch.zeros_like(x)
    nudge[0, 1] = 2.0**-20  # one ulp of 8.5
    with torch.no_grad():
        eager = layer(x)
        assert not torch.allclose(layer(x + nudge), eager, rtol=1e-3, atol=1e-3)  # a code's whole step apart
    assert assert_compiled_matches_eager(NudgedWhenCompiled(layer, nudge), x) == 1


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_a_compiled_model_that_quantizes_other_values_fails(name):
    layer, x = layer_and_input(name)
    nudge = torch.zeros_like(x)
    nudge[:, 1:] = 2.0  # two steps of int8's grid; more of e4m3's below 16
    with pytest.raises(AssertionError, match="grid steps from the first's"):
        assert_compiled_matches_eager(NudgedWhenCompiled(layer, nudge), x)

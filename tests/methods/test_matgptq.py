"""MatGPTQ (`matquant-ptq`) and the naive slicing baseline: nested codes chosen by GPTQ's sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ditq
from ditq.methods.gptq import gptq
from ditq.methods.matquant import MatGPTQ, NestedRounding
from ditq.quant.primitives import dequantize, slice_codes
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import load_recipe, recipe_from_dict
from tests.test_qat import inputs, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

STORED = QuantSpec(w_bits=8, stored_bits=8)
WIDTHS = (8, 4, 2)


def layer_problem(out_f: int = 48, in_f: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a non-zero mean (a layer whose columns interact)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(1024, in_f, generator=g) @ mix + torch.randn(in_f, generator=g)
    return w, x.T @ x / x.shape[0]


def slice_errors(w, h, codes, scales, widths=WIDTHS) -> dict[int, float]:
    """tr((W − Ŵ_r) H (W − Ŵ_r)ᵀ) per served width r: the layer's output error on the calibration inputs."""
    errors = {}
    for r in widths:
        d = (w - dequantize(slice_codes(codes, 8, r), scales, None, None)).double()
        errors[r] = float(torch.einsum("oi,ij,oj->", d, h.double(), d))
    return errors


# --------------------------------------------------------------------------------------------
# The column quantizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(), (1.0, 4.0, 0.5)], ids=["equal", "weighted"])
@pytest.mark.parametrize("extra_precision", [False, True], ids=["nested", "extra-precision"])
@pytest.mark.parametrize("per_width", [False, True], ids=["mean-feedback", "per-width-feedback"])
def test_each_weight_gets_the_code_of_least_weighted_slice_error(weights, extra_precision: bool,
                                                                 per_width: bool) -> None:
    """Against a float64 brute force over all 256 codes: the chosen code's objective is the minimum up to the
    float32 rounding of the scores (relative 1e-5 of a score, scores being O(128²·scale²)). Per width, each
    width's target is its own column."""
    g = torch.Generator().manual_seed(1)
    rounding = NestedRounding(8, WIDTHS, weights, extra_precision=extra_precision, per_width=per_width)
    assert rounding.targets == (3 if per_width else 1)
    columns = torch.randn(rounding.targets, 4096, generator=g) * 3
    scale = torch.rand(4096, generator=g) * 0.05 + 0.01
    codes, q_hat = rounding(columns, scale)
    lam = torch.tensor(weights or (1.0,) * 3, dtype=torch.float64)
    lam = lam / lam.sum()
    every = torch.arange(-128, 128, dtype=torch.int8)
    served = torch.stack([slice_codes(every, 8, r, extra_precision=extra_precision).double() for r in WIDTHS])
    w, s = columns.double().expand(3, -1)[:, :, None], scale.double()[:, None]  # (3, 4096, 1): w_r
    objective = sum(lam[i] * (w[i] - s * served[i]).square() for i in range(3))  # (4096, 256)
    chosen = objective.gather(1, (codes.long() + 128)[:, None])[:, 0]
    assert codes.dtype == torch.float32 and bool((codes == codes.round()).all())
    assert bool((chosen <= objective.min(dim=1).values + 1e-5 * (128 * s[:, 0]) ** 2).all())
    slices = served[:, codes.long() + 128] * s[:, 0]  # (3, 4096): s·S(q, r)
    expected_q_hat = slices if per_width else (lam[:, None] * slices).sum(0, keepdim=True)
    torch.testing.assert_close(q_hat.double(), expected_q_hat, rtol=1e-6, atol=0)


def test_without_feedback_every_weight_is_at_least_as_good_as_its_nearest_code() -> None:
    """An identity Hessian feeds no error to other columns: then the nested objective is minimised weight by
    weight, so no weight does worse than with the naive (nearest int8) code."""
    w, _ = layer_problem()
    eye = torch.eye(w.shape[1])
    nested, scales, _ = gptq(w, eye, STORED, rounding=NestedRounding(8, WIDTHS))
    naive, naive_scales, _ = gptq(w, eye, STORED)
    assert torch.equal(scales, naive_scales)  # no feedback: both take the scales of the weight itself

    def objective(codes: torch.Tensor) -> torch.Tensor:
        return sum((w - dequantize(slice_codes(codes, 8, r), scales, None, None)).square() for r in WIDTHS)

    nested_error, naive_error = objective(nested), objective(naive)
    assert bool((nested_error <= naive_error * (1 + 1e-5)).all())
    assert int((nested_error < naive_error * (1 - 1e-5)).sum()) > 0  # straddling buckets: another code wins


# --------------------------------------------------------------------------------------------
# The sweep on a layer with a known Hessian
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_width", [False, True], ids=["mean-feedback", "per-width-feedback"])
def test_nested_gptq_beats_slicing_plain_int8_gptq_on_the_weighted_objective(per_width: bool) -> None:
    w, h = layer_problem()
    naive = slice_errors(w, h, *gptq(w, h, STORED)[:2])
    nested = slice_errors(w, h, *gptq(w, h, STORED, rounding=NestedRounding(8, WIDTHS, per_width=per_width))[:2])
    assert all(torch.isfinite(torch.tensor(e)) for e in nested.values())
    assert sum(nested.values()) < sum(naive.values())
    assert nested[2] < naive[2]  # the width the naive codes neglect most


def test_per_width_feedback_compensates_each_width_better_than_the_mean() -> None:
    """The λ-mean error compensates every width for the others' rounding; fed back per width, each slice's own
    output error is lower, at every width of this layer."""
    w, h = layer_problem()
    mean = slice_errors(w, h, *gptq(w, h, STORED, rounding=NestedRounding(8, WIDTHS))[:2])
    per_width = slice_errors(w, h, *gptq(w, h, STORED, rounding=NestedRounding(8, WIDTHS, per_width=True))[:2])
    assert all(per_width[r] < mean[r] for r in WIDTHS)


def test_the_naive_recipe_is_plain_int8_gptq() -> None:
    model = tiny()
    calib = ditq.calibrate(model, n_samples=2, steps=2, seed=0)
    quantized = ditq.quantize(ditq.api.shallow_clone(model), load_recipe("matquant-naive"), calib=calib)
    layer = quantized.get_submodule("blocks.0.mlp.fc1")
    assert (layer.spec.w_bits, layer.spec.stored_bits) == (4, 8)
    weight = model.get_submodule("blocks.0.mlp.fc1").weight
    codes, scales, _ = gptq(weight, ditq.methods.gptq.hessian(calib.inputs["blocks.0.mlp.fc1"]), STORED)
    assert torch.equal(layer.weight_codes(), codes) and torch.equal(layer.scales, scales)


@pytest.mark.parametrize("name", ["matquant-ptq", "matquant-naive", "matquant-naive-rtn"])
def test_presets_quantize_a_model_servable_at_every_width(name: str) -> None:
    model = tiny()
    recipe = load_recipe(name)
    calib = ditq.calibrate(model, n_samples=2, steps=2, seed=0) if recipe.needs() == "calibration" else None
    quantized = ditq.quantize(ditq.api.shallow_clone(model), recipe, calib=calib)
    with torch.no_grad():
        reference = model(*inputs())
        errors = {}
        for bits in (8, 4, 2):
            assert ditq.set_served_bits(quantized, bits) == 4
            errors[bits] = float((quantized(*inputs()) - reference).square().mean())
    assert all(e == e and e < float("inf") for e in errors.values())
    assert errors[8] < errors[2]


def test_a_quantized_model_saves_and_reloads_at_any_width(tmp_path: Path) -> None:
    quantized = ditq.quantize(tiny(), MatGPTQ(gptq=False, extra_precision=True))
    path = ditq.save(quantized, tmp_path / "nested.safetensors")
    loaded = ditq.load(path, bits=2)
    ditq.set_served_bits(quantized, 2)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), quantized(*inputs()))
    assert all(m.spec.extra_precision and m.spec.w_bits == 2
               for m in loaded.modules() if isinstance(m, QuantLinear))  # fmt: skip


def test_rtn_baseline_needs_no_calibration_and_matches_round_to_nearest() -> None:
    model = tiny()
    assert load_recipe("matquant-naive-rtn").needs() == "nothing"
    quantized = ditq.quantize(ditq.api.shallow_clone(model), load_recipe("matquant-naive-rtn"))
    layer = quantized.get_submodule("blocks.0.attn.proj")
    rtn = QuantLinear.from_linear(model.get_submodule("blocks.0.attn.proj"), layer.spec)
    assert torch.equal(layer.weight_codes(), rtn.weight_codes()) and torch.equal(layer.scales, rtn.scales)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def test_recipe_round_trips_and_builds_the_nested_spec() -> None:
    recipe = MatGPTQ(nested_bits=(8, 4, 3), nested_weights=(1, 2, 1), extra_precision=True, group_size=32,
                     per_width_feedback=True)
    assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe_from_dict({"method": "matgptq", "nested_bits": [8, 2]}).nested_bits == (8, 2)
    spec = recipe.spec()
    assert (spec.w_bits, spec.stored_bits, spec.symmetric, spec.extra_precision, spec.group_size) == (4, 8, True,
                                                                                                      True, 32)
    assert recipe.needs() == "calibration" and MatGPTQ(gptq=False).needs() == "nothing"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"nested_bits": (8, 4, 4)}, r"nested_bits=\(8, 4, 4\) must be distinct ints in 2\.\.8"),
        ({"nested_bits": (8, 1)}, r"nested_bits=\(8, 1\) must be distinct ints in 2\.\.8"),
        ({"nested_bits": ()}, r"nested_bits=\(\) must be distinct ints"),
        ({"stored_bits": 6}, r"nested_bits=\(8, 4, 2\) must be distinct ints in 2\.\.6"),
        ({"nested_weights": (1, 1)}, r"nested_weights=\(1, 1\) must give one weight per width"),
        ({"nested_weights": (1, -1, 1)}, r"nested_weights=\(1, -1, 1\) must be finite numbers > 0"),
        ({"w_bits": 9}, r"w_bits=9 must be an int in 2\.\.8"),
        ({"damp": 2.0}, r"damp=2\.0 must lie in \[0, 1\]"),
    ],
)
def test_bad_recipes_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MatGPTQ(**fields)


def test_gptq_needs_calibration_naming_the_layer() -> None:
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: MatGPTQ \(gptq=True\) needs calibration data"):
        ditq.quantize(tiny(), load_recipe("matquant-ptq"))

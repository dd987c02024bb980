import pytest
import torch

import ditq
from ditq.api import plan
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import DEFAULT_SKIP, RTN
from tests.tiny import make_tiny_dit


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


def test_default_recipe_quantizes_block_attention_and_mlp_only(tiny_dit):
    ditq.quantize(tiny_dit, RTN(w_bits=8, a_bits=8))
    expected = sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert quantized_names(tiny_dit) == expected


def test_skip_and_overrides(tiny_dit):
    recipe = RTN(w_bits=4, group_size=64, skip=(*DEFAULT_SKIP, "blocks.1.*"), overrides={"blocks.0.mlp.*": {"w_bits": 8}})
    targets = plan(tiny_dit, recipe)
    assert sorted(targets) == [f"blocks.0.{n}" for n in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")]
    assert targets["blocks.0.mlp.fc1"].w_bits == 8 and targets["blocks.0.attn.qkv"].w_bits == 4
    ditq.quantize(tiny_dit, recipe)
    assert tiny_dit.get_submodule("blocks.0.mlp.fc2").spec.w_bits == 8


@pytest.mark.parametrize(
    "recipe, message",
    [
        (RTN(skip=("blocks.9.*",)), "skip pattern 'blocks.9.\\*' matches no module"),
        (RTN(overrides={"decoder.*": {"w_bits": 4}}), "overrides pattern 'decoder.\\*' matches no Linear"),
        (RTN(skip=("*",)), "leaves no Linear to quantize"),
        (RTN(w_bits=4, group_size=96), "group_size=96 does not divide in_features=128"),
    ],
)
def test_errors_name_the_problem(tiny_dit, recipe, message):
    with pytest.raises(ValueError, match=message):
        ditq.quantize(tiny_dit, recipe)


def test_quantizing_twice_is_refused(tiny_dit):
    ditq.quantize(tiny_dit, RTN())
    with pytest.raises(ValueError, match="already quantized"):
        ditq.quantize(tiny_dit, RTN())


def test_not_a_recipe_is_refused(tiny_dit):
    with pytest.raises(TypeError, match="recipe must be a ditq recipe"):
        ditq.quantize(tiny_dit, {"method": "rtn"})


def test_rtn_error_shrinks_with_bits():
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([10, 200, 500, 900])
    y = torch.tensor([0, 1, 2, 3])
    fp = make_tiny_dit()
    ref = fp(x, t, y)
    errors = []
    for bits in (3, 4, 6, 8):
        out = ditq.quantize(make_tiny_dit(), RTN(w_bits=bits, a_bits=None))(x, t, y)
        errors.append(((out - ref).norm() / ref.norm()).item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.01


def test_static_activations_need_calibration(tiny_dit):
    with pytest.raises(ValueError, match="need calibration data"):
        ditq.quantize(tiny_dit, RTN(a_bits=8, a_dynamic=False))


def test_static_activations_with_calibration(tiny_dit):
    calib = ditq.calibrate(tiny_dit, n_samples=4, steps=3, rows_per_layer=64)
    model = ditq.quantize(make_tiny_dit(), RTN(a_bits=8, a_dynamic=False), calib=calib)
    qkv = model.get_submodule("blocks.0.attn.qkv")
    assert torch.allclose(qkv.act_scale, calib.absmax["blocks.0.attn.qkv"].max() / 127)


def test_clip_search_does_not_hurt(tiny_dit):
    calib = ditq.calibrate(tiny_dit, n_samples=4, steps=3, rows_per_layer=128)
    from ditq.eval.layers import layer_errors

    plain = ditq.quantize(make_tiny_dit(), RTN(w_bits=3, a_bits=None))
    clipped = ditq.quantize(make_tiny_dit(), RTN(w_bits=3, a_bits=None, clip_search=True), calib=calib)
    err_plain = sum(r["output_rel_err"] for r in layer_errors(tiny_dit, plain, calib.inputs))
    err_clip = sum(r["output_rel_err"] for r in layer_errors(tiny_dit, clipped, calib.inputs))
    assert err_clip <= err_plain * 1.001

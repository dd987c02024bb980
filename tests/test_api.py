import pytest
import torch
from torch import nn

import ditq
from ditq.adapters import get_adapter
from ditq.api import plan, requantize
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import RTN
from tests.tiny import make_tiny_dit

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    assert quantized_names(model) == []
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model, "ditq_recipe")


def inputs():
    return torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 3])


def test_default_recipe_quantizes_block_attention_and_mlp_only(tiny_dit):
    ditq.quantize(tiny_dit, RTN(w_bits=8, a_bits=8))
    assert quantized_names(tiny_dit) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS)


def test_skip_and_overrides(tiny_dit):
    skip = (*get_adapter("dit").default_skip, "blocks.1.*")
    recipe = RTN(w_bits=4, group_size=64, skip=skip, overrides={"blocks.0.mlp.*": {"w_bits": 8}})
    targets = plan(tiny_dit, recipe)
    assert sorted(targets) == [f"blocks.0.{n}" for n in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")]
    assert targets["blocks.0.mlp.fc1"].w_bits == 8 and targets["blocks.0.attn.qkv"].w_bits == 4
    ditq.quantize(tiny_dit, recipe)
    assert tiny_dit.get_submodule("blocks.0.mlp.fc2").spec.w_bits == 8


def test_explicit_skip_replaces_the_defaults(tiny_dit):
    assert "final_layer.linear" in plan(tiny_dit, RTN(skip=("blocks.1.*",)))


@pytest.mark.parametrize(
    "recipe, message",
    [
        (RTN(skip=("blocks.9.*",)), "skip pattern 'blocks.9.\\*' matches no module"),
        (RTN(overrides={"decoder.*": {"w_bits": 4}}), "overrides pattern 'decoder.\\*' matches no Linear"),
        (RTN(skip=("*",)), "leaves no Linear to quantize"),
        (RTN(w_bits=4, group_size=96), "blocks.0.attn.qkv: group_size=96 does not divide in_features=128"),
    ],
)
def test_errors_name_the_problem(tiny_dit, recipe, message):
    with pytest.raises(ValueError, match=message):
        ditq.quantize(tiny_dit, recipe)


def test_a_group_size_that_fails_one_layer_leaves_the_model_unchanged(tiny_dit):
    before = snapshot(tiny_dit)
    bad = RTN(w_bits=4, group_size=128, overrides={"blocks.1.mlp.fc2": {"group_size": 384}})
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2: group_size=384 does not divide in_features=512"):
        ditq.quantize(tiny_dit, bad)
    assert_unchanged(tiny_dit, before)
    ditq.quantize(tiny_dit, RTN(w_bits=4, group_size=128))  # the retry works
    assert len(quantized_names(tiny_dit)) == 8


def test_calibration_missing_one_layer_leaves_the_model_unchanged(tiny_dit):
    calib = ditq.calibrate(make_tiny_dit(), n_samples=2, steps=2, rows_per_layer=8)
    del calib.absmax["blocks.1.mlp.fc2"]
    before = snapshot(tiny_dit)
    with pytest.raises(ValueError, match="no entry for module 'blocks.1.mlp.fc2'"):
        ditq.quantize(tiny_dit, RTN(a_bits=8, a_dynamic=False), calib=calib)
    assert_unchanged(tiny_dit, before)


def test_a_failure_while_building_swaps_nothing(tiny_dit, monkeypatch):
    """Even a failure after some modules were built (here the 6th of 8) leaves the model as it was."""
    before = snapshot(tiny_dit)
    build = QuantLinear.from_linear.__func__
    calls = []

    def failing(cls, linear, spec, **kwargs):
        calls.append(linear)
        if len(calls) == 6:
            raise RuntimeError("out of memory")
        return build(cls, linear, spec, **kwargs)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(failing))
    with pytest.raises(RuntimeError, match="out of memory"):
        ditq.quantize(tiny_dit, RTN())
    assert_unchanged(tiny_dit, before)


def test_quantizing_twice_is_refused(tiny_dit):
    ditq.quantize(tiny_dit, RTN())
    with pytest.raises(ValueError, match="already quantized"):
        ditq.quantize(tiny_dit, RTN())


def test_not_a_recipe_is_refused(tiny_dit):
    with pytest.raises(TypeError, match="recipe must be a ditq recipe"):
        ditq.quantize(tiny_dit, {"method": "rtn"})


def test_requantize_equals_a_fresh_quantize_and_leaves_the_fp_model_alone(tiny_dit):
    recipe = RTN(w_bits=4, group_size=64, overrides={"blocks.0.*": {"w_bits": 6}})
    fresh = ditq.quantize(make_tiny_dit(), recipe)
    before = snapshot(tiny_dit)
    params = [p for p in tiny_dit.parameters()]
    again = requantize(tiny_dit, plan(tiny_dit, recipe))
    assert_unchanged(tiny_dit, before)
    assert [p for p in tiny_dit.parameters()] == params
    assert quantized_names(again) == quantized_names(fresh)
    for key, value in fresh.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    x, t, y = inputs()
    assert torch.equal(again(x, t, y), fresh(x, t, y))


def test_requantize_shares_the_fp_tensors_but_not_the_modules(tiny_dit):
    clone = requantize(tiny_dit, {"blocks.0.attn.qkv": QuantSpec(w_bits=4)})
    kept = clone.get_submodule("blocks.1.attn.qkv")
    assert kept is not tiny_dit.get_submodule("blocks.1.attn.qkv")
    assert kept.weight.data_ptr() == tiny_dit.get_submodule("blocks.1.attn.qkv").weight.data_ptr()
    clone.to(torch.float64)
    clone.get_submodule("blocks.1").register_forward_hook(lambda *args: None)
    assert tiny_dit.get_submodule("blocks.1.attn.qkv").weight.dtype == torch.float32
    assert not tiny_dit.get_submodule("blocks.1")._forward_hooks


def test_requantize_takes_specs_and_recipes_per_module(tiny_dit):
    clone = requantize(
        tiny_dit,
        {"blocks.0.attn.qkv": QuantSpec(w_bits=3, group_size=32), "blocks.1.mlp.fc1": RTN(w_bits=5, a_bits=None)},
    )
    assert quantized_names(clone) == ["blocks.0.attn.qkv", "blocks.1.mlp.fc1"]
    assert clone.get_submodule("blocks.0.attn.qkv").spec == QuantSpec(w_bits=3, group_size=32)
    assert clone.get_submodule("blocks.1.mlp.fc1").spec == RTN(w_bits=5, a_bits=None).spec()


@pytest.mark.parametrize(
    "modules, message",
    [
        ({"blocks.0.attn": QuantSpec()}, "'blocks.0.attn' is a Attention, not an nn.Linear"),
        ({"blocks.7.attn.qkv": QuantSpec()}, "DiT has no module 'blocks.7.attn.qkv'"),
        ({"blocks.0.attn.qkv": QuantSpec(group_size=96)}, "blocks.0.attn.qkv: group_size=96 does not divide"),
        ({"blocks.0.attn.qkv": QuantSpec(a_bits=8, a_dynamic=False)}, "blocks.0.attn.qkv: static activation"),
        ({"blocks.0.attn.qkv": 4}, "must map to a QuantSpec or a recipe"),
    ],
)
def test_requantize_errors_name_the_module(tiny_dit, modules, message):
    with pytest.raises((ValueError, TypeError), match=message):
        requantize(tiny_dit, modules)


def test_rtn_error_shrinks_with_bits():
    x, t, y = inputs()
    ref = make_tiny_dit()(x, t, y)
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


def test_clip_search_uses_calibration_rows(tiny_dit):
    calib = ditq.calibrate(tiny_dit, n_samples=4, steps=3, rows_per_layer=128)
    from ditq.eval.layers import layer_errors

    plain = ditq.quantize(make_tiny_dit(), RTN(w_bits=3, a_bits=None))
    clipped = ditq.quantize(make_tiny_dit(), RTN(w_bits=3, a_bits=None, clip_search=True), calib=calib)
    err_plain = sum(r["output_rel_err"] for r in layer_errors(tiny_dit, plain, calib.inputs))
    err_clip = sum(r["output_rel_err"] for r in layer_errors(tiny_dit, clipped, calib.inputs))
    assert err_clip < err_plain * 0.99
    assert isinstance(tiny_dit.get_submodule("blocks.0.attn.qkv"), nn.Linear)


def test_a_structural_clone_keeps_tied_parameters_tied():
    from ditq.api import shallow_clone

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    clone = shallow_clone(model)
    assert clone[0].weight is clone[1].weight and clone[0].weight is not model[0].weight
    assert clone[0].weight.data_ptr() == model[0].weight.data_ptr()

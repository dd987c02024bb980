"""Q-DiT: per-layer group sizes honoured (GPTQ included), exact bit accounting, dynamic activations."""

import copy
import json
from dataclasses import replace

import pytest
import torch

import ditq
from ditq.api import requantize, shallow_clone
from ditq.methods import gptq as gptq_module
from ditq.methods.gptq import gptq, hessian
from ditq.methods.qdit import QDiT, average_bits_per_weight, gptq_cache, static_act_qparams
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import PRESETS, load_recipe
from tests.tiny import make_tiny_mnist_dit

GROUPS = {
    "blocks.0.attn.qkv": 32,
    "blocks.0.attn.proj": None,
    "blocks.0.mlp.fc1": 64,
    "blocks.0.mlp.fc2": 256,
    "blocks.1.attn.qkv": 128,
    "blocks.1.attn.proj": 32,
    "blocks.1.mlp.fc1": None,
    "blocks.1.mlp.fc2": 32,
}


@pytest.fixture(scope="module")
def fp_and_calib():
    model = make_tiny_mnist_dit()
    return model, ditq.calibrate(model, n_samples=4, steps=4, rows_per_layer=256)


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_every_layer_keeps_its_own_group_size_in_gptq(fp_and_calib, one_thread):
    fp, calib = fp_and_calib
    q = ditq.quantize(shallow_clone(fp), QDiT.with_groups(GROUPS, w_bits=3), calib)
    layers = quantized_layers(q)
    assert set(layers) == set(GROUPS)
    for name, g in GROUPS.items():
        m, linear = layers[name], fp.get_submodule(name)
        assert (m.spec.group_size, m.spec.a_group_size) == (g, g)  # activations coupled to the weight group
        assert m.scales.shape == (linear.out_features, 1 if g is None else linear.in_features // g)
        spec = replace(m.spec)
        codes, scales, zeros = gptq(linear.weight, hessian(calib.inputs[name]), spec)
        assert torch.equal(m.weight_codes(), codes) and torch.equal(m.scales, scales) and torch.equal(m.zeros, zeros)
    # the reference code's bug: GPTQ run with one group size for all layers gives other codes
    name = "blocks.0.attn.qkv"
    linear = fp.get_submodule(name)
    wrong, _, _ = gptq(linear.weight, hessian(calib.inputs[name]), replace(layers[name].spec, group_size=128))
    assert not torch.equal(layers[name].weight_codes(), wrong)


def test_bit_accounting_matches_the_stored_buffers(fp_and_calib, one_thread):
    fp, calib = fp_and_calib
    for w_bits in (3, 4, 6):
        recipe = QDiT.with_groups(GROUPS, w_bits=w_bits, gptq=False)
        q = ditq.quantize(shallow_clone(fp), recipe, calib)
        stored = weights = 0
        for m in quantized_layers(q).values():
            stored += m.qweight.numel() * 8 + m.scales.numel() * 32 + m.zeros.numel() * 8
            weights += m.in_features * m.out_features
        assert average_bits_per_weight(fp, recipe) == pytest.approx(stored / weights, rel=1e-12)
    # by hand: W4 asymmetric g32 on a 128→384 layer = 4 + (32 + 8) / 32
    assert QDiT(w_bits=4, group_size=32).spec().bits_per_weight(128, 384) == 4 + 40 / 32


def test_gptq_beats_round_to_nearest_on_calibration_inputs(fp_and_calib, one_thread):
    fp, calib = fp_and_calib
    errors = {}
    names = ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.proj"]
    for use_gptq in (True, False):
        recipe = QDiT.with_groups(GROUPS, w_bits=3, a_bits=None, gptq=use_gptq)
        q = requantize(fp, dict.fromkeys(names, recipe), calib)
        errors[use_gptq] = sum(
            float((m(calib.inputs[n]) - fp.get_submodule(n)(calib.inputs[n])).detach().pow(2).mean())
            for n, m in quantized_layers(q).items()
        )
    assert errors[True] < 0.8 * errors[False]


def _hand_dynamic(x, group, bits=8):
    """Asymmetric min/max per token per group of `group` channels, range widened to contain 0."""
    xg = x.reshape(*x.shape[:-1], -1, group).float()
    lo = xg.amin(-1, keepdim=True).clamp(max=0)
    hi = xg.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    q = (torch.round(xg / scale) + zero).clamp(0, 2**bits - 1)
    return ((q - zero) * scale).reshape(x.shape)


def test_dynamic_activations_match_a_hand_reference_and_follow_each_sample(fp_and_calib, one_thread):
    fp, calib = fp_and_calib
    name = "blocks.0.mlp.fc2"  # 512 → 128
    q = requantize(fp, {name: QDiT.with_groups({name: 64}, w_bits=4)}, calib).get_submodule(name)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 512) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1, 1)  # three "timesteps"
    expected = _hand_dynamic(x, 64) @ q.dequantized_weight().T + q.bias
    assert torch.allclose(q(x), expected, rtol=1e-5, atol=1e-5)
    # static (calibrated once) scales cannot follow a sample 30x larger than calibration saw
    static = requantize(fp, {name: QDiT.with_groups({name: 64}, w_bits=4, a_dynamic=False)}, calib).get_submodule(name)
    ref = x @ q.dequantized_weight().T + q.bias
    err = {k: float((m(x)[2] - ref[2]).norm() / ref[2].norm()) for k, m in (("dyn", q), ("static", static))}
    assert err["dyn"] < 0.05 < err["static"]


def test_static_activation_qparams_by_hand(fp_and_calib, one_thread):
    _, calib = fp_and_calib
    name = "blocks.0.mlp.fc1"
    spec = QDiT(group_size=32, a_dynamic=False).spec()
    scale, zero = static_act_qparams(name, calib, spec)
    rows = calib.inputs[name].float().reshape(-1, 4, 32)
    lo = rows.amin(dim=(0, 2)).clamp(max=0)
    hi = rows.amax(dim=(0, 2)).clamp(min=0)
    assert torch.allclose(scale, (hi - lo) / 255)
    assert torch.equal(zero, torch.round(-lo / scale).to(torch.uint8))
    sym_scale, sym_zero = static_act_qparams(name, calib, replace(spec, a_symmetric=True))
    assert sym_zero is None
    assert torch.allclose(sym_scale, calib.absmax[name].reshape(4, 32).amax(-1) / 127)


def test_gptq_cache_reuses_results_and_notices_changed_weights(fp_and_calib, monkeypatch, one_thread):
    fp, calib = fp_and_calib
    fp = copy.deepcopy(fp)  # its weights are changed below
    calls = []
    real = gptq_module.gptq
    monkeypatch.setattr("ditq.methods.qdit.gptq", lambda *a, **k: calls.append(1) or real(*a, **k))
    names = ["blocks.0.attn.qkv", "blocks.1.attn.proj"]
    recipe = QDiT.with_groups(GROUPS)
    with gptq_cache():
        a = requantize(fp, dict.fromkeys(names, recipe), calib)
        b = requantize(fp, dict.fromkeys(names, recipe), calib)
        assert len(calls) == 2
        for n in names:
            assert torch.equal(a.get_submodule(n).qweight, b.get_submodule(n).qweight)
        with torch.no_grad():
            fp.get_submodule(names[0]).weight.mul_(1.5)  # bumps the tensor version
        requantize(fp, dict.fromkeys(names, recipe), calib)
        assert len(calls) == 3
    requantize(fp, dict.fromkeys(names, recipe), calib)  # outside: no memo
    assert len(calls) == 5


def test_recipe_file_round_trip_and_presets(tmp_path):
    recipe = QDiT.with_groups(GROUPS, w_bits=3)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(path) == recipe
    assert recipe.for_module("blocks.0.attn.proj").group_size is None
    assert recipe.for_module("blocks.1.mlp.fc2").group_size == 32
    assert isinstance(PRESETS["qdit-w4a8"], QDiT)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: QDiT(w_bits=9), ["w_bits"]),
        (lambda: QDiT(a_granularity="tensor"), ["a_granularity"]),
        (lambda: QDiT(group_size=0), ["group_size"]),
        (lambda: QDiT(damp=2.0), ["damp"]),
        (lambda: QDiT.with_groups({"blocks.*.attn.qkv": 32}), ["wildcard"]),
        (lambda: QDiT.with_groups([("a", 32)]), ["groups"]),
    ],
)
def test_bad_recipes_are_named(make, words):
    with pytest.raises((ValueError, TypeError)) as err:
        make()
    assert all(w in str(err.value) for w in words)


def test_bad_layers_and_missing_calibration_are_named(fp_and_calib, one_thread):
    fp, calib = fp_and_calib
    with pytest.raises(ValueError, match="blocks.0.attn.proj.*group_size=96"):
        ditq.quantize(shallow_clone(fp), QDiT.with_groups({"blocks.0.attn.proj": 96}), calib)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.*calib"):
        ditq.quantize(shallow_clone(fp), QDiT(), None)
    with pytest.raises(ValueError, match="matches no Linear"):
        ditq.quantize(shallow_clone(fp), QDiT.with_groups({"blocks.9.attn.qkv": 32}), calib)
    ditq.quantize(shallow_clone(fp), QDiT(gptq=False), None)  # RTN weights + dynamic activations need none

"""MatQuant: joint training over nested widths (λ-weighted), and serving nested slices of one stored int8
checkpoint, on FakeQuantLinear and QuantLinear alike, in memory (`set_served_bits`) and on loading
(`ditq.load(path, bits=...)`)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
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
from ditq.recipes import recipe_from_dict
from ditq.train import build_parser, config_from_args
from ditq.training import loop
from ditq.training.config import TrainConfig
from ditq.training.distributed import DistEnv
from ditq.training.rng import capture_rng, restore_rng
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
# Joint training: Σ_r λ_r · L_r
# --------------------------------------------------------------------------------------------


def test_recipe_weights_each_width_and_refuses_bad_weights() -> None:
    assert ditq.load_recipe("matquant").served_weights == (1.0, 1.0, 1.0)
    assert replace(NESTED, nested_weights=[1, 0.5, 2]).served_weights == (1.0, 0.5, 2.0)
    for weights in [(1, 1), (1, 0, 1), (1, float("nan"), 1), (1, True, 1)]:
        with pytest.raises(ValueError, match=r"nested_weights="):
            replace(NESTED, nested_weights=weights)
    with pytest.raises(ValueError, match=r"one weight per width of nested_bits=\(\)"):
        QAT(w_bits=4, nested_weights=(2.0,))


def test_a_nested_step_takes_the_weighted_sum_of_each_widths_gradients(tmp_path: Path) -> None:
    """Weights that are powers of two scale every gradient exactly, so the sum is checked bit for bit. The
    zero-initialised adaLN and final layer are perturbed so that the labels matter, and a high label dropout
    makes widths that drew their own drops differ."""
    weights = {8: 2.0, 4: 1.0, 2: 0.25}
    recipe = replace(NESTED, nested_weights=tuple(weights.values())).to_dict()
    cfg = TrainConfig(model_overrides=dict(depth=1, hidden_size=64, patch_size=8, class_dropout_prob=0.5),
                      recipe=recipe, out_dir=str(tmp_path), global_batch_size=4, grad_clip=None, device="cpu",
                      progress=False)  # fmt: skip
    run = loop.start_run(cfg, DistEnv(rank=0, world_size=1, device=torch.device("cpu"), owns_group=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, y = run.batches.at(0, run.noise_gen)
    draws = capture_rng(run.noise_gen, x.device)
    expected, total = {}, torch.zeros(())
    for bits, weight in weights.items():
        restore_rng(draws, run.noise_gen, x.device)
        ditq.set_served_bits(run.model, bits)
        run.model.zero_grad(set_to_none=True)
        loss = run.loss_fn(run.model_fn, x, y, run.noise_gen)
        loss.backward()
        total += weight * loss.detach()
        for name, p in run.model.named_parameters():
            if p.grad is not None:
                expected[name] = weight * p.grad if name not in expected else expected[name] + weight * p.grad
    restore_rng(draws, run.noise_gen, x.device)
    step_loss, _ = loop.train_step(run, x, y)
    assert torch.equal(step_loss, total)
    grads = {name: p.grad for name, p in run.model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, expected[name]), name
    assert {m.spec.w_bits for m in run.model.modules() if isinstance(m, FakeQuantLinear)} == {4}


def test_train_command_takes_the_matquant_preset() -> None:
    cfg = config_from_args(build_parser().parse_args(["--recipe", "matquant", "--loss", "distill", "--teacher",
                                                      "DiT-MNIST"]))  # fmt: skip
    assert recipe_from_dict(cfg.recipe) == QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2))


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


@pytest.mark.parametrize("stored", range(3, 9))
def test_extra_precision_int2_keeps_its_top_bucket_off_the_stored_grid(stored: int) -> None:
    lo, hi = qrange(stored, symmetric=True)
    q = torch.arange(lo, hi + 1, dtype=torch.int8)
    step = 2 ** (stored - 2)
    nested, extra = slice_codes(q, stored, 2), slice_codes(q, stored, 2, extra_precision=True)
    assert extra.dtype == torch.int16
    assert sorted(set(extra.tolist())) == [k * step for k in (-2, -1, 0, 1, 2)]  # 5 levels: 3-bit codes
    top = 2 * q.int() >= 3 * step  # round(q / step) = 2: the bucket the nested slice clamps onto 1
    assert bool((extra[top] == 2 * step).all()) and bool((nested[top] == step).all())
    assert torch.equal(extra[~top], nested[~top].to(torch.int16))
    assert bool(((extra.int() - q.int()).abs() <= step // 2).all())  # round to nearest, never clamped
    assert 2 * step > hi  # the new level is no stored code: the slice is not nested in the stored grid
    for r in range(3, stored + 1):  # only the 2-bit slice changes
        assert torch.equal(slice_codes(q, stored, r, extra_precision=True), slice_codes(q, stored, r))


def test_extra_precision_needs_wider_stored_codes() -> None:
    for stored in (None, 2):
        with pytest.raises(ValueError, match=rf"extra_precision widens .* got stored_bits={stored}"):
            QuantSpec(w_bits=2, stored_bits=stored, extra_precision=True)


@pytest.mark.parametrize("learnable_scale", [False, True], ids=["minmax", "lsq"])
def test_extra_precision_model_trains_converts_and_reloads_its_int2_slice(tmp_path: Path,
                                                                          learnable_scale: bool) -> None:
    torch.manual_seed(0)
    fake = prepare(tiny(), replace(NESTED, extra_precision=True, learnable_scale=learnable_scale))
    qat_steps(fake, 2)
    ditq.set_served_bits(fake, 2)
    path = ditq.save(convert(copy.deepcopy(fake)), tmp_path / "extra.safetensors")
    loaded = ditq.load(path, bits=2)
    fake_weights = {n: m.quantized_weight().detach() for n, m in fake.named_modules()
                    if isinstance(m, FakeQuantLinear)}
    for name, layer in packed_layers(loaded).items():
        assert layer.spec.extra_precision, name
        codes = slice_codes(layer.weight_codes(), 8, 2, extra_precision=True)
        assert torch.equal(layer.dequantized_weight(), fake_weights[name]), name
        assert torch.equal(layer.dequantized_weight(), dequantize(codes, layer.scales, None, 32)), name
    assert any(int(slice_codes(m.weight_codes(), 8, 2, extra_precision=True).max()) == 128
               for m in packed_layers(loaded).values())  # the extra level is served


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

"""Folding SVDQuant's smoothing into the producers of the layers' inputs (`ditq.kernels.folding`): which layers
fold on the zoo DiT and a diffusers FLUX transformer, that every backend keeps the unfolded model's outputs, that
a second `prepare_for_inference` folds nothing, and that a folded model is never saved.

The fold changes roundings only: a folded layer's input is its producer's output computed from rows divided by s
(rounded once from float64) instead of that output divided by s, a few float32 roundings apart. Where such a move
crosses an FP8 rounding tie an activation code lands one e4m3 step away, and that step, not the rounding, would
then set the outputs' distance. So folded and unfolded runs are compared as compiled and eager ones are
(`tests.kernels.compiled.assert_matches_with_shared_codes`): the same codes but at ties, one step off at most
and at few elements; with the unfolded run's codes shared, the outputs within float32 rounding (1e-5, ~100 ulps).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

import ditq
from ditq.kernels import fp8, prepare_for_inference
from ditq.kernels.folding import folded_layers
from ditq.kernels.fp8 import quantize_rows
from ditq.methods.svdquant import SVDQuant
from ditq.quant.qlinear import QuantLinear
from tests.kernels.compiled import assert_matches_with_shared_codes
from tests.kernels.test_rowquant import DEVICE
from tests.tiny import make_tiny_dit

RECIPE = SVDQuant(group_size=None, a_bits=8, a_format="fp8", a_group_size=None, rank=4, alphas=(0.5,))
THREADS = torch.get_num_threads()


def spread_smoothing(model: torch.nn.Module, seed: int = 0) -> None:
    """Every smoothed layer gets s in [1/4, 4] (one vector per input group): the tiny calibration leaves many at 1,
    which would fold as a no-op."""
    g = torch.Generator().manual_seed(seed)
    by_group: dict[str, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.smooth is not None:
            key = m.spec.input_group or str(id(m))
            s = by_group.setdefault(key, torch.exp2(torch.rand(m.in_features, generator=g) * 4 - 2))
            m.smooth.copy_(s)


def quantized(model: torch.nn.Module, recipe: SVDQuant = RECIPE, run=None) -> torch.nn.Module:
    torch.set_num_threads(1)  # as the tests run (a module fixture is set up before their one_thread)
    try:
        kwargs = {"run": run, "rows_per_layer": 32} if run else {"n_samples": 2, "steps": 2, "rows_per_layer": 64}
        ditq.quantize(model, recipe, ditq.calibrate(model, seed=1, **kwargs))
    finally:
        torch.set_num_threads(THREADS)
    spread_smoothing(model)
    return model.to(DEVICE)


@pytest.fixture(scope="module")
def quantized_dit():
    """One block: each fold site of the zoo DiT once (the Triton interpreter runs the FP8 backends slowly)."""
    return quantized(make_tiny_dit(depth=1))


def dit_inputs():
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g), torch.arange(2)
    return x.to(DEVICE), t.to(DEVICE), y.to(DEVICE)


def unfolded_on(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    return prepare_for_inference(model, backend, **({"fold": False} if backend in fp8.FP8_BACKENDS else {}))


@torch.no_grad()
def test_the_dit_folds_qkv_fc1_and_proj_and_every_backend_keeps_the_outputs(quantized_dit, monkeypatch, caplog):
    unfolded, model, inputs = quantized_dit, copy.deepcopy(quantized_dit), dit_inputs()
    smoothed = []  # per pre-pass: whether it still multiplies by 1/s
    monkeypatch.setattr(fp8, "quantize_rows", lambda *args: smoothed.append(args[1] is not None) or quantize_rows(*args))
    with caplog.at_level(logging.INFO, logger="ditq.kernels"):
        prepare_for_inference(model, "fp8-cached")  # "fp8" runs the same pre-passes, expanding weights per call
    assert "folded the smoothing of 3 layer(s)" in caplog.text
    assert folded_layers(model) == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1"]
    assert not any("inv_smooth" in model.get_submodule(n).kernel_buffers for n in folded_layers(model))
    model(*inputs)
    assert smoothed == [False, False, False, True]  # qkv, proj, fc1 unsmoothed; fc2 reads a GELU: smoothed
    monkeypatch.undo()
    for backend in ("fp8-cached", "fp8", "reference", "dequantized"):  # "fp8": these 32 rows take the lowbit kernel
        prepare_for_inference(model, backend)
        unfolded_on(unfolded, backend)
        assert_matches_with_shared_codes(lambda: unfolded(*inputs), lambda: model(*inputs))
    assert not folded_layers(unfolded)


@torch.no_grad()
def test_preparing_again_folds_nothing_twice_and_a_folded_model_is_never_saved(quantized_dit, tmp_path, caplog):
    """Outputs on the reference backend (the fold is the FP8 backends' `prepare_for_inference`, the forward
    any backend's): bit for bit after preparing again, and from a file saved before the fold."""
    model, inputs = copy.deepcopy(quantized_dit), dit_inputs()
    prepare_for_inference(model, "fp8")
    once = prepare_for_inference(model, "reference")(*inputs)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    caplog.set_level(logging.INFO, logger="ditq.kernels")
    for backend in ("fp8", "reference", "fp8-cached", "reference"):
        prepare_for_inference(model, backend)
    assert caplog.text.count("folded the smoothing of 0 layer(s)") == 2
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(*inputs), once, rtol=0, atol=0)
    path = tmp_path / "q.safetensors"
    with pytest.raises(ValueError, match=r"folded into the producers of 3 layer\(s\) \(blocks.0.attn.qkv, ...\)"):
        ditq.save(model, path)
    assert not path.exists()
    ditq.save(quantized_dit, path)  # saved before preparing: loads unfolded and folds once
    loaded = prepare_for_inference(ditq.load(path, device=DEVICE), "fp8")
    torch.testing.assert_close(prepare_for_inference(loaded, "reference")(*inputs), once, rtol=0, atol=0)


@torch.no_grad()
def test_a_quantized_modulation_keeps_the_smoothing_of_what_it_modulates():
    model = quantized(make_tiny_dit(depth=1), dataclasses.replace(RECIPE, quantize_modulation=True))
    with pytest.raises(TypeError, match="fold must be True or False, got 'no'"):
        prepare_for_inference(model, "fp8", fold="no")
    assert not folded_layers(model)
    prepare_for_inference(model, "fp8")
    assert folded_layers(model) == ["blocks.0.attn.proj"]


def flux():
    """A tiny FLUX transformer quantized with SVDQuant W4A8-FP8 (one double block, two single blocks)."""
    pytest.importorskip("diffusers")
    from ditq.integrations.diffusers import diffusers_adapter
    from tests.integrations.tiny_diffusers import make_transformer

    model = make_transformer("FluxTransformer2DModel")
    adapter = diffusers_adapter(model)
    return quantized(model, run=lambda m: adapter.run(m, size=2)), lambda m: adapter.run(m, batch=2, size=2)


@torch.no_grad()
def test_flux_folds_its_modulated_inputs_and_a_joint_attention_only_with_one_smoothing(caplog):
    """Folded by the "fp8" backend's `prepare_for_inference`, compared on the reference and dequantized backends
    (the zoo DiT's test runs the FP8 kernels on folded layers)."""
    unfolded, run = flux()
    model = copy.deepcopy(unfolded)
    with caplog.at_level(logging.INFO, logger="ditq.kernels"):
        prepare_for_inference(model, "fp8")
    attn = "transformer_blocks.0.attn"
    assert f"the smoothing of {attn}.to_out.0 stays at run time: the layers reading one tensor hold different" in caplog.text
    block = [f"{attn}.{n}" for n in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj")]
    single = [f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in ("proj_mlp", "attn.to_q", "attn.to_k",
                                                                                 "attn.to_v")]  # fmt: skip
    feed_forward = ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.0.proj"]
    assert sorted(folded_layers(model)) == sorted(block + feed_forward + single)
    for backend in ("reference", "dequantized"):
        prepare_for_inference(model, backend)
        unfolded_on(unfolded, backend)
        assert_matches_with_shared_codes(lambda: run(unfolded), lambda: run(model))

    # one smoothing for both outputs of the joint attention: to_v's and add_v_proj's rows take it
    joint = copy.deepcopy(unfolded)
    joint.get_submodule(f"{attn}.to_add_out").smooth.copy_(joint.get_submodule(f"{attn}.to_out.0").smooth)
    separate = copy.deepcopy(joint)
    prepare_for_inference(joint, "fp8")
    assert {f"{attn}.to_out.0", f"{attn}.to_add_out"} <= set(folded_layers(joint))
    prepare_for_inference(joint, "reference")
    assert_matches_with_shared_codes(lambda: run(separate), lambda: run(joint))

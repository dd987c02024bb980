"""`from_pretrained(..., quantization_config=DitqConfig(...))`: what it refuses up front, and saving its models."""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ditq  # noqa: E402
from ditq.integrations.diffusers import diffusers_adapter  # noqa: E402
from ditq.integrations.diffusers_quantizer import DitqConfig  # noqa: E402
from tests.integrations.tiny_diffusers import make_transformer  # noqa: E402


@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "PixArtTransformer2DModel"])
def test_a_model_quantized_while_loading_saves_and_reloads(tmp_path, name):
    make_transformer(name).save_pretrained(tmp_path / "fp")
    q = getattr(diffusers, name).from_pretrained(tmp_path / "fp", quantization_config=DitqConfig("w4a8-fp8"))
    loaded = ditq.load(ditq.save(q, tmp_path / "q.safetensors"))  # rebuilt without the quantization config
    adapter = diffusers_adapter(q)
    # a copy on memory of its own: CPU kernels may round differently on the loader's unaligned views
    assert torch.equal(adapter.run(loaded, seed=3), adapter.run(copy.deepcopy(q), seed=3))


def test_a_config_field_the_installed_diffusers_lacks_names_the_writing_version():
    adapter = diffusers_adapter(make_transformer("DiTTransformer2DModel"))
    config = adapter.config(make_transformer("DiTTransformer2DModel"))
    with pytest.raises(ValueError, match=r"takes no config fields \['new_field'\]$"):  # no guess when it is this one
        adapter.build({**config, "new_field": 1})
    with pytest.raises(ValueError, match=r"\['new_field'\]; the file was written with diffusers 9\.0\.0"):
        adapter.build({**config, "new_field": 1, "_diffusers_version": "9.0.0"})


@pytest.mark.parametrize("recipe, message", [
    ("svdquant-w4a4", r"'svdquant-w4a4' needs calibration data.*calibrate_pipeline"),
    ("qdit-w4a8", r"'qdit-w4a8' needs calibration data.*calibrate_pipeline"),  # GPTQ reads layer inputs
    ({"method": "rtn", "a_dynamic": False}, "needs calibration data"),  # static activation scales
    ({"method": "rtn", "overrides": {"proj_out": {"a_dynamic": False}}}, "needs calibration data"),
    ("terdit", "QAT recipes are trained, not applied to a model: use `ditq train"),
])
def test_recipes_that_need_calibration_or_training_are_refused_when_the_config_is_made(recipe, message):
    with pytest.raises(ValueError, match=message):
        DitqConfig(recipe)


def refuse_weights(*args, **kwargs):
    raise AssertionError("the weights were loaded before the recipe was checked against the model")


@pytest.mark.parametrize("recipe, message", [
    ({"method": "rtn", "w_bits": 4, "group_size": 48}, "group_size=48 does not divide in_features=32"),
    ({"method": "rtn", "skip": ["x_embedder*"]}, "skip pattern 'x_embedder\\*' matches no module"),
])
def test_the_recipe_is_checked_against_the_skeleton_before_the_weights_load(tmp_path, monkeypatch, recipe, message):
    make_transformer("DiTTransformer2DModel").save_pretrained(tmp_path)
    monkeypatch.setattr(diffusers.ModelMixin, "_load_pretrained_model", classmethod(refuse_weights))
    with pytest.raises(ValueError, match=message):
        diffusers.DiTTransformer2DModel.from_pretrained(tmp_path, quantization_config=DitqConfig(recipe))

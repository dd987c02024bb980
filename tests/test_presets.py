"""Every preset fits any supported model: a BERT-shaped encoder no adapter knows, and diffusers DiT, PixArt and
FLUX transformers. Skips come from the model's adapter, never from one family's module names."""

from dataclasses import replace
from fnmatch import fnmatchcase

import pytest
import torch
from torch import nn

import ditq
from ditq.adapters import adapter_for
from ditq.api import plan
from ditq.methods.svdquant import SVDQuant
from ditq.quant.fakequant import FakeQuantLinear
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import load_recipe
from tests.tiny import make_tiny_bert, make_tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")

# width 128: every preset's group size (64, 128) divides every layer
WIDE = {
    "DiTTransformer2DModel": dict(attention_head_dim=64),
    "PixArtTransformer2DModel": dict(attention_head_dim=64, cross_attention_dim=128),
    "FluxTransformer2DModel": dict(attention_head_dim=64, axes_dims_rope=(16, 24, 24)),
}


def bert():
    model = make_tiny_bert()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, lambda m: m(ids)


def transformer(name):
    def make():
        pytest.importorskip("diffusers")
        from ditq.integrations.diffusers import diffusers_adapter
        from tests.integrations.tiny_diffusers import make_transformer

        model = make_transformer(name, **WIDE[name])
        adapter = diffusers_adapter(model)
        return model, lambda m: adapter.run(m, size=adapter.trace_size(m))

    return make


MODELS = {"bert": bert, **{name: transformer(name) for name in WIDE}}


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), p) for p in patterns for i in range(1, len(parts) + 1))


def _expected(model: nn.Module, recipe) -> tuple[set[str], set[str]]:
    """(Linears the recipe must quantize, the adaLN modulation Linears among them)."""
    adapter = adapter_for(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept = {n for n in linears if not _skipped(n, adapter.skip(recipe.quantize_modulation))}
    return kept, {n for n in kept if _skipped(n, adapter.modulation)}


@pytest.mark.parametrize("preset", ["svdquant-w4a4", "svdquant-w4a8", "qdit-w4a8", "w4a8"])
@pytest.mark.parametrize("family", MODELS)
def test_ptq_presets_quantize_any_supported_model(family, preset):
    model, run = MODELS[family]()
    recipe = load_recipe(preset)
    if isinstance(recipe, SVDQuant):  # the preset's selection and formats; a one-point search, for speed
        recipe = replace(recipe, alphas=(0.5,), search_rows=64)
    expected, modulation = _expected(model, recipe)
    assert bool(modulation) == (recipe.quantize_modulation and family != "bert")  # BERT has no adaLN
    calib = ditq.calibrate(model, run=run, rows_per_layer=64)
    ditq.quantize(model, recipe, calib=calib)
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} == expected
    assert torch.isfinite(run(model)).all()


@pytest.mark.parametrize("family", MODELS)
def test_the_ternary_preset_prepares_any_supported_model(family):
    model, run = MODELS[family]()
    recipe = load_recipe("terdit")
    expected, _ = _expected(model, recipe)
    ditq.prepare(model, recipe)
    assert {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)} == expected


def test_svdquant_activation_groups_follow_the_activation_format():
    assert SVDQuant().spec().a_group_size == 64  # int: groups of 64 channels
    assert SVDQuant(a_bits=8, a_format="fp8").spec().a_group_size is None  # FP8: per token, as the preset
    assert SVDQuant(a_bits=None).spec().a_bits is None  # no activation quantization, no activation groups
    assert SVDQuant(a_bits=8, a_format="fp8", quantize_modulation=True) == load_recipe("svdquant-w4a8")
    assert SVDQuant(a_bits=8, a_format="fp8", a_group_size=32).spec().a_group_size == 32  # asked for explicitly


def test_on_zoo_models_the_modulation_presets_keep_their_selection():
    model = make_tiny_dit()  # the paper's skips: embedders and the final layer, the blocks' adaLN quantized
    paper = ("x_embedder*", "t_embedder*", "y_embedder*", "final_layer*")
    assert set(plan(model, load_recipe("svdquant-w4a4"))) == set(plan(model, SVDQuant(skip=paper)))
    assert set(plan(model, load_recipe("terdit"))) == set(plan(model, ditq.QAT(skip=paper)))


def test_quantize_modulation_edits_the_default_skips_only():
    with pytest.raises(ValueError, match="quantize_modulation=True edits the adapter's default skips"):
        ditq.RTN(skip=("final_layer*",), quantize_modulation=True)
    with pytest.raises(TypeError, match="quantize_modulation='yes'"):
        ditq.RTN(quantize_modulation="yes")

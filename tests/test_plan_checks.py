"""A recipe is checked against the model before any calibration: a mistake costs no sampling time, on the
zoo path (`post_training_quantize`), the pipeline path (`ditq quantize --pipeline`) and in the API."""

import json

import pytest

import ditq
from ditq.api import check_plan
from ditq.cli import main
from tests.tiny import make_tiny_dit, make_tiny_mnist_dit


def refuse(*args, **kwargs):
    raise AssertionError("calibration ran before the recipe was checked")


def recipe_file(tmp_path, data):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("recipe, message", [
    ("terdit", "QAT recipes are trained, not applied to a model: use `ditq train"),
    ({"method": "svdquant", "input_groups": [["blocks.0.attn.qkv", "final_layer.linear"]]},
     "['final_layer.linear'] are not Linears this recipe quantizes"),
    ({"method": "svdquant", "input_groups": [["blocks.0.attn.qkv", "blocks.0.mlp.fc2"]]},
     "'blocks.0.mlp.fc2' and 'blocks.0.attn.qkv' have different in_features"),
])
def test_zoo_quantize_checks_the_recipe_before_calibrating(tmp_path, monkeypatch, capsys, recipe, message):
    monkeypatch.setattr("ditq.pipeline.calibrate", refuse)
    fp = ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")
    source = recipe if isinstance(recipe, str) else recipe_file(tmp_path, recipe)
    assert main(["quantize", "--model", str(fp), "--recipe", source, "--out", str(tmp_path / "q.safetensors"),
                 "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.integrations.tiny_diffusers import make_dit_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    make_dit_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe, message", [
    ("svdquant-w4a8", "group_size=64 does not divide in_features=32"),
    ({"method": "rtn", "skip": ["x_embedder*"]}, "skip pattern 'x_embedder*' matches no module"),
])
def test_pipeline_quantize_checks_the_recipe_before_calibrating(pipeline_folder, tmp_path, monkeypatch, capsys,
                                                                recipe, message):
    monkeypatch.setattr("ditq.integrations.diffusers.calibrate_pipeline", refuse)
    source = recipe if isinstance(recipe, str) else recipe_file(tmp_path, recipe)
    assert main(["quantize", "--pipeline", str(pipeline_folder), "--recipe", source, "--class-label", "3",
                 "--out", str(tmp_path / "t.safetensors"), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_check_plan_returns_the_plan_and_reads_no_weights():
    model = make_tiny_dit().to("meta")  # names and shapes only
    targets = check_plan(model, ditq.load_recipe("svdquant-w4a4"))
    assert "blocks.0.adaLN_modulation.1" in targets and "final_layer.linear" not in targets
    with pytest.raises(ValueError, match="blocks.0.attn.qkv: group_size=96 does not divide"):
        check_plan(model, ditq.RTN(w_bits=4, group_size=96))


def test_a_recipe_that_contradicts_itself_is_refused_when_it_is_made():
    with pytest.raises(ValueError, match="clip_search does not apply to ternary"):
        ditq.RTN(w_format="ternary", w_bits=2, clip_search=True)
    with pytest.raises(ValueError, match="clip_search does not apply to ternary"):  # one layer's override
        ditq.RTN(w_format="ternary", w_bits=2, overrides={"blocks.0.*": {"clip_search": True}})

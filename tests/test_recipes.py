import json

import pytest

from ditq.recipes import DEFAULT_SKIP, PRESETS, RTN, load_recipe, recipe_from_dict


def test_presets_are_the_baseline_rows():
    assert PRESETS["w4a8"] == RTN(w_bits=4, group_size=128, a_bits=8)
    assert PRESETS["w4a16"].a_bits is None
    assert PRESETS["w4a4"].a_group_size == 64


def test_round_trip_through_dict_and_files(tmp_path):
    recipe = RTN(w_bits=4, group_size=64, a_bits=8, overrides={"blocks.0.*": {"w_bits": 8}})
    assert recipe_from_dict(recipe.to_dict()) == recipe
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(tmp_path / "r.json") == recipe
    (tmp_path / "r.yaml").write_text("method: rtn\nw_bits: 6\na_bits: 8\n")
    assert load_recipe(str(tmp_path / "r.yaml")) == RTN(w_bits=6, a_bits=8)
    assert load_recipe("W8A8") == PRESETS["w8a8"]


def test_for_module_applies_matching_overrides_in_order():
    recipe = RTN(w_bits=4, overrides={"blocks.*": {"w_bits": 6}, "blocks.0.*": {"w_bits": 8}})
    assert recipe.for_module("blocks.0.attn.qkv").w_bits == 8
    assert recipe.for_module("blocks.1.attn.qkv").w_bits == 6
    assert recipe.for_module("final_layer.linear").w_bits == 4


@pytest.mark.parametrize(
    "data, message",
    [
        ({"method": "rtn", "w_bit": 4}, "unknown RTN keys \\['w_bit'\\]"),
        ({"method": "gptq"}, "unknown recipe method 'gptq'"),
        ({"method": "rtn", "w_bits": 9}, "w_bits=9"),
        ({"method": "rtn", "w_bits": 1}, "w_bits=1"),
        ({"method": "rtn", "group_size": 0}, "group_size=0"),
        ({"method": "rtn", "a_bits": 12}, "a_bits=12"),
        ({"method": "rtn", "a_bits": None, "a_dynamic": False}, "a_dynamic=False"),
        ({"method": "rtn", "overrides": {"blocks.*": {"bits": 4}}}, "unknown fields \\['bits'\\]"),
        ({"method": "rtn", "overrides": {"blocks.*": {"w_bits": 11}}}, "w_bits=11"),
    ],
)
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        recipe_from_dict(data)


def test_missing_recipe_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_recipe(tmp_path / "nope.yaml")


def test_default_skip_keeps_embedders_final_layer_and_adaln():
    assert {"x_embedder*", "t_embedder*", "y_embedder*", "final_layer*", "*adaLN_modulation*"} == set(DEFAULT_SKIP)

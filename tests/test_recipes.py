import json
from dataclasses import FrozenInstanceError

import pytest

from ditq.recipes import PRESETS, RTN, load_recipe, recipe_from_dict


def test_presets_are_the_baseline_rows():
    assert PRESETS["w4a8"] == RTN(w_bits=4, group_size=128, a_bits=8)
    assert PRESETS["w4a16"].a_bits is None
    assert PRESETS["w4a4"].a_group_size == 64


def test_round_trip_through_dict_and_files(tmp_path):
    recipe = RTN(w_bits=4, group_size=64, a_bits=8, overrides={"blocks.0.*": {"w_bits": 8}})
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert recipe_from_dict(RTN(skip=["final_layer*"]).to_dict()).skip == ("final_layer*",)
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(tmp_path / "r.json") == recipe
    (tmp_path / "r.yaml").write_text("method: rtn\nw_bits: 6\na_bits: 8\n")
    assert load_recipe(str(tmp_path / "r.yaml")) == RTN(w_bits=6, a_bits=8)
    assert load_recipe("W8A8") == PRESETS["w8a8"]


def test_skip_defaults_to_the_adapter():
    assert RTN().skip is None and RTN().to_dict()["skip"] is None


def test_recipes_are_hashable_and_equal_recipes_hash_equal():
    a = RTN(w_bits=4, overrides={"blocks.0.*": {"w_bits": 8, "a_bits": None}})
    b = RTN(w_bits=4, overrides={"blocks.0.*": {"a_bits": None, "w_bits": 8}})
    assert a == b and hash(a) == hash(b)
    assert len({a, b, RTN(w_bits=4)}) == 2
    assert {a: "row"}[b] == "row"


def test_overrides_cannot_change_through_the_callers_dict():
    changes = {"w_bits": 8}
    overrides = {"blocks.0.*": changes}
    recipe = RTN(w_bits=4, overrides=overrides)
    changes["w_bits"] = 2
    overrides["blocks.1.*"] = {"w_bits": 3}
    assert recipe.for_module("blocks.0.attn.qkv").w_bits == 8
    assert recipe.for_module("blocks.1.attn.qkv").w_bits == 4
    assert recipe.to_dict()["overrides"] == {"blocks.0.*": {"w_bits": 8}}
    with pytest.raises(FrozenInstanceError):
        recipe.w_bits = 3


def test_for_module_applies_matching_overrides_in_order():
    recipe = RTN(w_bits=4, overrides={"blocks.*": {"w_bits": 6}, "blocks.0.*": {"w_bits": 8}})
    assert recipe.for_module("blocks.0.attn.qkv").w_bits == 8
    assert recipe.for_module("blocks.1.attn.qkv").w_bits == 6
    assert recipe.for_module("final_layer.linear").w_bits == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"w_bits": "4"}, r"RTN.w_bits='4' \(str\) must be int"),
        ({"w_bits": 4.5}, r"RTN.w_bits=4.5 \(float\) must be int"),
        ({"w_bits": True}, r"RTN.w_bits=True \(bool\) must be int"),
        ({"group_size": 64.0}, r"RTN.group_size=64.0 \(float\) must be int or None"),
        ({"symmetric": 1}, r"RTN.symmetric=1 \(int\) must be bool"),
        ({"skip": "final_layer*"}, "skip must be a list of module-name patterns"),
        ({"overrides": {"blocks.*": 8}}, r"overrides\['blocks.\*'\] must be a mapping"),
        ({"overrides": {"blocks.*": {"w_bits": "8"}}}, r"RTN.w_bits='8' \(str\) must be int"),
    ],
)
def test_field_types_are_checked_at_construction(kwargs, message):
    with pytest.raises(TypeError, match=message):
        RTN(**kwargs)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"method": "rtn", "w_bit": 4}, "unknown RTN keys \\['w_bit'\\]"),
        ({"method": "gptq"}, "unknown recipe method 'gptq'"),
        ({"method": "rtn", "w_bits": 9}, "w_bits=9"),
        ({"method": "rtn", "w_bits": 1}, "w_bits=1"),
        ({"method": "rtn", "w_bits": "4"}, "RTN.w_bits='4'"),
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
    with pytest.raises(ValueError, match="is a directory"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("r.yaml", "method: rtn\nw_bits: [4\n", r"r.yaml: not valid YAML \(line 3, column 1\)"),
        ("r.json", '{"method": "rtn",\n "w_bits": }', r"r.json: not valid JSON \(line 2, column 12\)"),
        ("r.json", "", r"r.json: not valid JSON \(line 1, column 1\)"),
        ("r.yaml", "- rtn\n", r"r.yaml: a recipe file must hold a mapping, got list"),
        ("r.json", '{"method": "rtn", "w_bits": "4"}', r"r.json: RTN.w_bits='4' \(str\) must be int"),
        ("r.yaml", "method: rtn\nw_bits: 4.5\n", r"r.yaml: RTN.w_bits=4.5"),
        ("r.yaml", "method: rtn\nw_bits: 12\n", r"r.yaml: w_bits=12"),
    ],
)
def test_recipe_file_errors_name_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(tmp_path / name)


def test_binary_recipe_file_names_the_file(tmp_path):
    (tmp_path / "r.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="r.json: a recipe file must be UTF-8 text"):
        load_recipe(tmp_path / "r.json")

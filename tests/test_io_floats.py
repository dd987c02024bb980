"""`ditq.save` stores floats as small as they go without loss by default, and they load back in their own
dtype; the CLI says how the floats were stored."""

import pytest
import torch
from safetensors import safe_open

import ditq
from ditq.cli import main
from ditq.io import float_storage, model_size_bytes
from tests.tiny import make_tiny_bert, make_tiny_dit, make_tiny_mnist_dit


def _stored_dtypes(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}


def _assert_same(model, loaded):
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_float32_values_of_16_bits_are_stored_in_16_bits_and_load_back_bit_identical(tmp_path):
    model = ditq.quantize(make_tiny_dit().half().float(), ditq.load_recipe("w4a8"))  # a 16-bit release, in float32
    path = ditq.save(model, tmp_path / "q.safetensors")
    stored = _stored_dtypes(path)
    assert stored["blocks.0.attn.qkv.bias"] == stored["x_embedder.proj.weight"] == torch.float16
    assert stored["blocks.0.attn.qkv.scales"] == torch.float32  # the format's own buffers as always
    assert model_size_bytes(model) == model_size_bytes(model, torch.float16)  # half of the float32 file's floats
    _assert_same(model, ditq.load(path))
    assert float_storage(model) == "float16 (exact)"


def test_values_beyond_float16_go_to_bfloat16_when_it_holds_them(tmp_path):
    model = make_tiny_dit().bfloat16().float()
    with torch.no_grad():
        model.x_embedder.proj.weight.mul_(2.0**20)  # past float16's range, still bfloat16 values
    path = ditq.save(model, tmp_path / "m.safetensors")
    assert _stored_dtypes(path)["x_embedder.proj.weight"] == torch.bfloat16
    _assert_same(model, ditq.load(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floats_that_16_bits_would_round_or_that_are_16_bits_stay_as_they_are(tmp_path, dtype):
    model = make_tiny_bert().to(dtype)  # a generic model: loaded into the caller's skeleton
    path = ditq.save(model, tmp_path / "m.safetensors")
    assert set(_stored_dtypes(path).values()) == {dtype}
    _assert_same(model, ditq.load(path, model=make_tiny_bert(seed=1).to(dtype)))
    assert float_storage(model) == f"{str(dtype)[6:]} (as in memory)"
    if dtype == torch.float32:
        assert float_storage(model, torch.float16) == "float16 (rounded from float32)"


def test_cli_quantize_says_how_the_floats_are_stored(tmp_path, capsys):
    fp = ditq.save(make_tiny_mnist_dit().half().float(), tmp_path / "fp.safetensors")
    assert main(["quantize", "--model", str(fp), "--recipe", "w8a8", "--out", str(tmp_path / "q.safetensors"),
                 "--calib-samples", "1", "--calib-steps", "2", "--device", "cpu"]) == 0
    assert "floats stored as float16 (exact)" in capsys.readouterr().out

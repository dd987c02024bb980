import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ditq
from ditq.io import CheckpointError, read_header
from ditq.recipes import RTN
from tests.tiny import make_tiny_dit

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([5, 500, 999])
Y = torch.tensor([1, 2, 10])  # 10 = the null class


def outputs(model):
    with torch.no_grad():
        return model(X, T, Y)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    w_bits=st.integers(2, 8),
    group_size=st.sampled_from([None, 32, 64, 128]),
    symmetric=st.booleans(),
    a_bits=st.sampled_from([None, 4, 8]),
    hidden=st.sampled_from([64, 128]),
)
def test_save_load_is_bit_identical(tmp_path_factory, w_bits, group_size, symmetric, a_bits, hidden):
    if group_size is not None and hidden % group_size:
        group_size = None
    model = make_tiny_dit(hidden_size=hidden)
    ditq.quantize(model, RTN(w_bits=w_bits, group_size=group_size, symmetric=symmetric, a_bits=a_bits))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    ditq.save(model, path)
    loaded = ditq.load(path)
    assert torch.equal(outputs(model), outputs(loaded))
    assert loaded.ditq_recipe == model.ditq_recipe
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_full_precision_models_round_trip_too(tmp_path):
    model = make_tiny_dit()
    ditq.save(model, tmp_path / "fp.safetensors")
    assert torch.equal(outputs(model), outputs(ditq.load(tmp_path / "fp.safetensors")))


def test_header_records_format_model_and_specs(tmp_path):
    model = ditq.quantize(make_tiny_dit(), RTN(w_bits=4, group_size=64))
    header = read_header(ditq.save(model, tmp_path / "q.safetensors"))
    assert header["format"] == "ditq" and header["format_version"] == 1
    assert header["model"]["arch"] == "dit"
    assert header["modules"]["blocks.0.attn.qkv"]["spec"]["group_size"] == 64


def test_save_is_atomic(tmp_path, monkeypatch):
    model = make_tiny_dit()
    target = tmp_path / "m.safetensors"
    ditq.save(model, target)
    before = target.read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("ditq.io.save_file", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        ditq.save(make_tiny_dit(hidden_size=64), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.fixture
def saved(tmp_path):
    model = ditq.quantize(make_tiny_dit(), RTN(w_bits=4, group_size=64))
    return ditq.save(model, tmp_path / "q.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ditq.load(tmp_path / "none.safetensors")


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(saved.name)):
        ditq.load(saved)


def test_corrupted_tensor_bytes(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        ditq.load(saved)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="without a ditq header"):
        ditq.load(path)


def test_not_safetensors_at_all(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ditq.load(path)


def _rewrite_header(path, change):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])
    header = json.loads(meta["__metadata__"]["ditq"])
    change(header)
    meta["__metadata__"]["ditq"] = json.dumps(header)
    raw = json.dumps(meta).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_newer_format_version(saved):
    _rewrite_header(saved, lambda h: h.update(format_version=99))
    with pytest.raises(CheckpointError, match="format v99.*upgrade ditq"):
        ditq.load(saved)


def test_header_naming_a_module_the_model_lacks(saved):
    _rewrite_header(saved, lambda h: h["modules"].update({"blocks.7.attn.qkv": h["modules"]["blocks.0.attn.qkv"]}))
    with pytest.raises(CheckpointError, match="blocks.7.attn.qkv"):
        ditq.load(saved)


def test_saving_a_model_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="only ditq zoo models"):
        ditq.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = ditq.save(make_tiny_dit(), tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644

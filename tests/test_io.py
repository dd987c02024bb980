import hashlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ditq
from ditq.fileformat import tensors_digest
from ditq.io import CheckpointError, model_size_bytes, read_header
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
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
    assert header["format"] == "ditq" and header["format_version"] == 2 and header["kind"] == "checkpoint"
    assert header["model"]["arch"] == "dit"
    assert header["modules"]["blocks.0.attn.qkv"]["spec"]["group_size"] == 64


def test_save_is_atomic(tmp_path, monkeypatch):
    model = make_tiny_dit()
    target = tmp_path / "m.safetensors"
    ditq.save(model, target)
    before = target.read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("ditq.fileformat.save_file", explode)
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


def _rewrite_header(path, change, *, resign=True):
    """Edit the JSON header in place; `resign` also recomputes its SHA-256 (a deliberate, valid-looking edit)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])
    header = json.loads(meta["__metadata__"]["ditq"])
    change(header)
    text = json.dumps(header, sort_keys=True)
    meta["__metadata__"]["ditq"] = text
    if resign:
        meta["__metadata__"]["ditq_header_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    raw = json.dumps(meta).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _set_spec(field, value):
    return lambda h: h["modules"]["blocks.0.attn.qkv"]["spec"].update({field: value})


def test_an_edited_header_is_refused(saved):
    _rewrite_header(saved, _set_spec("w_bits", 3), resign=False)  # same length, loads silently in v1
    with pytest.raises(CheckpointError, match="header was changed after it was written"):
        ditq.load(saved)


def test_newer_format_version(saved):
    _rewrite_header(saved, lambda h: h.update(format_version=99))
    with pytest.raises(CheckpointError, match="format v99.*upgrade ditq"):
        ditq.load(saved)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set_spec("w_bits", 9), r"modules.*blocks\.0\.attn\.qkv.*w_bits=9"),
        (_set_spec("w_bits", "4"), r"blocks\.0\.attn\.qkv.*w_bits='4'"),
        (_set_spec("colour", "red"), r"blocks\.0\.attn\.qkv.*unknown QuantSpec keys \['colour'\]"),
        (lambda h: h["modules"]["blocks.0.attn.qkv"].pop("bias"), r"blocks\.0\.attn\.qkv.*'bias'"),
        (lambda h: h["modules"]["blocks.0.attn.qkv"].update(kind="mystery"), r"kind='mystery'"),
        (lambda h: h["modules"].update({"blocks.7.attn.qkv": h["modules"]["blocks.0.attn.qkv"]}),
         r"'blocks\.7\.attn\.qkv' does not exist"),
        (lambda h: h.pop("model"), r"lacks 'model'"),
        (lambda h: h["model"].update(arch="unet"), r"'model'.*unknown architecture 'unet'"),
        (lambda h: h["model"]["config"].update(depth="two"), r"'model' cannot be built"),
        (lambda h: h.update(input_groups=[]), r"'input_groups' must be dict"),
        (lambda h: h.update(kind="calibration"), r"a ditq calibration file, not a checkpoint file"),
    ],
    ids=["bits", "bits_str", "unknown_key", "no_bias", "kind", "missing_module", "no_model", "arch", "config",
         "groups", "wrong_kind"],
)
def test_every_header_problem_names_the_file_and_the_field(saved, change, message):
    _rewrite_header(saved, change)
    with pytest.raises(CheckpointError, match=message) as err:
        ditq.load(saved)
    assert str(err.value).startswith(str(saved))


def test_a_directory_or_a_bad_device_is_named_as_such(saved, tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        ditq.load(tmp_path)
    with pytest.raises(ValueError, match="device='foo' is not a torch device"):
        ditq.load(saved, device="foo")


class Block(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.out = torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):  # (N, T, D)
        q, k, v = self.q(x), self.k(x), self.v(x)
        x = x + self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _generic_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(), Block()).eval()


def test_a_non_zoo_module_round_trips_through_a_user_skeleton(tmp_path):
    model = ditq.quantize(_generic_model(), RTN(w_bits=4, group_size=16, a_bits=8))
    path = ditq.save(model, tmp_path / "g.safetensors")
    assert read_header(path)["model"] == {"arch": "generic", "config": None}
    with pytest.raises(CheckpointError, match="pass it as load"):
        ditq.load(path)
    loaded = ditq.load(path, model=_generic_model())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_failed_load_into_a_user_skeleton_leaves_it_untouched(tmp_path):
    model = ditq.quantize(_generic_model(), RTN(w_bits=4, group_size=16))
    path = ditq.save(model, tmp_path / "g.safetensors")
    wrong = torch.nn.Sequential(Block(), Block(), Block()).eval()  # one block too many: tensors missing
    before = [type(m) for m in wrong.modules()]
    with pytest.raises(CheckpointError, match="missing"):
        ditq.load(path, model=wrong)
    assert [type(m) for m in wrong.modules()] == before


def test_input_group_tensors_are_stored_once_and_shared_after_load(tmp_path):
    model = _generic_model()
    spec = QuantSpec(w_bits=4, group_size=16, a_bits=8, smooth=True, rank=4, input_group="b0.qkv")
    smooth, down = torch.rand(32) + 0.5, torch.randn(32, 4) * 0.1
    for name in ("q", "k", "v"):
        linear = getattr(model[0], name)
        setattr(model[0], name, QuantLinear.from_linear(linear, spec, smooth=smooth, lowrank_down=down,
                                                         lowrank_up=torch.randn(4, 32) * 0.1))
    path = ditq.save(model, tmp_path / "grouped.safetensors")
    keys = set(safe_open(str(path), "pt").keys())
    assert {"input_groups.b0.qkv.smooth", "input_groups.b0.qkv.lowrank_down"} <= keys
    assert not {"0.q.smooth", "0.k.lowrank_down"} & keys
    loaded = ditq.load(path, model=_generic_model())
    assert loaded[0].q.smooth is loaded[0].k.smooth is loaded[0].v.smooth
    moved = ditq.load(path, device="meta", model=_generic_model())  # `.to(device)` copies tensors one by one
    assert moved[0].q.lowrank_down is moved[0].v.lowrank_down and moved[0].q.smooth.is_meta
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    model[0].k.smooth.mul_(2)
    with pytest.raises(ValueError, match="input group 'b0.qkv'.*one equal 'smooth'"):
        ditq.save(model, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_model_the_format_cannot_store_leaves_the_old_file(tmp_path):
    target = ditq.save(_generic_model(), tmp_path / "m.safetensors")
    before = target.read_bytes()
    odd = _generic_model()
    odd.register_buffer("phase", torch.zeros(3, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"cannot store: \['phase \(torch.complex128\)'\]"):
        ditq.save(odd, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_floats_are_stored_in_the_dtype_asked_for_and_sizes_are_bytes_on_disk(tmp_path):
    model = ditq.quantize(make_tiny_dit(), RTN(w_bits=4, group_size=64))
    path = ditq.save(model, tmp_path / "q16.safetensors", float_dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("x_embedder.proj.weight").dtype == torch.float16
        assert f.get_tensor("blocks.0.attn.qkv.scales").dtype == torch.float32  # part of the format
        header_bytes = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == header_bytes + model_size_bytes(model, torch.float16)


def test_a_version_1_checkpoint_with_a_low_rank_branch_still_loads(tmp_path):
    """ditq 0.1 wrote no kind, no header hash and named the low-rank factors lora_*."""
    model = make_tiny_dit()
    spec = QuantSpec(w_bits=4, group_size=64, rank=2)
    linear = model.blocks[0].mlp.fc1
    model.blocks[0].mlp.fc1 = QuantLinear.from_linear(linear, spec, lowrank_down=torch.randn(128, 2) * 0.1,
                                                      lowrank_up=torch.randn(2, 512) * 0.1)
    tensors = {k.replace("lowrank_", "lora_"): v.contiguous() for k, v in model.state_dict().items()}
    entry = {"spec": {k: v for k, v in spec.to_dict().items() if k not in ("input_group", "stored_bits", "layout")},
             "bias": True}
    header = {"format": "ditq", "format_version": 1, "ditq_version": "0.1.0",
              "model": {"arch": "dit", "config": model.config}, "modules": {"blocks.0.mlp.fc1": entry},
              "recipe": None, "sha256": tensors_digest(tensors), "info": {}}
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"ditq": json.dumps(header)})
    assert torch.equal(outputs(ditq.load(path)), outputs(model))


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = ditq.save(make_tiny_dit(), tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_tensor_that_does_not_load_leaves_the_callers_model_as_it_came(tmp_path):
    model = ditq.quantize(_generic_model(), RTN(w_bits=4, group_size=16))
    path = ditq.save(model, tmp_path / "g.safetensors")
    wrong_dtype = {k: (v.to(torch.int8) if k == "1.fc2.qweight" else v) for k, v in load_file(str(path)).items()}
    header = json.loads(safe_open(str(path), "pt").metadata()["ditq"])
    header["sha256"] = tensors_digest(wrong_dtype)
    bad = tmp_path / "bad.safetensors"
    text = json.dumps(header, sort_keys=True)
    save_file(wrong_dtype, str(bad), metadata={"ditq": text, "ditq_header_sha256": hashlib.sha256(text.encode()).hexdigest()})
    skeleton = _generic_model()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: the tensors do not load.*1\.fc2\.qweight.*uint8"):
        ditq.load(bad, model=skeleton)
    after = skeleton.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_v1_label_on_a_v2_file_does_not_bypass_the_header_hash(saved):
    def relabel(h):
        h.update(format_version=1)
        h.pop("kind")
        h["modules"]["blocks.0.attn.qkv"]["spec"]["w_bits"] = 3

    _rewrite_header(saved, relabel, resign=False)
    with pytest.raises(CheckpointError, match="fields of format v2 in a v1 file"):
        ditq.load(saved)


def test_tied_weights_are_refused_with_the_file_and_tensor_names(tmp_path):
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"t\.safetensors: tensors '0\.weight' and '1\.weight' share memory"):
        ditq.save(tied, tmp_path / "t.safetensors")
    assert not list(tmp_path.iterdir())

import pytest
import torch
from torch import nn

import ditq
from ditq.calib import CalibData
from ditq.diffusion.samplers import create_diffusion
from ditq.fileformat import CheckpointError
from tests.tiny import make_tiny_dit


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def steps_of_constant_inputs(n_steps, rows=5):
    """A run that calls the model once per step with every input value equal to the step number."""
    return lambda model: [model(torch.full((rows, 4), float(step))) for step in range(n_steps)]


def test_rows_per_layer_bounds_every_layer():
    calib = ditq.calibrate(make_tiny_dit(), n_samples=4, steps=3, rows_per_layer=16)
    assert len(calib.inputs) == 14
    for name, rows in calib.inputs.items():
        assert rows.shape[0] <= 16 and calib.input_steps[name].shape == rows.shape[:1], name
    # attention sees 3 steps × 8 (CFG-doubled) samples × 16 tokens = 384 rows: the bound is what holds
    assert calib.inputs["blocks.0.attn.qkv"].shape == (16, 128)
    # the time MLP sees one row per (CFG-doubled) sample per step: 24 rows, of which 16 are kept
    assert calib.inputs["t_embedder.mlp.0"].shape == (16, 256)


def test_zoo_calibration_is_tagged_with_the_sampler_timesteps():
    steps = 3
    calib = ditq.calibrate(make_tiny_dit(), n_samples=2, steps=steps, rows_per_layer=4096)
    expected = tuple(int(t) for t in create_diffusion(f"ddim{steps}").timestep_map.flip(0))
    assert calib.steps == steps and calib.timesteps == expected
    qkv_steps = calib.input_steps["blocks.0.attn.qkv"]
    assert torch.equal(torch.bincount(qkv_steps), torch.full((steps,), 4 * 16))  # everything kept, 64 per step
    step_absmax = calib.step_absmax["blocks.0.attn.qkv"]
    assert step_absmax.shape == (steps, 128)
    assert torch.equal(calib.absmax["blocks.0.attn.qkv"], step_absmax.amax(0))
    for s in range(steps):
        rows = calib.inputs["blocks.0.attn.qkv"][qkv_steps == s]
        assert torch.equal(rows.abs().amax(0), step_absmax[s])  # all rows kept, so the stats agree


def test_rows_and_statistics_know_their_step():
    calib = ditq.calibrate(TwoLayers(), run=steps_of_constant_inputs(4), rows_per_layer=7)
    rows, steps = calib.inputs["first"], calib.input_steps["first"]
    assert rows.shape == (7, 4) and calib.steps == 4
    assert torch.equal(rows, steps[:, None].float().expand(-1, 4))
    assert torch.equal(calib.step_absmax["first"], torch.arange(4.0)[:, None].expand(-1, 4))


def test_calibration_is_deterministic_per_seed():
    a = ditq.calibrate(make_tiny_dit(), n_samples=2, steps=2, rows_per_layer=8, seed=1)
    b = ditq.calibrate(make_tiny_dit(), n_samples=2, steps=2, rows_per_layer=8, seed=1)
    c = ditq.calibrate(make_tiny_dit(), n_samples=2, steps=2, rows_per_layer=8, seed=2)
    assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    assert not torch.equal(a.inputs["blocks.0.mlp.fc1"], c.inputs["blocks.0.mlp.fc1"])


def test_nan_activations_are_refused_naming_the_layer():
    model = make_tiny_dit()
    with torch.no_grad():
        model.get_submodule("blocks.1.attn.qkv").weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="input of layer 'blocks.1.attn.proj' holds NaN or infinite values at step 0"):
        ditq.calibrate(model, n_samples=2, steps=2)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed on the way out


def test_infinite_user_inputs_are_refused_naming_the_layer():
    run = lambda model: [model(torch.ones(2, 4)), model(torch.full((2, 4), float("inf")))]  # noqa: E731
    with pytest.raises(ValueError, match="input of layer 'first' holds NaN or infinite values at step 1"):
        ditq.calibrate(TwoLayers(), run=run)


def test_statistics_only():
    calib = ditq.calibrate(TwoLayers(), run=steps_of_constant_inputs(2), rows_per_layer=0)
    assert calib.inputs == {} and set(calib.absmax) == {"first", "second"}
    with pytest.raises(ValueError, match="keeps no input rows for module 'first'"):
        calib.require("first", rows=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_samples": 0}, "must be positive"),
    ({"rows_per_layer": -1}, "rows_per_layer must be an int >= 0"),
])  # fmt: skip
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ditq.calibrate(make_tiny_dit(), **kwargs)


def test_save_load_round_trip(tmp_path):
    calib = ditq.calibrate(make_tiny_dit(), n_samples=2, steps=2, rows_per_layer=8)
    loaded = CalibData.load(calib.save(tmp_path / "calib.safetensors"))
    assert (loaded.n_samples, loaded.steps, loaded.timesteps) == (2, 2, calib.timesteps)
    for kind in ("absmax", "step_absmax", "inputs", "input_steps"):
        ours, theirs = getattr(calib, kind), getattr(loaded, kind)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), kind


def test_a_calibration_file_with_nan_is_refused_naming_the_layer(tmp_path):
    calib = ditq.calibrate(TwoLayers(), run=steps_of_constant_inputs(2), rows_per_layer=4)
    calib.inputs["second"][1, 3] = float("nan")
    path = calib.save(tmp_path / "calib.safetensors")
    with pytest.raises(ValueError, match=r"calib.safetensors: inputs of layer 'second' holds NaN"):
        CalibData.load(path)


def test_missing_or_foreign_calibration_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        CalibData.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        CalibData.load(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        CalibData.load(tmp_path / "junk.safetensors")
    model = ditq.models.create("DiT-S/2", depth=1, hidden_size=64, num_heads=2, input_size=4, num_classes=2)
    ditq.save(model, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: a ditq checkpoint file, not a calibration file"):
        CalibData.load(tmp_path / "model.safetensors")


def test_require_names_the_module():
    with pytest.raises(ValueError, match="no entry for module 'blocks.9.attn.qkv'"):
        CalibData().require("blocks.9.attn.qkv")


def test_a_linear_called_with_a_keyword_input_is_captured():
    class KeywordCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.a(input=x)

    model = KeywordCall()
    data = ditq.calibrate(model, run=lambda m: m(torch.randn(4, 8)), rows_per_layer=3)
    assert data.inputs["a"].shape == (3, 8)


def test_require_scans_a_layers_data_once_and_a_replaced_tensor_again(monkeypatch):
    rows = torch.ones(8, 4)
    calib = CalibData(absmax={"a": torch.ones(4)}, step_absmax={"a": torch.ones(2, 4)}, inputs={"a": rows},
                      input_steps={"a": torch.zeros(8, dtype=torch.int64)})
    scanned = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: scanned.append(t) or isfinite(t))
    calib.require("a", rows=True)
    calib.require("a", rows=True)
    assert len(scanned) == 3  # absmax, step_absmax and the rows, each once
    calib.inputs["a"] = torch.full_like(rows, float("nan"))
    with pytest.raises(ValueError, match="inputs of layer 'a' holds NaN"):
        calib.require("a", rows=True)


def test_adaln_linears_share_one_copy_of_their_identical_rows_and_quantize_bit_for_bit(tmp_path):
    """Every adaLN Linear reads SiLU(c); with fewer rows than `rows_per_layer` each keeps all of them, the same."""
    from ditq.methods.svdquant import SVDQuant

    model = make_tiny_dit()
    calib = ditq.calibrate(model, n_samples=2, steps=2)
    adaln = [n for n in calib.inputs if "adaLN_modulation" in n]
    assert len(adaln) == len(model.blocks) + 1
    assert all(calib.inputs[n] is calib.inputs[adaln[0]] for n in adaln)
    assert all(calib.input_steps[n] is calib.input_steps[adaln[0]] for n in adaln)
    assert calib.inputs["blocks.0.attn.qkv"] is not calib.inputs["blocks.1.attn.qkv"]  # other inputs, own rows
    loaded = CalibData.load(calib.save(tmp_path / "calib.safetensors"))
    assert all(loaded.inputs[n] is loaded.inputs[adaln[0]] for n in adaln)
    copies = CalibData(absmax=calib.absmax, step_absmax=calib.step_absmax,
                       inputs={n: rows.clone() for n, rows in calib.inputs.items()},
                       input_steps={n: steps.clone() for n, steps in calib.input_steps.items()},
                       timesteps=calib.timesteps, n_samples=calib.n_samples, steps=calib.steps)
    recipe = SVDQuant(quantize_modulation=True, a_bits=8, a_format="fp8", alphas=(0.5,), gptq=True)
    shared, own = (ditq.quantize(make_tiny_dit(), recipe, calib=c).state_dict() for c in (calib, copies))
    assert shared.keys() == own.keys() and all(torch.equal(shared[k], own[k]) for k in shared)

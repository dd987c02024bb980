"""A catalogue of bad inputs, tried as a new user would, against the API and the CLI.

For each: the exception type (CLI: exit code 2 and one line, no traceback), a message that names the file,
layer or field at fault, and a working folder left exactly as it was (nothing created, nothing changed).
"""

import hashlib
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ditq
import ditq.fileformat
from ditq.atomic import write_json
from ditq.calib import CalibData
from ditq.cli import main
from ditq.eval.runner import SampleSettings
from ditq.models import create
from ditq.quant.modules import is_quantized
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import RTN, load_recipe, recipe_from_dict
from tests.tiny import make_tiny_dit, make_tiny_mnist_dit

QUANT_RECIPE = RTN(w_bits=4, group_size=64, a_bits=8)  # dynamic activations: no calibration needed

RECIPE_FILES = {
    "bad.json": "{ not json",
    "empty.json": "",
    "bad.yaml": "w_bits: [4\n",
    "str_bits.json": '{"method": "rtn", "w_bits": "4"}',
    "list.json": "[4, 8]",
    "unknown_key.json": '{"method": "rtn", "w_bit": 4}',
    "no_method.json": '{"w_bits": 4}',
    "group48.json": '{"method": "rtn", "w_bits": 4, "group_size": 48, "a_bits": null}',
    "nomatch.json": '{"method": "rtn", "w_bits": 8, "overrides": {"blocks.9.*": {"w_bits": 4}}}',
}


# ---- the files every case starts from ---------------------------------------------------------------


def _edit_header(src: Path, dst: Path, key: str, old: str, new: str) -> None:
    """Change `"key": old` to `"key": new` in a checkpoint's JSON header, keeping its length (a hand edit)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    pattern = re.compile(rb'(\\"' + key.encode() + rb'\\": ?)' + old.encode() + rb"\b")
    header, count = pattern.subn(lambda m: m.group(1) + new.encode(), data[8 : 8 + n], count=1)
    assert count == 1 and len(new) == len(old)
    dst.write_bytes(data[:8] + header + data[8 + n :])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sources")
    ditq.save(make_tiny_mnist_dit(), d / "fp.safetensors")
    ditq.save(ditq.quantize(make_tiny_mnist_dit(), QUANT_RECIPE), d / "q.safetensors")
    q = (d / "q.safetensors").read_bytes()
    _edit_header(d / "q.safetensors", d / "q_w3.safetensors", "w_bits", "4", "3")
    _edit_header(d / "q.safetensors", d / "q_a4.safetensors", "a_bits", "8", "4")
    (d / "truncated.safetensors").write_bytes(q[: len(q) // 2])
    (d / "corrupted.safetensors").write_bytes(q[:-1] + bytes([q[-1] ^ 0xFF]))
    save_file({"weight": torch.zeros(2, 2)}, str(d / "foreign.safetensors"))
    (d / "text.safetensors").write_text("not a checkpoint\n")
    with pytest.MonkeyPatch.context() as mp:  # a file from a future ditq, written the way it would write it
        mp.setattr(ditq.fileformat, "FORMAT_VERSION", ditq.fileformat.FORMAT_VERSION + 1)
        ditq.save(make_tiny_mnist_dit(), d / "newer.safetensors")
    calib = ditq.calibrate(make_tiny_mnist_dit(), n_samples=2, steps=2)
    calib.absmax[next(iter(calib.absmax))][0] = float("nan")
    calib.save(d / "nan_calib.safetensors")
    for name, text in RECIPE_FILES.items():
        (d / name).write_text(text)
    ditq.save(make_tiny_dit(in_channels=4), d / "latent.safetensors")  # a latent DiT: 4×8×8 samples
    (d / "taken" / "report.json").mkdir(parents=True)  # an output folder where a report would go is a folder
    return d


@dataclass
class Work:
    dir: Path

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    def model(self) -> nn.Module:
        return make_tiny_mnist_dit()


@pytest.fixture
def work(sources, tmp_path) -> Work:
    shutil.copytree(sources, tmp_path, dirs_exist_ok=True)
    return Work(tmp_path)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (hidden temporaries included) → hash of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


# ---- API: (exception type, what the message must name, the call) ----------------------------------------

API_CASES: list = []


def api_case(exc: type | tuple[type, ...], *names: str) -> Callable:
    """Register a case; `names` are regular expressions, `{d}` standing for the working folder."""

    def register(fn: Callable[[Work], object]) -> Callable:
        API_CASES.append(pytest.param(fn, exc, names, id=fn.__name__))
        return fn

    return register


@api_case(FileNotFoundError, "{d}/missing.safetensors")
def load_missing_file(w):
    ditq.load(w / "missing.safetensors")


@api_case(ditq.CheckpointError, "{d}", "directory")
def load_a_directory(w):
    ditq.load(w.dir)


@api_case(ditq.CheckpointError, "{d}/truncated.safetensors")
def load_truncated(w):
    ditq.load(w / "truncated.safetensors")


@api_case(ditq.CheckpointError, "{d}/corrupted.safetensors", "SHA-256")
def load_flipped_tensor_byte(w):
    ditq.load(w / "corrupted.safetensors")


@api_case(ditq.CheckpointError, "{d}/foreign.safetensors")
def load_foreign_safetensors(w):
    ditq.load(w / "foreign.safetensors")


@api_case(ditq.CheckpointError, "{d}/text.safetensors")
def load_text_file(w):
    ditq.load(w / "text.safetensors")


@api_case(ditq.CheckpointError, "{d}/q_w3.safetensors", "header")
def load_header_edited_w_bits_4_to_3(w):
    ditq.load(w / "q_w3.safetensors")


@api_case(ditq.CheckpointError, "{d}/q_a4.safetensors", "header")
def load_header_edited_a_bits_8_to_4(w):
    ditq.load(w / "q_a4.safetensors")


@api_case(ditq.CheckpointError, "{d}/newer.safetensors", "upgrade")
def load_newer_format(w):
    ditq.load(w / "newer.safetensors")


@api_case(ValueError, "foo")
def load_unknown_device(w):
    ditq.load(w / "q.safetensors", device="foo")


@api_case(ValueError, "cuda:99")
def load_missing_cuda_device(w):
    ditq.load(w / "q.safetensors", device="cuda:99")


@api_case(ValueError, "{d}/fp.safetensors")
def save_info_that_is_not_json_keeps_the_old_file(w):
    ditq.save(w.model(), w / "fp.safetensors", info={"step": object()})


@api_case((ValueError, TypeError), "{d}/fp.safetensors", "extra")
def save_a_model_load_would_refuse_keeps_the_old_file(w):
    model = w.model()
    model.register_buffer("extra", torch.zeros(3))  # not part of the architecture the header rebuilds
    ditq.save(model, w / "fp.safetensors")


@api_case(IsADirectoryError, "{d}")
def save_to_a_directory(w):
    ditq.save(w.model(), w.dir)


@api_case(OSError, "fp.safetensors")
def save_under_a_file(w):
    ditq.save(w.model(), w / "fp.safetensors" / "x.safetensors")


@api_case(ValueError, "float_dtype")
def save_with_an_integer_float_dtype(w):
    ditq.save(w.model(), w / "x.safetensors", float_dtype=torch.int8)


@api_case(TypeError, "recipe")
def quantize_with_a_preset_name(w):
    ditq.quantize(w.model(), "w4a8")


@api_case(ValueError, "already quantized")
def quantize_twice(w):
    ditq.quantize(ditq.load(w / "q.safetensors"), QUANT_RECIPE)


@api_case(ValueError, "blocks.9.mlp")
def quantize_skip_pattern_matching_nothing(w):
    ditq.quantize(w.model(), RTN(skip=("blocks.9.mlp*",)))


@api_case(ValueError, r"blocks\.9\.\*")
def quantize_override_pattern_matching_nothing(w):
    ditq.quantize(w.model(), RTN(overrides={"blocks.9.*": {"w_bits": 4}}))


def _unchanged_after(model: nn.Module, call: Callable[[], object]) -> None:
    """Run `call`, which must fail; the model must come out with no quantized module (transactional)."""
    try:
        call()
    finally:
        assert not is_quantized(model), "a failed quantize left the model half-quantized"


@api_case(ValueError, r"blocks\.1\.mlp\.fc2", "group_size")
def quantize_override_group_not_dividing_one_layer_changes_nothing(w):
    model = w.model()  # fc2 reads 512 channels: 96 does not divide them; every other layer would quantize
    _unchanged_after(model, lambda: ditq.quantize(model, RTN(w_bits=4, overrides={"blocks.1.mlp.fc2": {"group_size": 96}})))


@api_case(ValueError, r"blocks\.0\.attn\.qkv", "group_size")
def quantize_group_not_dividing_any_layer(w):
    model = w.model()
    _unchanged_after(model, lambda: ditq.quantize(model, RTN(w_bits=4, group_size=48, a_bits=None)))


@api_case((ValueError, KeyError), r"blocks\.1\.")
def quantize_static_with_calibration_missing_a_layer_changes_nothing(w):
    shallow = create("DiT-MNIST", depth=1, hidden_size=128, num_heads=2)  # has no blocks.1
    calib = ditq.calibrate(shallow, n_samples=2, steps=2)
    model = w.model()
    _unchanged_after(model, lambda: ditq.quantize(model, RTN(a_bits=8, a_dynamic=False), calib=calib))


@api_case(ValueError, r"blocks\.0\.attn\.qkv")
def quantize_nan_weight_names_the_layer(w):
    model = w.model()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[3, 5] = float("nan")
    _unchanged_after(model, lambda: ditq.quantize(model, RTN(w_bits=4, group_size=64)))


@api_case(ValueError, r"blocks\.1\.mlp\.fc1")
def quantize_inf_weight_names_the_layer(w):
    model = w.model()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("inf")
    _unchanged_after(model, lambda: ditq.quantize(model, RTN(w_bits=8)))


@api_case(ValueError, r"blocks\.\d\.\w+\.\w+")
def quantize_with_nan_calibration_statistics(w):
    model = w.model()
    calib = ditq.calibrate(model, n_samples=2, steps=2)
    for stats in calib.absmax.values():
        stats[0] = float("nan")
    _unchanged_after(model, lambda: ditq.quantize(model, RTN(a_bits=8, a_dynamic=False), calib=calib))


@api_case(ValueError, r"blocks\.\d\.\w+\.\w+")
def calibrate_nan_activations_names_a_layer(w):
    model = w.model()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[0, 0] = float("nan")  # everything after it sees NaN
    ditq.calibrate(model, n_samples=2, steps=2)


@api_case(ValueError, "{d}/nan_calib.safetensors", r"blocks\.|NaN")
def calibration_file_with_nan(w):
    CalibData.load(w / "nan_calib.safetensors")


@api_case(ValueError, "n_samples")
def calibrate_zero_samples(w):
    ditq.calibrate(w.model(), n_samples=0, steps=2)


@api_case(ValueError, "steps")
def calibrate_negative_steps(w):
    ditq.calibrate(w.model(), n_samples=2, steps=-1)


@api_case(ValueError, "run")
def calibrate_a_plain_module_without_run(w):
    ditq.calibrate(nn.Sequential(nn.Linear(4, 4)), n_samples=2, steps=2)


@api_case(ValueError, "w_bits")
def spec_fractional_bits(w):
    QuantSpec(w_bits=4.5)


@api_case(ValueError, "w_bits")
def spec_bits_as_a_string(w):
    QuantSpec(w_bits="4")


@api_case(ValueError, "w_bits")
def spec_bits_as_a_bool(w):
    QuantSpec(w_bits=True)


@api_case(ValueError, "w_bits")
def spec_nine_bits(w):
    QuantSpec(w_bits=9)


@api_case(ValueError, "group_size")
def spec_zero_group(w):
    QuantSpec(w_bits=4, group_size=0)


@api_case(ValueError, "a_format")
def spec_unknown_activation_format(w):
    QuantSpec(a_bits=4, a_format="fp4")


@api_case(ValueError, "ternary|w_bits")
def spec_ternary_with_four_bits(w):
    QuantSpec(w_format="ternary", w_bits=4)


@api_case(ValueError, "bogus")
def spec_from_dict_unknown_key(w):
    QuantSpec.from_dict({"w_bits": 4, "bogus": 1})


@api_case((TypeError, ValueError), "w_bits")
def recipe_fractional_bits_refused_at_construction(w):
    RTN(w_bits=4.5)


@api_case((TypeError, ValueError), "w_bits")
def recipe_bits_as_a_string(w):
    RTN(w_bits="4")


@api_case(ValueError, "group_size")
def recipe_zero_group(w):
    RTN(group_size=0)


@api_case(TypeError, "skip")
def recipe_skip_as_a_string(w):
    RTN(skip="x_embedder*")


@api_case((TypeError, ValueError), "w_bits")
def recipe_override_with_fractional_bits(w):
    RTN(overrides={"blocks.*": {"w_bits": 3.5}})


@api_case(ValueError, "bits")
def recipe_override_unknown_field(w):
    RTN(overrides={"blocks.*": {"bits": 3}})


@api_case(ValueError, "nope")
def recipe_unknown_method(w):
    recipe_from_dict({"method": "nope"})


@api_case(ValueError, "w_bit")
def recipe_unknown_key(w):
    recipe_from_dict({"method": "rtn", "w_bit": 4})


@api_case(ValueError, "{d}/bad.json")
def recipe_file_malformed_json(w):
    load_recipe(w / "bad.json")


@api_case(ValueError, "{d}/empty.json")
def recipe_file_empty(w):
    load_recipe(w / "empty.json")


@api_case(ValueError, "{d}/bad.yaml")
def recipe_file_malformed_yaml(w):
    load_recipe(w / "bad.yaml")


@api_case(ValueError, "{d}/str_bits.json", "w_bits")
def recipe_file_bits_as_a_string(w):
    load_recipe(w / "str_bits.json")


@api_case(ValueError, "{d}/list.json")
def recipe_file_holding_a_list(w):
    load_recipe(w / "list.json")


@api_case(ValueError, "{d}/no_method.json|method")
def recipe_file_without_method(w):
    load_recipe(w / "no_method.json")


@api_case(FileNotFoundError, "{d}/nope.json")
def recipe_file_missing(w):
    load_recipe(w / "nope.json")


@api_case(ValueError, "{d}/report.json", r"rows\[1\]\.psnr=nan")
def write_json_with_nan_writes_nothing(w):
    write_json(w / "report.json", {"rows": [{"psnr": 30.0}, {"psnr": float("nan")}]})


@api_case(ValueError, "group_size")
def quantlinear_group_not_dividing(w):
    QuantLinear.from_linear(nn.Linear(100, 8), QuantSpec(w_bits=4, group_size=64))


@api_case(ValueError, "non-finite|NaN")
def quantlinear_nan_weight(w):
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[1, 2] = float("nan")
    QuantLinear.from_linear(linear, QuantSpec(w_bits=4))


@api_case(ValueError, "in_features")
def quantlinear_zero_dim_input(w):
    QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(w_bits=8))(torch.tensor(1.0))


@api_case(ValueError, "in_features=64")
def quantlinear_wrong_width_input(w):
    QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(w_bits=8))(torch.zeros(2, 63))


@api_case(TypeError, "QuantLinear", "int32")
def quantlinear_integer_input(w):
    QuantLinear.from_linear(nn.Linear(64, 8), QuantSpec(w_bits=8))(torch.ones(2, 64, dtype=torch.int32))


@api_case(TypeError, r"'blocks\.0\.attn\.qkv'", "int64")
def quantized_layer_called_with_integers_names_the_layer(w):
    ditq.quantize(w.model(), QUANT_RECIPE).blocks[0].attn.qkv(torch.ones(2, 128, dtype=torch.int64))


@api_case(TypeError, r"'blocks\.1\.mlp\.fc1'", "bool")
def loaded_layer_called_with_booleans_names_the_layer(w):
    ditq.load(w / "q.safetensors").blocks[1].mlp.fc1(torch.ones(2, 128, dtype=torch.bool))


def _generic_calibrated() -> tuple[nn.Module, CalibData]:
    """A plain module (the generic adapter) and its calibration on 16 random rows."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 64), act=nn.GELU(), fc2=nn.Linear(64, 32)))
    return model, ditq.calibrate(model, run=lambda m: m(torch.randn(16, 64)))


@api_case(ValueError, "'fc2'", "NaN")
def svdquant_calibration_rows_with_nan(w):
    model, calib = _generic_calibrated()
    calib.inputs["fc2"][3, 5] = float("nan")  # the statistics stay finite: only the rows the search reads
    recipe = ditq.SVDQuant(w_bits=4, a_bits=4, rank=8, group_size=64, alphas=(0.5,))
    _unchanged_after(model, lambda: ditq.quantize(model, recipe, calib=calib))


@api_case(ValueError, "'fc1'", "NaN")
def gptq_calibration_rows_with_nan_names_the_layer(w):
    model, calib = _generic_calibrated()
    calib.inputs["fc1"][0, 0] = float("nan")
    _unchanged_after(model, lambda: ditq.quantize(model, ditq.QDiT(w_bits=4, group_size=64, gptq=True), calib=calib))


def _overflowing_hessian_calibrated() -> tuple[nn.Module, CalibData]:
    model, calib = _generic_calibrated()
    for kind in (calib.inputs, calib.absmax, calib.step_absmax):
        kind["fc1"] *= 1e20  # finite inputs whose squares are not: H = mean x xᵀ overflows
    return model, calib


@api_case(ValueError, "^fc1: ", "hessian")
def gptq_hessian_overflow_names_the_layer(w):
    model, calib = _overflowing_hessian_calibrated()
    _unchanged_after(model, lambda: ditq.quantize(model, ditq.QDiT(w_bits=4, group_size=64, gptq=True), calib=calib))


@api_case(ValueError, "^fc1: ", "hessian")
def svdquant_gptq_hessian_overflow_names_the_layer(w):
    model, calib = _overflowing_hessian_calibrated()
    recipe = ditq.SVDQuant(w_bits=4, a_bits=4, rank=8, group_size=64, gptq=True, alphas=(0.5,))
    _unchanged_after(model, lambda: ditq.quantize(model, recipe, calib=calib))


@api_case(ValueError, "2 samples", "at least 4")
def demo_with_too_few_samples_to_score(w):
    from ditq.demo import run_demo

    settings = SampleSettings(samples=2, steps=2, batch_size=2)
    run_demo(w / "demo", model_ref=str(w / "fp.safetensors"), settings=settings, progress=False)


@api_case(ValueError, "4×8×8", "1×32×32")
def evaluate_a_model_the_feature_net_cannot_score(w):
    from ditq.eval.runner import evaluate

    evaluate({"fp": make_tiny_dit(in_channels=4)}, SampleSettings(samples=4, steps=2))


@pytest.mark.parametrize(("case", "exc", "names"), API_CASES)
def test_api_refuses(case, exc, names, work):
    before = _snapshot(work.dir)
    with pytest.raises(exc) as info:
        case(work)
    message = _message(info.value)
    for name in names:
        assert re.search(name.format(d=re.escape(str(work.dir))), message), (name, message)
    assert _snapshot(work.dir) == before


# ---- CLI: argv (with {d} for the working folder) and what the one error line must name -------------------

CPU = ["--device", "cpu"]
QUICK = ["--calib-samples", "1", "--calib-steps", "2"]
CLI_CASES = [
    # recipes
    ("recipe_malformed_json", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "{d}/bad.json", "--out", "{d}/o.safetensors"], ["{d}/bad.json"]),
    ("recipe_malformed_yaml", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "{d}/bad.yaml", "--out", "{d}/o.safetensors"], ["{d}/bad.yaml"]),
    ("recipe_bits_as_a_string", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "{d}/str_bits.json", "--out", "{d}/o.safetensors"], ["{d}/str_bits.json", "w_bits"]),
    ("recipe_unknown_key", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "{d}/unknown_key.json", "--out", "{d}/o.safetensors"], ["w_bit"]),
    ("recipe_unknown_preset", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w5a5", "--out", "{d}/o.safetensors"], ["w5a5"]),
    ("recipe_override_matches_nothing", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "{d}/nomatch.json", "--out", "{d}/o.safetensors", *QUICK], [r"blocks\.9\.\*"]),
    ("recipe_group_not_dividing", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "{d}/group48.json", "--out", "{d}/o.safetensors", *QUICK], [r"blocks\.\d\.\w+\.\w+", "group_size"]),
    # numbers
    ("sample_negative_samples", ["sample", "--model", "{d}/fp.safetensors", "--samples", "-3", "--out", "{d}/g.png"], ["--samples"]),
    ("sample_zero_steps", ["sample", "--model", "{d}/fp.safetensors", "--steps", "0", "--out", "{d}/g.png"], ["--steps"]),
    ("sample_steps_ddim_cannot_take", ["sample", "--model", "{d}/fp.safetensors", "--steps", "37", "--out", "{d}/g.png"], ["--steps 37", "36 and 38"]),
    ("sample_cfg_nan", ["sample", "--model", "{d}/fp.safetensors", "--cfg", "nan", "--out", "{d}/g.png"], ["--cfg"]),
    ("sample_cfg_inf", ["sample", "--model", "{d}/fp.safetensors", "--cfg", "inf", "--out", "{d}/g.png"], ["--cfg"]),
    ("sample_samples_not_a_number", ["sample", "--model", "{d}/fp.safetensors", "--samples", "ten", "--out", "{d}/g.png"], ["--samples", "ten"]),
    ("quantize_zero_calib_samples", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/o.safetensors", "--calib-samples", "0"], ["--calib-samples"]),
    ("quantize_negative_calib_steps", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/o.safetensors", "--calib-steps", "-1"], ["--calib-steps"]),
    ("eval_zero_batch_size", ["eval", "--fp", "{d}/fp.safetensors", "--batch-size", "0", "--out", "{d}/ev"], ["--batch-size"]),
    ("demo_zero_samples", ["demo", "--samples", "0", "--out", "{d}/demo"], ["--samples"]),
    ("demo_too_few_samples_to_score", ["demo", "--samples", "1", "--out", "{d}/demo"], ["--samples 1", "at least 4"]),
    ("eval_too_few_samples_to_score", ["eval", "--fp", "{d}/fp.safetensors", "--samples", "3", "--steps", "2", "--out", "{d}/ev"], ["--samples 3", "at least 4"]),
    # output paths
    ("sample_out_is_a_directory", ["sample", "--model", "{d}/fp.safetensors", "--out", "{d}", *CPU], ["--out", "{d}", "directory"]),
    ("sample_out_under_a_file", ["sample", "--model", "{d}/fp.safetensors", "--out", "{d}/fp.safetensors/g.png", *CPU], ["{d}/fp.safetensors", "file"]),
    ("quantize_out_is_a_directory", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}", *QUICK], ["--out", "directory"]),
    ("quantize_out_under_a_file", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/bad.json/q.safetensors", *QUICK], ["{d}/bad.json"]),
    ("quantize_out_overwrites_model", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/fp.safetensors", *QUICK], ["--out", "--model"]),
    ("quantize_report_is_a_directory_leaves_no_checkpoint", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/o.safetensors", "--report", "{d}", *QUICK], ["--report", "directory"]),
    ("quantize_report_under_a_file", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/o.safetensors", "--report", "{d}/bad.json/r.json", *QUICK], ["--report", "{d}/bad.json"]),
    ("eval_out_is_a_file", ["eval", "--fp", "{d}/fp.safetensors", "--out", "{d}/bad.json", "--samples", "2", "--steps", "2"], ["--out", "{d}/bad.json"]),
    ("demo_out_is_a_file", ["demo", "--out", "{d}/bad.json"], ["--out", "{d}/bad.json"]),
    ("eval_report_would_replace_a_folder", ["eval", "--fp", "{d}/fp.safetensors", "--out", "{d}/taken", "--samples", "4", "--steps", "2"], ["--out", "{d}/taken/report.json", "directory"]),
    ("demo_report_would_replace_a_folder", ["demo", "--out", "{d}/taken"], ["--out", "{d}/taken/report.json", "directory"]),
    ("quantize_out_not_safetensors", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/q.pt", *QUICK], ["--out", "{d}/q.pt", r"\.safetensors"]),
    ("quantize_report_not_json", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/o.safetensors", "--report", "{d}/r.txt", *QUICK], ["--report", "{d}/r.txt", r"\.json"]),
    ("sample_out_not_png", ["sample", "--model", "{d}/fp.safetensors", "--out", "{d}/g.jpg"], ["--out", "{d}/g.jpg", r"\.png"]),
    ("bench_out_not_json", ["bench", "--model", "{d}/q.safetensors", "--out", "{d}/b.md"], ["--out", "{d}/b.md", r"\.json"]),
    ("quantize_out_overwrites_weights", ["quantize", "--model", "DiT-MNIST", "--weights", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/fp.safetensors", *QUICK], ["--out", "--weights"]),
    # devices
    ("device_unknown", ["sample", "--model", "{d}/fp.safetensors", "--device", "foo", "--out", "{d}/g.png"], ["--device", "foo"]),
    ("device_cuda_index_out_of_range", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/o.safetensors", "--device", "cuda:99"], ["--device", "cuda"]),
    # models and checkpoints
    ("model_unknown_name", ["sample", "--model", "DiT-Nope", "--out", "{d}/g.png"], ["DiT-Nope"]),
    ("model_missing_file", ["sample", "--model", "{d}/missing.safetensors", "--out", "{d}/g.png"], ["{d}/missing.safetensors"]),
    ("model_is_a_directory", ["sample", "--model", "{d}", "--out", "{d}/g.png"], ["{d}", "directory"]),
    ("model_truncated", ["sample", "--model", "{d}/truncated.safetensors", "--out", "{d}/g.png", *CPU], ["{d}/truncated.safetensors"]),
    ("model_header_edited", ["sample", "--model", "{d}/q_w3.safetensors", "--out", "{d}/g.png", *CPU], ["{d}/q_w3.safetensors", "header"]),
    ("model_foreign_file", ["sample", "--model", "{d}/foreign.safetensors", "--out", "{d}/g.png", *CPU], ["{d}/foreign.safetensors"]),
    ("quantize_an_already_quantized_checkpoint", ["quantize", "--model", "{d}/q.safetensors", "--recipe", "w8a8", "--out", "{d}/o.safetensors", *QUICK], ["{d}/q.safetensors", "already quantized"]),
    ("sample_latents_without_vae", ["sample", "--model", "{d}/latent.safetensors", "--samples", "1", "--steps", "2", "--out", "{d}/g.png", *CPU], ["{d}/latent.safetensors", "4-channel", "--vae"]),
    ("eval_a_model_the_feature_net_cannot_score", ["eval", "--fp", "{d}/fp.safetensors", "--model", "{d}/latent.safetensors", "--samples", "4", "--steps", "2", "--out", "{d}/ev", *CPU], ["latent", "4×8×8", "1×32×32"]),
    ("weights_for_a_checkpoint", ["sample", "--model", "{d}/fp.safetensors", "--weights", "{d}/q.safetensors", "--out", "{d}/g.png"], ["weights"]),
    ("eval_model_missing", ["eval", "--fp", "{d}/fp.safetensors", "--model", "{d}/missing.safetensors", "--out", "{d}/ev", "--samples", "4", "--steps", "2", *CPU], ["{d}/missing.safetensors"]),
    # the command line itself
    ("missing_required_flag", ["quantize", "--model", "{d}/fp.safetensors", "--out", "{d}/o.safetensors"], ["--recipe"]),
    ("unknown_flag", ["sample", "--model", "{d}/fp.safetensors", "--out", "{d}/g.png", "--smaples", "4"], ["--smaples"]),
    ("unknown_command", ["quantise"], ["quantise"]),
    ("quantize_a_qat_recipe", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "terdit", "--out", "{d}/o.safetensors", *QUICK], ["terdit", "ditq train"]),
    ("eval_a_qat_recipe", ["eval", "--fp", "{d}/fp.safetensors", "--recipe", "terdit", "--samples", "4", "--steps", "2", "--out", "{d}/ev", *QUICK], ["terdit", "ditq train"]),
    ("demo_a_qat_recipe", ["demo", "--recipe", "terdit-a8", "--out", "{d}/demo"], ["terdit-a8", "ditq train"]),
    ("eval_vae_without_inception", ["eval", "--fp", "{d}/fp.safetensors", "--recipe", "w8a8", "--vae", "{d}", "--samples", "4", "--steps", "2", "--out", "{d}/ev", *QUICK], ["--inception", "--ref-batch"]),
    ("eval_inception_without_vae", ["eval", "--fp", "{d}/fp.safetensors", "--inception", "{d}/bad.json", "--samples", "4", "--steps", "2", "--out", "{d}/ev", *CPU], ["--vae"]),
    ("unknown_sampler", ["sample", "--model", "{d}/fp.safetensors", "--out", "{d}/g.png", "--sampler", "euler"], ["--sampler", "euler"]),
    ("sample_pipeline_with_a_sampler", ["sample", "--pipeline", "{d}", "--sampler", "ddpm", "--out", "{d}/g.png"], ["--sampler ddpm", "--pipeline", "scheduler"]),
    # bench
    ("bench_unknown_backend", ["bench", "--model", "{d}/q.safetensors", "--backend", "triton"], ["--backend", "triton", "lowbit"]),
    ("bench_cuda_graphs_on_cpu", ["bench", "--model", "{d}/q.safetensors", "--cuda-graphs", *CPU], ["--cuda-graphs", "cpu"]),
    ("bench_zero_batch", ["bench", "--model", "{d}/q.safetensors", "--batch", "0"], ["--batch"]),
    ("bench_fp_is_quantized", ["bench", "--model", "{d}/q.safetensors", "--fp", "{d}/q.safetensors", *CPU], ["--fp", "{d}/q.safetensors", "quantized"]),
    ("bench_out_is_a_directory", ["bench", "--model", "{d}/q.safetensors", "--out", "{d}"], ["--out", "directory"]),
    ("bench_fp_of_another_architecture", ["bench", "--model", "{d}/q.safetensors", "--fp", "{d}/latent.safetensors", *CPU], ["--fp", "{d}/latent.safetensors", "in_channels"]),
    # train (more in tests/test_train.py)
    ("train_init_from_missing", ["train", "--init-from", "{d}/nope.safetensors", "--out", "{d}/run", *CPU], ["init_from", "{d}/nope.safetensors"]),
    ("train_out_is_a_file", ["train", "--out", "{d}/bad.json", *CPU], ["{d}/bad.json", "file"]),
    ("train_export_under_a_file", ["train", "--out", "{d}/run", "--export-fp16", "{d}/bad.json/x.safetensors", *CPU], ["--export-fp16", "{d}/bad.json"]),
    # search
    ("search_budget_nan", ["search", "--budget", "nan", "--out", "{d}/s"], ["--budget", "nan"]),
    ("search_budget_inf", ["search", "--budget", "inf", "--out", "{d}/s"], ["--budget", "inf"]),
    ("search_budget_negative", ["search", "--budget=-2", "--out", "{d}/s"], ["--budget", "-2"]),
    ("search_cfg_scale_nan", ["search", "--cfg-scale", "nan", "--out", "{d}/s"], ["--cfg-scale"]),
    ("search_out_is_a_file", ["search", "--out", "{d}/bad.json"], ["--out", "{d}/bad.json"]),
    ("search_unknown_flag", ["search", "--out", "{d}/s", "--generatoins", "2"], ["--generatoins"]),
]

# Output folders that permission bits call writable but that take no file: /proc refuses new entries even to
# root. Each is refused before any work, and an existing --out is left as it was.
NO_FILES_HERE = "/proc/ditq_x"
UNWRITABLE_CASES = [
    ("quantize_report_where_no_file_can_be_made_keeps_the_old_out", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", "{d}/q.safetensors", "--report", f"{NO_FILES_HERE}/r.json", *QUICK], ["--report", NO_FILES_HERE]),
    ("quantize_out_where_no_file_can_be_made", ["quantize", "--model", "{d}/fp.safetensors", "--recipe", "w8a8", "--out", f"{NO_FILES_HERE}/q.safetensors", *QUICK], ["--out", NO_FILES_HERE]),
    ("sample_out_where_no_file_can_be_made", ["sample", "--model", "{d}/fp.safetensors", "--samples", "1", "--steps", "2", "--out", "/proc/g.png", *CPU], ["--out", "/proc/g.png"]),
    ("bench_out_where_no_file_can_be_made", ["bench", "--model", "{d}/q.safetensors", "--repeats", "1", "--out", "/proc/b.json", *CPU], ["--out", "/proc/b.json"]),
    ("eval_out_where_no_file_can_be_made", ["eval", "--fp", "{d}/fp.safetensors", "--samples", "4", "--steps", "2", "--out", f"{NO_FILES_HERE}/ev", *CPU], ["--out", NO_FILES_HERE]),
    ("demo_out_where_no_file_can_be_made", ["demo", "--out", NO_FILES_HERE], ["--out", NO_FILES_HERE]),
]
NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


@pytest.mark.parametrize(("argv", "names"), [pytest.param(a, n, id=i) for i, a, n in CLI_CASES]
                         + [pytest.param(a, n, id=i, marks=NEEDS_PROC) for i, a, n in UNWRITABLE_CASES])
def test_cli_refuses_in_one_line(argv, names, work, capsys, monkeypatch):
    import ditq.pipeline

    def no_calibration(*args, **kwargs):
        raise AssertionError("the CLI calibrated before it refused a bad input")

    monkeypatch.setattr(ditq.pipeline, "calibrate", no_calibration)
    before = _snapshot(work.dir)
    code = main([a.format(d=work.dir) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("INFO ")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(r"ditq( \w+)?: error: ", lines[0]), lines[0]
    assert ".tmp" not in lines[0] and "Error:" not in lines[0], lines[0]  # no temporary names, no Python internals
    for name in names:
        assert re.search(name.format(d=re.escape(str(work.dir))), lines[0]), (name, lines[0])
    assert _snapshot(work.dir) == before


@pytest.mark.parametrize("command", ["sample", "train", "search"])
def test_cuda_device_without_cuda_is_named(command, work, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = _snapshot(work.dir)
    flags = ["--model", str(work / "fp.safetensors")] if command == "sample" else []
    assert main([command, *flags, "--device", "cuda", "--out", str(work / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device" in err and "CUDA is not available" in err and "truncated" not in err
    assert _snapshot(work.dir) == before


def test_catalogue_size():
    assert len(API_CASES) + len(CLI_CASES) >= 40 and len(CLI_CASES) >= 20

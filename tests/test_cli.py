import json
import os

import pytest
import torch
from PIL import Image

import ditq
from ditq.cli import main
from ditq.io import model_size_bytes
from ditq.pipeline import CalibSettings, post_training_quantize
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import PRESETS
from tests.tiny import make_tiny_mnist_dit

HEADER_BYTES_MAX = 64 * 1024  # a checkpoint's JSON header: what the file holds beyond its tensors


def not_json(constant: str) -> None:
    """`json.loads(..., parse_constant=not_json)` refuses NaN and ±Infinity, which strict JSON does not have."""
    raise AssertionError(f"{constant} in a JSON file")


@pytest.fixture
def fp_ckpt(tmp_path):
    return ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")


def test_quantize_then_sample(fp_ckpt, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code = main(["quantize", "--model", str(fp_ckpt), "--recipe", "w4a8", "--out", str(out), "--calib-samples", "2",
                 "--calib-steps", "2", "--report", str(tmp_path / "r.json"), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn.qkv" in printed and "SQNR" in printed
    model = ditq.load(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 8
    report = json.loads((tmp_path / "r.json").read_text())
    on_disk = os.path.getsize(out)
    assert report["file_bytes"] == on_disk
    assert f"→ {on_disk:,} B on disk" in printed and f"FP16 {report['fp16_size_bytes']:,} B" in printed
    assert 0 < on_disk - report["quant_size_bytes"] < HEADER_BYTES_MAX  # sizes are the tensors as written
    assert report["quant_size_bytes"] < report["fp16_size_bytes"]
    assert report["fp16_size_bytes"] == model_size_bytes(make_tiny_mnist_dit(), torch.float16)
    assert len(report["layers"]) == 8

    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out), "--samples", "4", "--steps", "2", "--out", str(grid),
                 "--device", "cpu"]) == 0
    assert Image.open(grid).size[0] > 4 * 32


def test_quantize_reports_the_numbers_of_the_shared_pipeline(fp_ckpt, tmp_path):
    """`ditq quantize`, `ditq eval --recipe` and the demo call one function: same settings, same numbers."""
    report_path = tmp_path / "r.json"
    assert main(["quantize", "--model", str(fp_ckpt), "--recipe", "w4a16", "--out", str(tmp_path / "q.safetensors"),
                 "--calib-samples", "2", "--calib-steps", "3", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    direct = post_training_quantize(ditq.load(fp_ckpt), PRESETS["w4a16"], settings=CalibSettings(samples=2, steps=3))
    assert report["calibration"] == {"samples": 2, "steps": 3, "seed": 1}
    assert report["layers"] == json.loads(json.dumps(direct.layers))
    assert report["quant_size_bytes"] == direct.quant_size_bytes


def test_pipeline_leaves_the_fp_model_as_it_was(fp_ckpt):
    fp_model = ditq.load(fp_ckpt)
    before = {k: v.clone() for k, v in fp_model.state_dict().items()}
    result = post_training_quantize(fp_model, PRESETS["w8a8"], settings=CalibSettings(samples=2, steps=2))
    assert not any(isinstance(m, QuantLinear) for m in fp_model.modules())
    assert all(torch.equal(before[k], v) for k, v in fp_model.state_dict().items())
    assert sum(isinstance(m, QuantLinear) for m in result.model.modules()) == len(result.layers) == 8
    with pytest.raises(ValueError, match="calibration samples"):
        CalibSettings(samples=0)


def test_eval_reports_fp_and_recipes(fp_ckpt, tmp_path):
    code = main(["eval", "--fp", str(fp_ckpt), "--recipe", "w8a8", "--model", str(fp_ckpt), "--samples", "6",
                 "--steps", "2", "--batch-size", "3", "--calib-samples", "2", "--calib-steps", "2",
                 "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text(), parse_constant=not_json)
    assert {"FP", "W8A8", "fp"} <= set(report)
    assert report["settings"]["samples"] == 6
    assert report["calibration"] == {"samples": 2, "steps": 2, "seed": 1}
    assert report["fp"]["psnr_vs_fp"] == "inf"  # the same checkpoint, scored again from the same noise
    assert report["fp"]["size_bytes"] == os.path.getsize(fp_ckpt)
    assert report["FP"]["size_bytes"] == model_size_bytes(ditq.load(fp_ckpt), torch.float16)
    assert report["W8A8"]["size_bytes"] < report["FP"]["size_bytes"]
    assert "| W8A8 |" in (tmp_path / "ev" / "report.md").read_text()


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["quantize", "--model", "DiT-Nope", "--recipe", "w4a8", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq quantize: error: ") and "neither a zoo model" in err and err.count("\n") == 1
    assert main(["sample", "--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "g.png")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["quantize", "--model", "DiT-MNIST", "--recipe", "w5a5", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["quantize", "--model", "DiT-MNIST"]) == 2  # argparse's own errors are one line too
    err = capsys.readouterr().err
    assert err.startswith("ditq quantize: error: ") and "--recipe" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="neither a zoo model"):
        main(["quantize", "--model", "DiT-Nope", "--recipe", "w4a8", "--out", str(tmp_path / "x.safetensors"), "--debug"])


def test_a_report_that_cannot_be_written_leaves_the_saved_checkpoint(fp_ckpt, tmp_path, monkeypatch, capsys):
    """Validated first; should writing still fail (disk full), the checkpoint written before it stays, and
    the error says so: a failure never removes what was written (it could be the only copy)."""
    import ditq.cli_checks

    def fail(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ditq.cli_checks, "write_json", fail)
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"an older checkpoint")
    assert main(["quantize", "--model", str(fp_ckpt), "--recipe", "w8a8", "--out", str(out), "--calib-samples", "1",
                 "--calib-steps", "2", "--report", str(tmp_path / "r.json")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the calibration's progress bar
    assert last == f"ditq quantize: error: {tmp_path}/r.json: No space left on device; {out} is saved, without this report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.safetensors", "q.safetensors"]
    assert isinstance(ditq.load(out).blocks[0].attn.qkv, QuantLinear)


def test_post_training_quantize_refuses_a_qat_recipe_before_calibrating(monkeypatch):
    import ditq.pipeline

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated for a recipe no post-training method carries out")

    monkeypatch.setattr(ditq.pipeline, "calibrate", no_calibration)
    with pytest.raises(ValueError, match="QAT recipes are trained, not applied"):
        post_training_quantize(make_tiny_mnist_dit(), ditq.load_recipe("terdit"))


def test_error_lines_hide_temporary_names_and_python_quoting():
    from ditq.cli_checks import error_line

    assert error_line(OSError(28, "No space left on device", "/x/.q.safetensors.k3j_x9ab.tmp")) == (
        "/x/q.safetensors: No space left on device")
    assert error_line(OSError(28, "No space left on device", "/x/.q.safetensors.4172.k3j_x9ab.tmp")) == (
        "/x/q.safetensors: No space left on device")  # the writer's pid in the name
    assert error_line(KeyError("layer 'blocks.0' missing")) == "layer 'blocks.0' missing"
    assert error_line(ValueError("first\n  second")) == "first second"


def test_bench_times_the_model_beside_its_fp_source(fp_ckpt, tmp_path, capsys):
    q = ditq.save(ditq.quantize(ditq.load(fp_ckpt), PRESETS["w8a8"]), tmp_path / "q.safetensors")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(q), "--fp", str(fp_ckpt), "--batch", "2", "--repeats", "3",
                 "--backend", "dequantized", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    fp, model = report["rows"]["fp"], report["rows"]["model"]
    assert not fp["quantized"] and model["quantized"] and model["weight_bytes"] < fp["weight_bytes"]
    assert model["speed_vs_fp"] == pytest.approx(fp["median_ms"] / model["median_ms"])
    assert model["min_ms"] <= model["median_ms"] <= model["max_ms"] and model["repeats"] == 3
    assert model["back_to_back_ms"] > 0 and f"{model['back_to_back_ms']:.2f} back to back" in printed
    assert report["settings"]["batch"] == 2 and report["backend"] == "dequantized"
    assert f"{model['speed_vs_fp']:.2f}× the FP model's speed" in printed and "backend dequantized" in printed

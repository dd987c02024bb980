import json

import pytest
from PIL import Image

import ditq
from ditq.cli import main
from ditq.quant.qlinear import QuantLinear
from tests.tiny import make_tiny_mnist_dit


@pytest.fixture
def fp_ckpt(tmp_path):
    return ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")


def test_quantize_then_sample(fp_ckpt, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code = main(["quantize", "--model", str(fp_ckpt), "--recipe", "w4a8", "--out", str(out), "--calib-samples", "2",
                 "--calib-steps", "2", "--report", str(tmp_path / "r.json"), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn.qkv" in printed and "SQNR" in printed and "size: FP16" in printed
    model = ditq.load(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 8
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quant_size_bytes"] < report["fp_size_bytes"]
    assert len(report["layers"]) == 8

    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out), "--samples", "4", "--steps", "2", "--out", str(grid),
                 "--device", "cpu"]) == 0
    assert Image.open(grid).size[0] > 4 * 32


def test_eval_reports_fp_and_recipes(fp_ckpt, tmp_path):
    code = main(["eval", "--fp", str(fp_ckpt), "--recipe", "w8a8", "--model", str(fp_ckpt), "--samples", "6",
                 "--steps", "2", "--batch-size", "3", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert {"FP", "W8A8", "fp"} <= set(report)
    assert report["settings"]["samples"] == 6
    assert report["fp"]["psnr_vs_fp"] == float("inf")  # the same checkpoint, scored again from the same noise
    assert "| W8A8 |" in (tmp_path / "ev" / "report.md").read_text()


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["quantize", "--model", "DiT-Nope", "--recipe", "w4a8", "--out", str(tmp_path / "x")]) == 2
    assert "neither a zoo model" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "g.png")]) == 2
    assert main(["quantize", "--model", "DiT-MNIST", "--recipe", "w5a5", "--out", str(tmp_path / "x")]) == 2
    assert "neither a preset" in capsys.readouterr().err

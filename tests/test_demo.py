import json
import os
import re

import pytest
from PIL import Image

import ditq
from ditq.demo import run_demo
from ditq.eval.runner import SampleSettings
from ditq.pipeline import CalibSettings
from ditq.quant.qlinear import QuantLinear
from ditq.threads import torch_threads
from tests.tiny import make_tiny_mnist_dit


def test_demo_writes_grid_reports_and_checkpoint(tmp_path, capsys):
    ckpt = ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")
    settings = SampleSettings(samples=20, steps=2, batch_size=20)
    with torch_threads(2):  # two workers, whatever the machine
        report = run_demo(tmp_path / "out", model_ref=str(ckpt), settings=settings, progress=True)
    # one line per stage with its seconds, as each ends, then the total
    timed = dict(re.findall(r"^(.+): (\d+\.\d) s$", capsys.readouterr().out, flags=re.MULTILINE))
    stages = ["load model", "calibrate (16 samples × 25 steps)", "quantize SVDQuant W4A8-FP8 g64 r32 +GPTQ",
              "quantize RTN W4A8 g128", "sample 20 images × 3 models, 2 workers",
              "metrics (FID, IS, precision/recall, PSNR/SSIM)", "write grid and reports", "total"]
    assert list(timed) == stages
    assert report["stages"] == {name: float(timed[name]) for name in stages[:-2]}  # the report's are those before it
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("model", "recipe", "samples", "seconds", "fp", "quant", "layers", "calibration", "checkpoint"):
        assert key in saved
    for side in ("fp", "baseline", "quant"):
        assert {"size_bytes", "fid", "class_acc"} <= set(saved[side])
    assert "psnr_vs_fp" in saved["quant"] and "psnr_vs_fp" in saved["baseline"]
    assert saved["recipe"]["method"] == "svdquant" and saved["baseline_recipe"]["method"] == "rtn"
    # the demo calibrates as `ditq quantize` does by default, and reports the bytes it wrote
    assert saved["calibration"] == {"samples": CalibSettings().samples, "steps": CalibSettings().steps, "seed": 1}
    quantized = tmp_path / "out" / "quantized.safetensors"
    assert saved["quant"]["size_bytes"] == os.path.getsize(quantized) < saved["fp"]["size_bytes"]
    # SVDQuant covers the blocks (4 Linears each) and the adaLN modulation (1 each): 2 blocks
    assert sum(isinstance(m, QuantLinear) for m in ditq.load(quantized).modules()) == len(saved["layers"]) == 10
    assert saved["samples"] == 20
    assert Image.open(tmp_path / "out" / "grid.png").size[1] > 3 * 64  # three rows of 2×-scaled 32px tiles
    assert "20 samples" in (tmp_path / "out" / "report.md").read_text()


def test_a_quiet_demo_prints_nothing(tmp_path, capsys):
    ckpt = ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")
    settings = SampleSettings(samples=10, steps=2, batch_size=10)
    report = run_demo(tmp_path / "out", recipe="w8a8", baseline=None, model_ref=str(ckpt), settings=settings,
                      progress=False)
    assert capsys.readouterr() == ("", "")
    assert list(report["stages"])[0] == "load model"  # the stages are still timed and reported


def test_a_recipe_that_cannot_apply_costs_no_calibration(monkeypatch, tmp_path):
    from ditq.recipes import RTN

    def never(*args, **kwargs):
        raise AssertionError("calibrated for a recipe that cannot apply")

    monkeypatch.setattr(CalibSettings, "calibrate", never)
    with pytest.raises(ValueError, match="matches no module"):
        run_demo(tmp_path, recipe=RTN(w_bits=4, skip=("nope*",)), baseline=None, progress=False)

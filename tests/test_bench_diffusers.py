"""bench/bench_diffusers.py at its tiny sizes: every model builds, quantizes, runs and lands in the results files."""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU, the FP8 kernels run interpreted


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))  # as `python bench/...` imports siblings
    return importlib.import_module("bench_diffusers")


# the FP8 path once (its kernels run interpreted on the CPU: seconds), the reference op for the other two
@pytest.mark.parametrize(
    ("model", "config"),
    [("flux", "w4a8-fp8@fp8-cached+exact-accum"), ("sd3", "w4a8-fp8@fp8"), ("pixart", "w4a8-fp8@reference")],
)
def test_the_tiny_run_measures_bf16_then_the_quantized_model_on_its_backend(bench, model, config, tmp_path):
    out = tmp_path / "results"
    bench.main(["--tiny", "--device", DEVICE, "--no-compile", "--models", model, "--configs", f"{config},bf16",
                "--warmup", "0", "--iters", "1", "--out", str(out)])  # fmt: skip
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    bf16, quantized = run["rows"]
    assert (bf16["config"], quantized["config"]) == ("bf16", config)
    # the effective setting: the suffix's, else the FP8 backends' default (on); None off the FP8 backends
    assert quantized["fast_accum"] is {"fp8-cached+exact-accum": False, "fp8": True}.get(config.split("@")[1])
    backend = config.removesuffix("+exact-accum").split("@")[1]
    done, total = quantized["layers"].removesuffix(f" on {backend}").split("/")
    assert done == total and int(total) > 0
    assert math.isfinite(bf16["step_ms"]) and math.isfinite(quantized["step_ms"])
    assert 0 < quantized["host_ms"] < float("inf")  # on the CPU the host's time is the step
    # W4 per-channel + FP8 activations move each output by a few %, not by the output's size (a wrong path)
    assert 0 < quantized["rel_err_vs_bf16"] < 0.5
    assert run["shapes"][model]["config"]["num_layers"] <= 2
    assert f"| {model} | 1 | {config} |" in out.with_suffix(".md").read_text()


def test_a_compiled_row_says_what_the_fusion_pass_folded_and_profile_writes_its_kernels(bench, tmp_path):
    out = tmp_path / "results"
    bench.main(["--tiny", "--device", DEVICE, "--models", "flux", "--configs", "w4a8-fp8@fp8-cached",
                "--warmup", "0", "--iters", "1", "--profile", "--skip-guards", "--out", str(out)])  # fmt: skip
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    (row,) = run["rows"]
    assert run["compile"] == "block by block, guards skipped"
    folded = dict(item.rsplit(" ", 1) for item in row["fused"].split(", "))
    assert {"norm_modulate", "gelu", "residual", "joined_gemm"} <= folded.keys()
    assert all(int(n) > 0 for n in folded.values())
    table = (tmp_path / "results_profile_flux_b1_w4a8-fp8_fp8-cached.txt").read_text()
    assert "Name" in table and "quantize_rows_fp8" in table
    assert "The host: Python functions by own time" in table and "tottime" in table


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--configs", "bf16,w4a8-fp8@fp9"], "config 'w4a8-fp8@fp9' is not bf16, torchao-fp8-row or RECIPE@BACKEND"),
        (["--configs", "w4a8-fp8@lowbit+fast-accum"], r"config 'w4a8-fp8@lowbit\+fast-accum': \+fast-accum needs an FP8"),
        (["--configs", "w4a9@fp8"], "config 'w4a9@fp8': recipe 'w4a9' is neither a preset"),
        (["--configs", "w4a8-fp8@fp8+fast-accum+exact-accum"],
         r"config 'w4a8-fp8@fp8\+fast-accum\+exact-accum': \+fast-accum and \+exact-accum both set fast_accumulation"),
        (["--models", "flux,sdxl"], r"--models \['sdxl'\]: choose from flux, sd3, pixart"),
        (["--configs", "bf16", "--skip-guards", "--no-compile"], "--skip-guards skips the guards of compiled code: not with --no-compile"),
        (["--configs", "bf16", "--cuda-graphs"], "--cuda-graphs replays compiled steps on a CUDA device: not with"),
        (["--configs", "w4a8-fp8@fp8+static-launch", "--no-compile"], r"\+static-launch is how compiled code"),
        (["--configs", "w4a8-fp8@fp8+unjoined"], r"config 'w4a8-fp8@fp8\+unjoined': \+unjoined needs fp8-cached"),
    ],
)
def test_a_bad_option_is_one_line_before_any_model_is_built(bench, option, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--device", "cpu", "--out", str(tmp_path / "r"), *option])
    assert exit_.value.code == 2
    assert re.search(f"error: {message}", capsys.readouterr().err.strip().splitlines()[-1])
    assert not list(tmp_path.iterdir())


def test_suffixes_set_a_config_s_options_in_any_order(bench):
    parse = bench.Config.parse
    for label in ("w4a8-fp8@fp8-cached+exact-accum+static-launch", "w4a8-fp8@fp8-cached+static-launch+exact-accum"):
        config = parse(label)
        assert (config.recipe, config.backend, config.fast_accumulation, config.static_launch) == (
            "w4a8-fp8", "fp8-cached", False, True)
    plain = parse("w4a8-fp8@fp8-cached")
    assert (plain.fast_accumulation, plain.static_launch, plain.join) == (None, False, True)
    assert not parse("w4a8-fp8@fp8-cached+unjoined+fast-accum").join
    assert parse("w4a8-fp8@lowbit+static-launch").static_launch  # any backend: the launcher is inductor's

"""What the command line tells a user: its version, help for every command and flag, and a line per stage
of long work."""

import argparse
import re

import pytest
import torch

import ditq
from ditq import _version
from ditq.cli import _parser, main
from ditq.eval.speed import SpeedSettings, time_forward
from ditq.recipes import PRESETS, RTN
from ditq.search.cli import build_parser as search_parser
from ditq.train import build_parser as train_parser
from tests.tiny import make_tiny_mnist_dit


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser; `train` and `search` own theirs."""
    return _subparsers(_parser()) | {"train": train_parser(), "search": search_parser()}


def _flat(text: str) -> str:
    """Help text with argparse's line breaks undone (it also breaks after a hyphen: `DiT-` / `MNIST`)."""
    return re.sub(r"(?<=\w-) ", "", " ".join(text.split()))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"ditq {_version.__version__}\n"


def test_every_command_is_described_in_the_overview():
    overview = _flat(_parser().format_help())
    for name in _commands():
        assert f" {name} " in overview
    for name, parser in _commands().items():
        assert parser.description, f"`ditq {name} --help` has no description"


@pytest.mark.parametrize("name", ["quantize", "sample", "eval", "bench", "demo", "train", "search"])
def test_every_flag_has_help_and_shows_its_default(name):
    parser = _commands()[name]
    text = _flat(parser.format_help())
    for action in parser._actions:
        assert action.help, f"ditq {name} {action.option_strings} has no help"
        default = action.default
        if default is not None and default is not False and default != [] and action.nargs != 0:
            assert f"(default: {default})" in text, f"ditq {name} {action.option_strings}: default not shown"


def test_quantize_help_lists_every_registered_preset_and_what_it_needs(monkeypatch):
    monkeypatch.setitem(PRESETS, "w3a16-example", RTN(w_bits=3, a_bits=None))  # the list is read, not kept
    text = _subparsers(_parser())["quantize"].format_help()
    needs = {"nothing": "needs nothing", "calibration": "needs calibration", "training": "needs training"}
    for name, recipe in PRESETS.items():
        (line,) = [line for line in text.splitlines() if line.startswith(f"  {name} ")]
        assert needs[recipe.needs()] in line
    assert "RTN W3 per channel, A16; needs nothing" in text
    ptq, naive = (next(line for line in text.splitlines() if line.startswith(f"  {name} "))
                  for name in ("matquant-ptq", "matquant-naive"))  # fmt: skip
    assert "int8 codes fit to 8/4/3/2 bits" in ptq and "int8 codes fit to 8 bits" in naive  # told apart
    assert "slower than full precision on the CPU" in _flat(text)


def test_bench_help_offers_no_pipeline():
    assert "--pipeline" not in _subparsers(_parser())["bench"].format_help()


def test_quantize_says_what_it_is_doing(tmp_path, capsys):
    fp = ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")
    out, report = tmp_path / "q.safetensors", tmp_path / "r.json"
    assert main(["quantize", "--model", str(fp), "--recipe", "w4a16", "--out", str(out), "--calib-samples", "1",
                 "--calib-steps", "2", "--report", str(report), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = [lines.index("calibrating: 1 samples × 2 steps (seed 1)"), lines.index("quantizing 8 layers with RTN"),
              next(i for i, line in enumerate(lines) if line.endswith(f"saved {out}")), lines.index(f"wrote {report}")]
    assert stages == sorted(stages)


def test_bench_says_when_it_compiles_and_times(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda model, **options: model)  # the stage lines, not inductor
    time_forward(make_tiny_mnist_dit(), SpeedSettings(batch=1, compile=True, repeats=1, warmup=1), progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  compiling (torch.compile, fullgraph) at batch 1")
    assert lines[1].startswith("  compiled in ") and lines[2].startswith("  timing: 1 warm-up calls, 1 timed")
    time_forward(make_tiny_mnist_dit(), SpeedSettings(batch=1, repeats=1, warmup=1))
    assert capsys.readouterr().out == ""  # silent unless asked


def test_eval_says_where_it_writes_and_reports_each_model(tmp_path, capsys):
    fp = ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")
    out = tmp_path / "ev"
    assert main(["eval", "--fp", str(fp), "--recipe", "w8a8", "--samples", "4", "--steps", "2", "--calib-samples",
                 "1", "--calib-steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"FP model: checkpoint {fp}; 2 models to score, reports to {out}/")
    assert "sampling FP, W8A8: 4 images each, ddim 2 steps, cfg 1.5" in printed
    for name in ["FP", "W8A8"]:
        assert f"\n{name}: FID " in printed
    assert "W8A8: quantizing the FP model\ncalibrating: 1 samples" in printed
    assert printed.rstrip().endswith(f"wrote {out / 'report.json'} and {out / 'report.md'}")

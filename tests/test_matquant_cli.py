"""MatQuant on the command line: `sample --bits`, `eval --bits 8,4,2` (one row per width, sized as exported) and
`ditq export`; bad widths and plans refused in one line before anything is sampled or written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import ditq
import ditq.eval.runner
import ditq.sampling
from ditq.cli import main
from ditq.io import model_size_bytes
from ditq.qat import QAT, convert, prepare
from ditq.quant.qlinear import QuantLinear
from tests.test_matquant import NESTED
from tests.tiny import make_tiny_mnist_dit

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--samples", "4", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp, nested (int8 codes served at 4), six (6-bit codes), plain (one width) checkpoints and plans."""
    d = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: see the one_thread fixture
    try:
        ditq.save(make_tiny_mnist_dit(), d / "fp.safetensors")
        ditq.save(convert(prepare(make_tiny_mnist_dit(), NESTED)), d / "nested.safetensors")
        six = QAT(w_bits=4, stored_bits=6, nested_bits=(6, 4), group_size=32)
        ditq.save(convert(prepare(make_tiny_mnist_dit(), six)), d / "six.safetensors")
        ditq.save(convert(prepare(make_tiny_mnist_dit(), QAT(w_bits=4, group_size=32))), d / "plain.safetensors")
    finally:
        torch.set_num_threads(threads)
    (d / "mix.json").write_text(json.dumps({"blocks.0.*": 8, "*": 2}))
    (d / "unknown.json").write_text(json.dumps({"blocks.9.*": 4, "*": 2}))
    return d


def widths(model: torch.nn.Module) -> dict[str, tuple[int, int | None]]:
    return {n: (m.spec.w_bits, m.spec.stored_bits) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_eval_scores_every_width_of_one_checkpoint_as_exported(files: Path, tmp_path: Path, monkeypatch) -> None:
    """Which models `ditq eval` scores and how it sizes them; scoring itself (every model from the same noise)
    is `evaluate`'s, tested with it, and replaced here by a stub that reports the sizes it is given."""
    scored = {}

    def stub(models, settings, **kwargs):
        scored.update(models=dict(models), sizes=dict(kwargs["sizes"]))
        rows = {name: {"size_bytes": size, "fid": 0.0} for name, size in kwargs["sizes"].items()}
        return {"settings": dataclasses.asdict(settings), **rows}, {}

    monkeypatch.setattr(ditq.eval.runner, "evaluate", stub)
    out = tmp_path / "ev"
    # plain's path as a user may type it ("./"), which Path would spell otherwise
    argv = ["eval", "--fp", str(files / "fp.safetensors"), "--model", str(files / "nested.safetensors"),
            "--model", f"{files}/./plain.safetensors", "--bits", f"8,4,2,{files / 'mix.json'}", "--out", str(out),
            *FAST]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = ["nested@8", "nested@4", "nested@2", "nested@mix"]
    assert list(scored["models"]) == ["FP", *rows, "plain"]  # a one-width model beside them: once, as saved
    assert scored["sizes"]["plain"] == (files / "plain.safetensors").stat().st_size
    assert widths(scored["models"]["plain"]) == widths(ditq.load(files / "plain.safetensors"))
    assert all(name in report for name in rows)
    plan = json.loads((files / "mix.json").read_text())
    for name, bits in zip(rows, [8, 4, 2, plan], strict=True):
        model = scored["models"][name]
        sliced = ditq.load(files / "nested.safetensors", bits=bits)
        assert widths(model) == {n: (w, None) for n, (w, _) in widths(sliced).items()}, name  # exported
        assert scored["sizes"][name] == report[name]["size_bytes"] == model_size_bytes(model), name
        x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 900]), torch.tensor([1, 7])
        with torch.no_grad():
            assert torch.equal(model(x, t, y), sliced(x, t, y)), name
    sizes = [report[name]["size_bytes"] for name in rows[:3]]
    assert sizes[0] > sizes[1] > sizes[2]


def test_sample_at_a_width_draws_what_its_export_draws(files: Path, tmp_path: Path, capsys) -> None:
    """The exported checkpoint computes the slice bit for bit: the same seed gives the same PNG, byte for byte."""
    exported = tmp_path / "w2.safetensors"
    assert main(["export", "--model", str(files / "nested.safetensors"), "--bits", "2", "--out", str(exported)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"exported 8 layer\(s\) at W2; [\d,]+ B → [\d,]+ B on disk \(\d\.\d\d× smaller\)", printed)
    assert widths(ditq.load(exported)) == dict.fromkeys(widths(ditq.load(exported)), (2, None))
    grids = {}
    for name, flags in {"sliced": ["--model", str(files / "nested.safetensors"), "--bits", "2"],
                        "exported": ["--model", str(exported)]}.items():  # fmt: skip
        grids[name] = tmp_path / f"{name}.png"
        assert main(["sample", *flags, "--out", str(grids[name]), "--samples", "2", "--steps", "2"]) == 0
    assert "served at bits 2" in capsys.readouterr().out
    assert grids["sliced"].read_bytes() == grids["exported"].read_bytes()


def test_export_without_bits_keeps_the_widths_the_file_serves(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4.safetensors"
    assert main(["export", "--model", str(files / "nested.safetensors"), "--out", str(out)]) == 0
    assert set(widths(ditq.load(files / "nested.safetensors")).values()) == {(4, 8)}
    assert set(widths(ditq.load(out)).values()) == {(4, None)}


def test_a_trained_checkpoint_exports_like_its_conversion(tmp_path: Path) -> None:
    """`ditq train` saves FakeQuantLinears; `export` (and `eval --bits`, through the same loader) takes that file
    as it takes its conversion."""
    trained = prepare(make_tiny_mnist_dit(), NESTED)
    ditq.save(trained, tmp_path / "trained.safetensors")
    ditq.save(convert(prepare(make_tiny_mnist_dit(), NESTED)), tmp_path / "converted.safetensors")
    for name in ("trained", "converted"):
        assert main(["export", "--model", str(tmp_path / f"{name}.safetensors"), "--bits", "2",
                     "--out", str(tmp_path / f"{name}-w2.safetensors")]) == 0  # fmt: skip
    ours, theirs = (ditq.load(tmp_path / f"{name}-w2.safetensors").state_dict() for name in ("trained", "converted"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_with_a_plan_keeps_each_layer_at_its_width(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "mix.safetensors"
    assert main(["export", "--model", str(files / "nested.safetensors"), "--bits", str(files / "mix.json"),
                 "--out", str(out)]) == 0  # fmt: skip
    assert widths(ditq.load(out)) == {"blocks.0.attn.qkv": (8, None), "blocks.0.attn.proj": (8, None),
                                      "blocks.0.mlp.fc1": (8, None), "blocks.0.mlp.fc2": (8, None),
                                      "blocks.1.attn.qkv": (2, None), "blocks.1.attn.proj": (2, None),
                                      "blocks.1.mlp.fc1": (2, None), "blocks.1.mlp.fc2": (2, None)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, before any sampling, nothing written
# --------------------------------------------------------------------------------------------

REFUSALS = [
    ("width_above_8", ["sample", "--model", "{d}/nested.safetensors", "--bits", "9", "--out", "{o}/g.png"],
     [r"--bits", r"2\.\.8", "9"]),
    ("width_below_2", ["eval", "--fp", "{d}/fp.safetensors", "--model", "{d}/nested.safetensors", "--bits", "8,1",
                       "--out", "{o}/ev"], [r"--bits", r"2\.\.8", "1"]),
    ("width_twice", ["eval", "--fp", "{d}/fp.safetensors", "--model", "{d}/nested.safetensors", "--bits", "4,4",
                     "--out", "{o}/ev"], [r"--bits", "'4,4'", "twice"]),
    ("several_widths_to_sample", ["sample", "--model", "{d}/nested.safetensors", "--bits", "4,2", "--out",
                                  "{o}/g.png"], ["--bits", "'4,2'", "ditq eval"]),
    ("plan_missing", ["sample", "--model", "{d}/nested.safetensors", "--bits", "{d}/nope.json", "--out",
                      "{o}/g.png"], ["--bits", "{d}/nope.json"]),
    ("plan_naming_unknown_layers", ["sample", "--model", "{d}/nested.safetensors", "--bits", "{d}/unknown.json",
                                    "--out", "{o}/g.png"], ["{d}/nested.safetensors", r"'blocks\.9\.\*'"]),
    ("width_above_the_stored_bits", ["eval", "--fp", "{d}/fp.safetensors", "--model", "{d}/six.safetensors",
                                     "--bits", "4,8", "--out", "{o}/ev"],
     ["{d}/six.safetensors", r"layer 'blocks\.0\.attn\.qkv'", r"bits=8 must be an int in 2\.\.6"]),
    ("non_nested_checkpoint", ["sample", "--model", "{d}/plain.safetensors", "--bits", "4", "--out", "{o}/g.png"],
     ["{d}/plain.safetensors", "no nested layer"]),
    ("no_nested_checkpoint_in_eval", ["eval", "--fp", "{d}/fp.safetensors", "--model", "{d}/plain.safetensors",
                                      "--bits", "4", "--out", "{o}/ev"],
     ["--bits", "no --model has a nested layer", "{d}/plain.safetensors"]),
    ("zoo_model", ["sample", "--model", "DiT-MNIST", "--bits", "4", "--out", "{o}/g.png"], ["DiT-MNIST", "zoo"]),
    ("eval_bits_without_a_model", ["eval", "--fp", "{d}/fp.safetensors", "--recipe", "w8a8", "--bits", "4",
                                   "--out", "{o}/ev"], ["--bits", "--model"]),
    ("pipeline_bits_without_a_model", ["sample", "--pipeline", "{d}", "--bits", "4", "--out", "{o}/g.png"],
     ["--bits", "--model"]),
    ("export_non_nested", ["export", "--model", "{d}/plain.safetensors", "--out", "{o}/x.safetensors"],
     ["--model {d}/plain.safetensors", "no nested layer"]),
    ("export_over_its_model", ["export", "--model", "{o}/nested.safetensors", "--out", "{o}/nested.safetensors"],
     ["--out", "--model"]),
    ("export_not_safetensors", ["export", "--model", "{d}/nested.safetensors", "--out", "{o}/x.pt"],
     ["--out", r"\.safetensors"]),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "names"), [pytest.param(a, n, id=i) for i, a, n in REFUSALS])
def test_bad_widths_and_plans_are_refused_in_one_line_before_sampling(files: Path, tmp_path: Path, argv, names,
                                                                      monkeypatch, capsys) -> None:
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing a bad input")

    monkeypatch.setattr(ditq.sampling, "sample", no_sampling)
    monkeypatch.setattr(ditq.eval.runner, "evaluate", no_sampling)
    (tmp_path / "nested.safetensors").write_bytes((files / "nested.safetensors").read_bytes())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    device = [] if argv[0] == "export" else ["--device", "cpu"]
    code = main([a.format(d=files, o=tmp_path) for a in [*argv, *device]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("INFO ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.match(r"ditq \w+: error: ", lines[0]), lines[0]
    for name in names:
        assert re.search(name.format(d=re.escape(str(files)), o=re.escape(str(tmp_path))), lines[0]), (name, lines[0])
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == before


def test_a_pipeline_samples_its_nested_transformer_at_a_width(tmp_path: Path) -> None:
    """`sample --pipeline DIR --model nested --bits 2` draws what the exported int2 transformer draws."""
    pytest.importorskip("diffusers")
    from tests.integrations.tiny_diffusers import make_dit_pipeline

    pipe = make_dit_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    nested = ditq.save(convert(prepare(pipe.transformer, NESTED)), tmp_path / "nested.safetensors")
    exported = ditq.save(ditq.export_served(ditq.load(nested, bits=2)), tmp_path / "w2.safetensors")
    grids = {}
    for name, flags in {"sliced": ["--model", str(nested), "--bits", "2"],
                        "exported": ["--model", str(exported)]}.items():  # fmt: skip
        grids[name] = tmp_path / f"{name}.png"
        assert main(["sample", "--pipeline", str(tmp_path / "pipe"), *flags, "--samples", "2", "--steps", "2",
                     "--class-label", "3", "--out", str(grids[name]), "--device", "cpu"]) == 0  # fmt: skip
    assert grids["sliced"].read_bytes() == grids["exported"].read_bytes()

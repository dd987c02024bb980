"""README.md runs as written: each ```python block executes, every `ditq` command line parses, and the preset
table names every registered preset.

Blocks run in a fresh namespace, in a temporary folder, with tiny stand-ins where a block uses a name it does not
define (`vit`, `images`, `MyViT`: a small ViT-like model; `pipe`: a tiny random DiTPipeline; `path`: a folder
holding a tiny FLUX transformer) and with the bundled DiT-MNIST replaced by a one-block model of its input and
output shape, so that the whole file runs in seconds.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import ditq.bundled
from ditq.cli import _parser
from ditq.models import create
from ditq.recipes import PRESETS
from ditq.search.cli import build_parser as search_parser
from ditq.train import build_parser as train_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


PYTHON_BLOCKS = _blocks("python")


class MyViT(nn.Module):
    """A ViT-sized stand-in: patch embedding, one MLP block and a classification head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch, self.fc1, self.fc2 = nn.Linear(192, 64), nn.Linear(64, 128), nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, 16, 16) → 4 patches of 8×8 → (N, 10)
        patches = images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        tokens = self.patch(patches)  # (N, 4, 64)
        tokens = tokens + self.fc2(torch.nn.functional.gelu(self.fc1(tokens)))
        return self.head(tokens.mean(1))


def _tiny_flux_folder(tmp_path: Path) -> Path:
    from tests.integrations.tiny_diffusers import make_transformer

    make_transformer("FluxTransformer2DModel").save_pretrained(tmp_path / "flux" / "transformer")
    return tmp_path / "flux"


def _tiny_pipeline():
    from tests.integrations.tiny_diffusers import make_dit_pipeline

    return make_dit_pipeline()


STAND_INS = {"vit": lambda tmp: MyViT(), "MyViT": lambda tmp: MyViT, "images": lambda tmp: torch.randn(2, 3, 16, 16),
             "pipe": lambda tmp: _tiny_pipeline(), "path": _tiny_flux_folder}  # fmt: skip


def _uses(block: str, name: str) -> bool:
    return re.search(rf"\b{name}\b", block) is not None


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"python-{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_blocks_run(block, tmp_path, monkeypatch, one_thread):
    if "diffusers" in block or _uses(block, "pipe"):
        pytest.importorskip("diffusers")

    def open_tiny(ref, **options):
        assert ref == "DiT-MNIST", ref
        torch.manual_seed(0)
        return create(ref, depth=1, hidden_size=128, num_heads=2, patch_size=8).eval(), f"{ref} (tiny stand-in)"

    monkeypatch.setattr(ditq.bundled, "open_model", open_tiny)
    monkeypatch.chdir(tmp_path)
    namespace = {name: make(tmp_path) for name, make in STAND_INS.items() if _uses(block, name)}
    exec(compile(block, f"{README.name} python block", "exec"), namespace)


def _command_lines() -> list[str]:
    """Every `ditq ...` line of the bash blocks, comments dropped, continuation lines joined."""
    text = "\n".join(_blocks("bash")).replace("\\\n", " ")
    return [line.split(" # ")[0].strip() for line in text.splitlines() if line.startswith("ditq ")]


COMMAND_LINES = _command_lines()


def test_readme_shows_the_commands():
    assert {shlex.split(line)[1] for line in COMMAND_LINES} >= {"quantize", "sample", "eval", "bench", "search",
                                                                "train", "demo", "--version"}


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_readme_command_lines_parse(line):
    argv = shlex.split(line)[1:]
    own = {"train": train_parser, "search": search_parser}.get(argv[0])
    parser, argv = (own(), argv[1:]) if own else (_parser(), argv)
    if {"--help", "--version"} & set(argv):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 0
    else:
        parser.parse_args(argv)


def test_the_recipe_table_lists_every_preset():
    rows = re.findall(r"^\| `([\w-]+)` \|", README.read_text(encoding="utf-8"), flags=re.M)
    assert sorted(rows) == sorted(PRESETS)

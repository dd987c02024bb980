"""`ditq.sample`: the images `ditq sample` draws, deterministic by seed, every argument checked first."""

import numpy as np
import pytest
import torch
from PIL import Image

import ditq
import ditq.sampling
from ditq.cli import main
from ditq.grid import tile
from ditq.recipes import PRESETS
from tests.tiny import make_tiny_mnist_dit


@pytest.fixture(scope="module")
def quantized_ckpt(tmp_path_factory):
    model = ditq.quantize(make_tiny_mnist_dit(), PRESETS["w8a8"])  # dynamic activations: no calibration needed
    return ditq.save(model, tmp_path_factory.mktemp("sample") / "q.safetensors")


def test_the_cli_grid_is_made_of_the_api_images_of_the_same_seed(quantized_ckpt, tmp_path):
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(quantized_ckpt), "--samples", "4", "--steps", "2", "--seed", "3",
                 "--out", str(grid), "--device", "cpu"]) == 0
    model = ditq.load(quantized_ckpt).float()  # as the CLI opens a checkpoint: computed in float32
    images = ditq.sample(model, labels=[0, 1, 2, 3], steps=2, seed=3)
    assert images.shape == (4, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert np.array_equal(np.asarray(Image.open(grid).convert("RGB")), np.asarray(tile(images, per_row=4)))
    assert not torch.equal(images, ditq.sample(model, labels=[0, 1, 2, 3], steps=2, seed=4))  # the seed decides


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"labels": [0, 10]}, ValueError, r"labels \[10\] lie outside the model's classes 0..9"),
        ({"labels": [-1]}, ValueError, "outside the model's classes"),
        ({"labels": [1.0]}, TypeError, "labels must be ints"),
        ({"labels": [True]}, TypeError, "labels must be ints"),
        ({"labels": 3}, TypeError, "sequence of class indices"),
        ({"labels": "3"}, TypeError, "sequence of class indices"),
        ({"labels": torch.tensor([0.0])}, TypeError, "1-D integer tensor"),
        ({"labels": torch.tensor(3)}, TypeError, "1-D integer tensor"),
        ({"steps": 0}, ValueError, "steps must be a positive integer"),
        ({"steps": 999}, ValueError, "steps 999: .*nearest that work: 500 and 1000"),
        ({"steps": 2.5}, ValueError, "steps must be a positive integer"),
        ({"cfg_scale": float("nan")}, ValueError, "cfg_scale must be a finite number"),
        ({"cfg_scale": "4"}, ValueError, "cfg_scale must be a finite number"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0"),
        ({"sampler": "plms"}, ValueError, "sampler must be one of ddim, ddpm"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"model": torch.nn.Linear(2, 2)}, ValueError, "class-conditional zoo transformers .* Linear is not one"),
    ],
)
def test_bad_arguments_are_refused_before_sampling(monkeypatch, changes, error, message):
    def never(*args, **kwargs):
        raise AssertionError("sampling started before the arguments were checked")

    monkeypatch.setattr(ditq.sampling, "sample_images", never)
    call = {"model": make_tiny_mnist_dit(), "labels": [0, 1], "steps": 2} | changes
    with pytest.raises(error, match=message):
        ditq.sample(**call)


def test_a_compiled_model_is_checked_as_the_model_it_wraps():
    compiled = torch.compile(make_tiny_mnist_dit())  # lazy: nothing compiles unless it is called
    with pytest.raises(ValueError, match="outside the model's classes 0..9"):
        ditq.sample(compiled, labels=[12], steps=2)

"""Classifier-free guidance and sample_images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.diffusion import guided, sample_images
from ditq.diffusion.cfg import sample_generator
from tests.diffusion.stand_ins import TinyClassModel


class RecordingModel(nn.Module):
    """Conditional and unconditional outputs that differ in a known way; records every call."""

    in_channels, input_size, num_classes, learn_sigma = 2, 2, 5, True

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        is_null = (y == self.num_classes).float().reshape(-1, 1, 1, 1)
        eps = self.scale * x + 1.0 - 3.0 * is_null  # cond: x + 1, uncond: x − 2
        var = torch.full_like(x, 0.25) - 0.5 * is_null  # cond: 0.25, uncond: −0.25
        return torch.cat([eps, var], dim=1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 2, 2, 2, generator=g), torch.tensor([10, 500, 999]), torch.tensor([0, 3, 4])


def test_cfg_scale_one_is_the_plain_conditional_call():
    model = TinyClassModel()
    x, t, y = _inputs()[0][:, :, :2, :2], _inputs()[1], torch.tensor([0, 1, 2])
    assert torch.equal(guided(model, 1.0)(x, t, y), model(x, t, y))
    recorder = RecordingModel()
    guided(recorder, 1.0)(*_inputs())
    assert len(recorder.calls) == 1 and recorder.calls[0][0] == 3


@pytest.mark.parametrize("scale", [0.0, 1.5, 4.0])
def test_cfg_mixes_only_eps_channels(scale):
    model = RecordingModel()
    x, t, y = _inputs()
    out = guided(model, scale)(x, t, y)
    assert len(model.calls) == 1
    batch, labels = model.calls[0]
    assert batch == 6 and labels.tolist() == [0, 3, 4, 5, 5, 5]  # [y, null]
    eps_cond, eps_uncond = x + 1.0, x - 2.0
    torch.testing.assert_close(out[:, :2], eps_uncond + scale * (eps_cond - eps_uncond))
    torch.testing.assert_close(out[:, 2:], torch.full_like(x, 0.25))  # variance from the conditional half


def test_sample_images_shape_range_and_mode():
    tiny_model = TinyClassModel()
    tiny_model.train()
    images = sample_images(tiny_model, [0, 1, 2], steps=5, cfg_scale=2.0)
    assert images.shape == (3, 2, 4, 4)
    assert bool(images.isfinite().all()) and images.abs().max() <= 1.0
    assert tiny_model.training  # restored
    assert tiny_model.seen_training and not any(tiny_model.seen_training)  # eval while sampling


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sample_images_seed_determinism_and_batch_invariance(sampler, learn_sigma):
    model = TinyClassModel(learn_sigma=learn_sigma)
    labels = torch.tensor([0, 1, 2, 1, 0])
    kwargs = dict(steps=8, sampler=sampler, cfg_scale=1.5)
    a = sample_images(model, labels, seed=0, **kwargs)
    assert a.shape == (5, 2, 4, 4) and bool(a.isfinite().all())
    assert torch.equal(a, sample_images(model, labels, seed=0, **kwargs))
    assert not torch.equal(a, sample_images(model, labels, seed=1, **kwargs))
    assert torch.equal(sample_images(model, labels, seed=0, batch_size=2, **kwargs), a)
    assert torch.equal(sample_images(model, labels, seed=0, batch_size=5, **kwargs), a)
    # sample k depends only on (seed, k): a prefix of the labels gives the same first images
    assert torch.equal(sample_images(model, labels[:2], seed=0, **kwargs), a[:2])


def test_sample_images_edge_cases():
    tiny_model = TinyClassModel()
    assert sample_images(tiny_model, [], steps=2).shape == (0, 2, 4, 4)
    with pytest.raises(ValueError, match="sampler"):
        sample_images(tiny_model, [0], sampler="plms")
    with pytest.raises(ValueError, match="steps"):
        sample_images(tiny_model, [0], steps=0)


def test_sample_generators_differ_across_seed_and_index():
    draws = {(s, k): torch.randn(4, generator=sample_generator(s, k)) for s in range(3) for k in range(3)}
    values = list(draws.values())
    assert all(not torch.equal(values[i], values[j]) for i in range(len(values)) for j in range(i))
    assert torch.equal(draws[(1, 2)], torch.randn(4, generator=sample_generator(1, 2)))

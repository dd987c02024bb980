"""DDPM / DDIM samplers over respaced chains."""

from __future__ import annotations

import pytest
import torch

from ditq.diffusion import GaussianDiffusion, create_diffusion
from ditq.diffusion.samplers import standard_normal
from tests.diffusion.stand_ins import original_alphas_cumprod

SHAPE = (3, 2, 4, 4)


def _point_mass_oracle(target: torch.Tensor, learn_sigma: bool):
    """Exact ε for data that is always `target`: ε = (x_t − √ᾱ_t c) / √(1 − ᾱ_t), ᾱ at the ORIGINAL t."""
    alphas_cumprod = torch.from_numpy(original_alphas_cumprod()).float()

    def model_fn(x, t):
        ab = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return model_fn


@pytest.mark.parametrize(
    ("sampler", "respacing", "eta", "learn_sigma"),
    [
        ("ddim", "ddim50", 0.0, True),
        ("ddim", "ddim50", 1.0, False),
        ("ddim", "25", 0.0, False),
        ("ddpm", "50", 0.0, True),
        ("ddpm", "ddim20", 0.0, False),
    ],
)
def test_oracle_recovers_single_point_distribution(sampler, respacing, eta, learn_sigma):
    target = torch.linspace(-0.9, 0.9, 32).reshape(1, 2, 4, 4).expand(SHAPE)
    diffusion = create_diffusion(respacing, learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(0)
    x = diffusion.sample(
        _point_mass_oracle(target, learn_sigma), SHAPE, sampler=sampler, eta=eta, generator=g
    )
    torch.testing.assert_close(x, target, atol=1e-3, rtol=0)


def test_ddim_eta0_is_deterministic_given_noise():
    diffusion = create_diffusion("ddim10", learn_sigma=True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    def model_fn(x, t):
        return torch.tanh(torch.cat([x, -x], dim=1) + t.float().reshape(-1, 1, 1, 1) / 1000)

    a = diffusion.sample(model_fn, SHAPE, noise=noise)
    torch.manual_seed(1)  # the global RNG must play no part
    b = diffusion.sample(model_fn, SHAPE, noise=noise)
    assert torch.equal(a, b)


def test_model_receives_original_timesteps_in_descending_order():
    diffusion = create_diffusion("ddim50", learn_sigma=False)
    seen = []

    def model_fn(x, t, y):
        seen.append(t.clone())
        assert torch.equal(y, torch.tensor([7, 8, 9]))
        return torch.zeros_like(x)

    diffusion.sample(model_fn, SHAPE, sampler="ddpm", model_kwargs={"y": torch.tensor([7, 8, 9])})
    assert [int(t[0]) for t in seen] == list(range(980, -1, -20))
    assert all(t.dtype == torch.long and t.shape == (3,) and bool((t == t[0]).all()) for t in seen)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_generator_seed_same_samples(sampler):
    diffusion = create_diffusion("10", learn_sigma=True)

    def model_fn(x, t):
        return torch.tanh(torch.cat([0.5 * x, x], dim=1))

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return diffusion.sample(model_fn, SHAPE, sampler=sampler, eta=0.5, generator=gen, progress=True)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_per_sample_generators_are_batch_independent():
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    batch = standard_normal((3, 2, 2), gens, "cpu")
    for k in range(3):
        assert torch.equal(batch[k], torch.randn(2, 2, generator=torch.Generator().manual_seed(k)))
    with pytest.raises(ValueError):
        standard_normal((2, 2, 2), gens, "cpu")


def test_bad_arguments_raise():
    diffusion = create_diffusion("10")
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(lambda x, t: x, SHAPE, sampler="euler")
    with pytest.raises(ValueError, match="noise"):
        diffusion.sample(lambda x, t: torch.cat([x, x], 1), SHAPE, noise=torch.zeros(1, 2, 4, 4))


def test_create_diffusion_defaults():
    diffusion = create_diffusion()
    assert isinstance(diffusion, GaussianDiffusion)
    assert diffusion.num_timesteps == 1000 and diffusion.learn_sigma
    assert torch.equal(diffusion.timestep_map, torch.arange(1000))
    assert create_diffusion(None).num_timesteps == 1000

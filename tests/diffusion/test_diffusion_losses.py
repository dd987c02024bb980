"""Hybrid training loss: L_simple + L_vlb with a stop-gradient on ε̂."""

from __future__ import annotations

import math

import pytest
import torch

from ditq.diffusion import create_diffusion
from ditq.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl


def _batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 2, 4, 4, generator=g) * 2 - 1
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = 1.0, -1.0  # hit both edge bins of the decoder likelihood
    noise = torch.randn(n, 2, 4, 4, generator=g)
    return x0, noise


def _oracle(noise, v_value: float | None):
    """Model that returns the true ε (and a constant v channel when σ is learned)."""

    def model_fn(x, t):
        if v_value is None:
            return noise.clone()
        return torch.cat([noise, torch.full_like(noise, v_value)], dim=1)

    return model_fn


def test_oracle_eps_gives_zero_mse_and_zero_kl_with_posterior_variance():
    diffusion = create_diffusion("", learn_sigma=True)
    x0, noise = _batch()
    t = torch.tensor([0, 1, 10, 300, 999, 0])
    out = diffusion.training_losses(_oracle(noise, -1.0), x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"}
    assert all(v.shape == (6,) for v in out.values())
    torch.testing.assert_close(out["mse"], torch.zeros(6))
    assert bool((out["vb"] >= 0).all())
    # v = −1 is exactly the posterior variance and ε is exact, so KL = 0 for t > 0.
    torch.testing.assert_close(out["vb"][1:5], torch.zeros(4), atol=1e-4, rtol=0)
    # at t = 0 the term is the decoder NLL in bits, strictly positive
    assert out["vb"][0].item() > 0
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])


def test_vb_nonnegative_for_an_imperfect_model():
    diffusion = create_diffusion("", learn_sigma=True)
    x0, noise = _batch(seed=1)
    t = torch.tensor([0, 3, 50, 400, 800, 999])

    def model_fn(x, t):
        return torch.tanh(torch.cat([x, x * 0.3], dim=1))

    out = diffusion.training_losses(model_fn, x0, t, noise=noise)
    assert bool((out["vb"] >= 0).all()) and bool((out["mse"] > 0).all())
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])  # DiT default: vb unscaled


def test_vb_trains_only_the_variance_channels():
    diffusion = create_diffusion("", learn_sigma=True)
    x0, noise = _batch()
    t = torch.tensor([0, 1, 10, 300, 999, 5])
    output = torch.zeros(6, 4, 4, 4, requires_grad=True)
    out = diffusion.training_losses(lambda x, t: output * 1.0, x0, t, noise=noise)
    (grad,) = torch.autograd.grad(out["vb"].sum(), output)
    assert torch.count_nonzero(grad[:, :2]) == 0
    assert torch.count_nonzero(grad[:, 2:]) > 0


def test_fixed_variance_loss_is_plain_mse():
    diffusion = create_diffusion("", learn_sigma=False)
    x0, noise = _batch()
    t = torch.tensor([0, 1, 10, 300, 999, 5])
    eps_hat = noise * 0.5
    out = diffusion.training_losses(lambda x, t: eps_hat, x0, t, noise=noise)
    expected = ((noise - eps_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], expected)
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["vb"], torch.zeros(6))


def test_respaced_training_calls_model_with_original_timesteps():
    diffusion = create_diffusion("ddim50", learn_sigma=False)
    x0, noise = _batch()
    seen = []

    def model_fn(x, t, y):
        seen.append((t.clone(), y.clone()))
        return torch.zeros_like(x)

    y = torch.arange(6)
    diffusion.training_losses(
        model_fn, x0, torch.tensor([0, 1, 2, 3, 48, 49]), model_kwargs={"y": y}, noise=noise
    )
    assert seen[0][0].tolist() == [0, 20, 40, 60, 960, 980]
    assert seen[0][0].dtype == torch.long
    assert torch.equal(seen[0][1], y)


def test_wrong_channel_count_and_timesteps_raise():
    diffusion = create_diffusion("", learn_sigma=True)
    x0, noise = _batch()
    t = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="channels"):
        diffusion.training_losses(lambda x, t: x, x0, t, noise=noise)
    with pytest.raises(ValueError):
        diffusion.training_losses(lambda x, t: torch.cat([x, x], 1), x0, t + 1000, noise=noise)


def test_discretized_likelihood_sums_to_one_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.7, math.log(0.02)), (-0.95, math.log(0.5))]:
        means = torch.full_like(levels, mean)
        log_scales = torch.full_like(levels, log_scale)
        total = discretized_gaussian_log_likelihood(levels, means, log_scales).exp().sum()
        assert total.item() == pytest.approx(1.0, abs=2e-3)


def test_normal_kl_closed_form():
    zero = torch.zeros(3)
    torch.testing.assert_close(normal_kl(zero, zero, zero, zero), zero)
    # KL(N(1, 1) ‖ N(0, e²)) = ½(−1 + 2 + e⁻² + e⁻²)
    kl = normal_kl(torch.ones(1), torch.zeros(1), torch.zeros(1), torch.full((1,), 2.0))
    assert kl.item() == pytest.approx(0.5 * (1 + 2 * math.exp(-2)))

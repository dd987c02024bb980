"""Schedule values, posterior coefficients and timestep respacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditq.diffusion.schedule import (
    NoiseSchedule,
    linear_betas,
    make_schedule,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean,
    q_sample,
    space_timesteps,
)


def test_linear_betas_match_ho_et_al():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == 1e-4 and betas[-1].item() == 0.02
    np.testing.assert_array_equal(betas.numpy(), np.linspace(1e-4, 0.02, 1000))


def test_linear_betas_scale_with_step_count():
    betas = linear_betas(250)
    assert betas[0].item() == pytest.approx(4e-4) and betas[-1].item() == pytest.approx(0.08)


def test_alphas_cumprod_known_values():
    s = make_schedule(1000)
    assert s.alphas_cumprod[0].item() == pytest.approx(0.9999, rel=1e-15)
    assert s.alphas_cumprod[499].item() == pytest.approx(0.07858724288177824, rel=1e-12)
    assert s.alphas_cumprod[999].item() == pytest.approx(4.035829765375676e-05, rel=1e-10)
    assert s.alphas_cumprod_prev[0].item() == 1.0


def test_posterior_variance_known_values():
    s = make_schedule(1000)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_variance[1].item() == pytest.approx(5.4531876613021935e-05, rel=1e-12)
    assert s.posterior_variance[999].item() == pytest.approx(0.01999998352656061, rel=1e-12)
    assert bool((s.posterior_variance <= s.betas).all())
    # log is clipped at t = 0 by borrowing β̃_1
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(5.4531876613021935e-05))
    assert s.fixed_large_log_variance[5].item() == pytest.approx(math.log(s.betas[5].item()))


def test_posterior_mean_of_noiseless_path_is_previous_marginal_mean():
    # With x_t = √ᾱ_t x_0 (no noise), μ̃_t must equal √ᾱ_{t−1} x_0.
    s = make_schedule(1000)
    x0 = torch.linspace(-1, 1, 24).reshape(2, 3, 2, 2)
    t = torch.tensor([1, 700])
    x_t = q_sample(s, x0, t, torch.zeros_like(x0))
    expected = s.alphas_cumprod_prev[t].sqrt().float().reshape(-1, 1, 1, 1) * x0
    torch.testing.assert_close(q_posterior_mean(s, x0, x_t, t), expected, rtol=1e-5, atol=1e-6)


def test_eps_and_xstart_predictions_invert_q_sample():
    s = make_schedule(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = q_sample(s, x0, t, eps)
    torch.testing.assert_close(predict_xstart_from_eps(s, x_t, t, eps), x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(predict_eps_from_xstart(s, x_t, t, x0), eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("num_timesteps", "request_", "expected"),
    [
        (1000, "ddim50", list(range(0, 1000, 20))),
        (1000, "ddim25", list(range(0, 1000, 40))),
        (1000, "", list(range(1000))),
        (1000, "1000", list(range(1000))),
        (10, "ddim3", [0, 4, 8]),
        (10, [1], [0]),
    ],
)
def test_space_timesteps_exact(num_timesteps, request_, expected):
    assert space_timesteps(num_timesteps, request_) == expected


def test_space_timesteps_250_uses_rounded_fractional_stride():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250
    assert kept[:6] == [0, 4, 8, 12, 16, 20]
    assert kept[120:128] == [481, 485, 489, 493, 497, 502, 506, 510]
    assert kept[-4:] == [987, 991, 995, 999]


def test_space_timesteps_sections():
    # 300 steps in sections of 100: 10 from the first, 15 from the second, 20 from the third.
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    assert kept[:10] == list(range(0, 100, 11))
    assert kept[10:14] == [100, 107, 114, 121] and kept[24:26] == [199, 200]
    assert kept[-3:] == [289, 294, 299]


@pytest.mark.parametrize(("num_timesteps", "request_"), [(10, "ddim6"), (1000, "1001"), (100, "60,60")])
def test_space_timesteps_rejects_impossible_requests(num_timesteps, request_):
    with pytest.raises(ValueError):
        space_timesteps(num_timesteps, request_)


@pytest.mark.parametrize("respacing", ["ddim50", "250", "10,20,5"])
def test_respaced_chain_keeps_marginals(respacing):
    base = make_schedule(1000)
    s = make_schedule(1000, respacing)
    kept = space_timesteps(1000, respacing)
    assert s.num_timesteps == len(kept)
    assert s.timestep_map.tolist() == kept
    torch.testing.assert_close(s.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)


def test_schedule_rejects_bad_betas():
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64))


def test_schedule_to_device_copies_coefficients_and_keeps_the_map():
    s = make_schedule(1000, "ddim50")
    moved = s.to("cpu")
    assert moved is not s and moved.num_timesteps == 50
    assert torch.equal(moved.posterior_mean_coef1, s.posterior_mean_coef1)
    assert moved.posterior_mean_coef1.dtype == torch.float64
    assert torch.equal(moved.timestep_map, s.timestep_map)

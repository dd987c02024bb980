"""Metrics against known answers: closed-form FID, IS bounds, k-NN precision/recall, PSNR, SSIM."""

import numpy as np
import pytest
import torch

from ditq.eval.metrics import (
    class_accuracy,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    inception_score,
    inception_score_splits,
    precision_recall,
    psnr,
    ssim,
)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def diag_fid(mu1, a, mu2, b) -> float:
    """Closed form for diagonal covariances a, b (variances)."""
    return float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())


# --- FID ----------------------------------------------------------------------------------------


def test_fid_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=16), random_spd(16, rng)
    assert abs(fid_from_stats(mu, s, mu, s)) < 1e-8


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        diag_fid(mu1, a, mu2, b), rel=1e-9
    )


def test_fid_rotation_invariant():
    """Rotating both Gaussians by one orthogonal Q leaves FID at the diagonal closed form."""
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    a, b = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
    fid = fid_from_stats(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(diag_fid(mu1, a, mu2, b), rel=1e-7)


def test_fid_from_gaussian_samples_near_closed_form():
    rng = np.random.default_rng(3)
    d, n = 8, 40000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(a)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(b)
    assert fid_from_features(x, y) == pytest.approx(diag_fid(mu1, a, mu2, b), rel=0.05)


def test_fid_singular_covariances_stay_finite():
    """Fewer samples than dimensions: singular covariances, the eps fallback keeps FID finite."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))
    fid = fid_from_features(x, y)
    assert np.isfinite(fid) and fid > 0
    assert abs(fid_from_features(x, x)) < 1e-3


def test_fid_large_imaginary_part_raises():
    with pytest.raises(ValueError, match="imaginary"):
        fid_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -4.0]))


def test_fid_shape_mismatch_raises():
    with pytest.raises(ValueError, match="do not match"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_stats(torch.from_numpy(f))
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError):
        feature_stats(f[:1])


# --- Inception score ----------------------------------------------------------------------------


def test_is_uniform_is_one():
    assert inception_score(np.zeros((100, 10))) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_is_confident_over_k_classes_is_k(k):
    logits = np.full((10 * k, 10), -1e4)
    logits[np.arange(10 * k), np.arange(10 * k) % k] = 0.0
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)


def test_is_splits_and_bounds():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(400, 10)) * 3
    per_split = inception_score_splits(logits, splits=4)
    assert per_split.shape == (4,) and ((per_split >= 1.0) & (per_split <= 10.0)).all()
    assert inception_score(logits, splits=4) == pytest.approx(per_split.mean())
    one_hot = np.where(np.eye(10)[np.arange(400) % 10] > 0, 0.0, -np.inf)  # exact one-hot softmax
    np.testing.assert_allclose(inception_score_splits(one_hot, splits=4), 10.0)


def test_is_rejects_bad_splits():
    with pytest.raises(ValueError):
        inception_score(np.zeros((4, 10)), splits=5)


# --- precision / recall -------------------------------------------------------------------------


def test_pr_identical_sets_are_one():
    x = np.random.default_rng(7).normal(size=(300, 16))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_pr_disjoint_far_sets_are_zero():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 100.0
    assert precision_recall(x, y) == (0.0, 0.0)


def test_pr_half_realistic_samples():
    """Half the fakes copy real points, half sit far away: precision is exactly 1/2."""
    rng = np.random.default_rng(9)
    real = rng.normal(size=(200, 8))
    fake = np.concatenate([real[:100], rng.normal(size=(100, 8)) + 50.0])
    precision, recall = precision_recall(real, fake, k=3, chunk=64)
    assert precision == 0.5
    assert 0.5 <= recall <= 1.0  # the copied half is covered; the rest depends on radii


def test_pr_chunking_does_not_change_result():
    rng = np.random.default_rng(10)
    real, fake = rng.normal(size=(150, 6)), rng.normal(size=(120, 6)) * 1.3
    assert precision_recall(real, fake, chunk=7) == precision_recall(real, fake, chunk=4096)


def test_pr_rejects_bad_k():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x, x, k=3)


# --- class accuracy -----------------------------------------------------------------------------


def test_class_accuracy():
    logits = np.eye(4)[[0, 1, 2, 3]]
    assert class_accuracy(logits, np.array([0, 1, 2, 0])) == 0.75
    with pytest.raises(ValueError):
        class_accuracy(logits, np.array([0, 1]))


# --- PSNR / SSIM --------------------------------------------------------------------------------


def test_psnr_identical_is_inf():
    a = np.random.default_rng(11).uniform(-1, 1, (3, 32, 32))
    per_image = psnr(a, a, data_range=2.0)
    assert per_image.shape == (3,) and np.isinf(per_image).all()


def test_psnr_known_noise():
    rng = np.random.default_rng(12)
    a = rng.uniform(0, 255, (4, 3, 16, 16))
    delta = 5.0
    b = a + delta * rng.choice([-1.0, 1.0], size=a.shape)  # MSE exactly delta^2
    per_image = psnr(a, b, data_range=255.0)
    assert per_image.shape == (4,)
    np.testing.assert_allclose(per_image, 10 * np.log10(255.0**2 / delta**2))


def test_ssim_identical_is_one():
    a = np.random.default_rng(13).uniform(-1, 1, (2, 1, 32, 32))
    per_image = ssim(a, a, data_range=2.0)
    assert per_image.shape == (2,)
    np.testing.assert_allclose(per_image, 1.0)


def test_ssim_constant_images_closed_form():
    u, v, L = 0.2, -0.5, 2.0
    c1 = (0.01 * L) ** 2
    a, b = np.full((1, 20, 20), u), np.full((1, 20, 20), v)
    assert ssim(a, b, data_range=L)[0] == pytest.approx((2 * u * v + c1) / (u * u + v * v + c1))


def brute_force_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM of two 2-D images, window by window, straight from the definition."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_noise_matches_definition_and_drops_with_noise():
    rng = np.random.default_rng(14)
    a = rng.uniform(-1, 1, (1, 18, 20))
    scores = []
    for sigma in (0.05, 0.2, 0.8):
        b = a + sigma * rng.normal(size=a.shape)
        per_image = ssim(a, b, data_range=2.0)
        assert per_image[0] == pytest.approx(brute_force_ssim(a[0], b[0], 2.0), rel=1e-9)
        scores.append(per_image[0])
    assert scores[0] > scores[1] > scores[2]


def test_pixel_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        psnr(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), 1.0)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), 1.0)

"""Fidelity metrics as pure functions on arrays: FID, IS, precision/recall, accuracy, PSNR, SSIM.

They know nothing about which network produced the features, so the same code scores DiT-MNIST
(MNIST feature net) and ImageNet models (Inception, ``ditq.eval.inception``). Statistics are
computed in float64 whatever the input dtype.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

ArrayLike = np.ndarray | torch.Tensor

PR_NEIGHBOURS = 3  # k of precision/recall's k-nearest-neighbour balls
MIN_SAMPLES = PR_NEIGHBOURS + 1  # the fewest samples every score can be computed on (FID's covariance needs 2)


def check_scored_samples(samples: int, flag: str | None = None) -> None:
    """Refuse a sample count too small for the scores, named by the caller's `flag` where it has one."""
    if samples < MIN_SAMPLES:
        what = f"{samples} samples" if flag is None else f"{flag} {samples}"
        raise ValueError(f"{what}: too few to score; FID and precision/recall need at least {MIN_SAMPLES} samples")


def _np(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
# ---------------------------------------------------------------------------------------------


def feature_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of features ``(N, D)``, in float64."""
    f = _np(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs features of shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_stats(mu1: ArrayLike, s1: ArrayLike, mu2: ArrayLike, s2: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2).

    The matrix square root of s1·s2 comes from ``scipy.linalg.sqrtm``. When the product is near
    singular (too few samples for the dimension) and the root is not finite, ``eps`` is added to
    both diagonals and the root retried. A small imaginary part is numerical noise and dropped;
    a large one (diagonal |imag| > 1e-3) means the inputs are not covariance matrices and raises.
    """
    mu1, mu2 = np.atleast_1d(_np(mu1)), np.atleast_1d(_np(mu2))
    s1, s2 = np.atleast_2d(_np(s1)), np.atleast_2d(_np(s2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"FID stats do not match: mu1 {mu1.shape}, s1 {s1.shape}, mu2 {mu2.shape}, s2 {s2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular-matrix chatter; handled below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("FID: matrix square root is not finite even after adding eps to the diagonal")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: matrix square root has a large imaginary part {np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    fid = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return float(fid)


def fid_from_features(feats1: ArrayLike, feats2: ArrayLike) -> float:
    """FID between two feature sets ``(N1, D)`` and ``(N2, D)``."""
    return fid_from_stats(*feature_stats(feats1), *feature_stats(feats2))


# ---------------------------------------------------------------------------------------------
# Inception score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y))
# ---------------------------------------------------------------------------------------------


def inception_score_splits(logits: ArrayLike, splits: int) -> np.ndarray:
    """IS of each of ``splits`` equal consecutive chunks of class logits ``(N, K)``, shape (splits,).

    Report mean ± std of these when a spread is wanted; ``inception_score`` is their mean.
    """
    lg = _np(logits)
    if lg.ndim != 2 or lg.shape[0] < 1:
        raise ValueError(f"inception_score needs logits of shape (N, K), got {lg.shape}")
    if not 1 <= splits <= lg.shape[0]:
        raise ValueError(f"splits must be in [1, N={lg.shape[0]}], got {splits}")
    logp = lg - lg.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))  # log softmax (N, K)
    scores = []
    for part in np.array_split(logp, splits):
        p = np.exp(part)
        with np.errstate(divide="ignore", invalid="ignore"):  # p = 0 terms are masked to 0 below
            log_py = np.log(p.mean(axis=0, keepdims=True))  # log marginal (1, K)
            kl = np.where(p > 0, p * (part - log_py), 0.0).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return np.asarray(scores)


def inception_score(logits: ArrayLike, splits: int = 1) -> float:
    """IS of class logits ``(N, K)``, averaged over ``splits`` equal chunks.

    Ranges from 1 (every sample has the same class distribution) to K (confident and evenly spread
    over all K classes). Works in log space, so saturated softmaxes do not produce NaNs.
    """
    return float(inception_score_splits(logits, splits).mean())


# ---------------------------------------------------------------------------------------------
# Precision / recall (Kynkäänniemi et al. 2019): k-NN hypersphere manifolds
# ---------------------------------------------------------------------------------------------


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(len(a), len(b))``, clamped at 0 against round-off."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _knn_radii(feats: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (self excluded)."""
    radii = np.empty(len(feats))
    for start in range(0, len(feats), chunk):
        d = _sq_dists(feats[start : start + chunk], feats)  # (c, N); self at distance ~0
        radii[start : start + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    inside = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), chunk):
        d = _sq_dists(points[start : start + chunk], centres)  # (c, M)
        inside[start : start + chunk] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(
    real_feats: ArrayLike, fake_feats: ArrayLike, k: int = PR_NEIGHBOURS, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall.

    Each set's manifold is the union of balls around its points, radius = distance to the k-th
    nearest neighbour in the same set. Precision: share of fake points inside the real manifold
    (are samples realistic?). Recall: share of real points inside the fake manifold (is the data
    covered?).
    """
    real, fake = _np(real_feats), _np(fake_feats)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) and (M, D) features, got {real.shape}, {fake.shape}")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k must be in [1, min(N, M) - 1], got k={k} for N={len(real)}, M={len(fake)}")
    real_radii = _knn_radii(real, k, chunk)
    fake_radii = _knn_radii(fake, k, chunk)
    precision = _coverage(fake, real, real_radii, chunk)
    recall = _coverage(real, fake, fake_radii, chunk)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# Class accuracy of conditional samples
# ---------------------------------------------------------------------------------------------


def class_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Share of rows whose arg-max logit equals the label (the class the sample was asked for)."""
    lg, y = _np(logits), _np(labels, np.int64)
    if lg.ndim != 2 or y.shape != (lg.shape[0],):
        raise ValueError(f"class_accuracy needs logits (N, K) and labels (N,), got {lg.shape}, {y.shape}")
    if len(y) == 0:
        raise ValueError("class_accuracy needs at least one sample")
    return float((lg.argmax(axis=1) == y).mean())


# ---------------------------------------------------------------------------------------------
# Pixel metrics: quantized vs full-precision samples from the same seeds and noise
# ---------------------------------------------------------------------------------------------


def _pair(a: ArrayLike, b: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _np(a), _np(b)
    if x.shape != y.shape or x.ndim not in (3, 4):
        raise ValueError(
            f"{name} needs two image batches of one shape (N, H, W) or (N, C, H, W), got {x.shape}, {y.shape}"
        )
    if x.ndim == 3:
        x, y = x[:, None], y[:, None]
    return x, y  # (N, C, H, W)


def psnr(a: ArrayLike, b: ArrayLike, data_range: float) -> np.ndarray:
    """PSNR in dB per image, shape ``(N,)`` (take ``.mean()`` for one number); identical → +inf.

    data_range is the span of valid values (2.0 for [-1, 1], 255 for uint8).
    """
    x, y = _pair(a, b, "psnr")
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filtering over the last two axes of ``(N, C, H, W)``."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    n, c, h, w = t.shape
    kern = torch.from_numpy(g)
    t = t.reshape(n * c, 1, h, w)
    t = torch.nn.functional.conv2d(t, kern.view(1, 1, -1, 1))  # along H
    t = torch.nn.functional.conv2d(t, kern.view(1, 1, 1, -1))  # along W
    return t.reshape(n, c, t.shape[-2], t.shape[-1]).numpy()


def ssim(a: ArrayLike, b: ArrayLike, data_range: float, win_size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM (Wang et al. 2004) per image, shape ``(N,)`` (take ``.mean()`` for one number).

    Gaussian window 11, σ 1.5, K1 = 0.01, K2 = 0.03, local statistics over 'valid' windows only
    (no padding), averaged over positions and channels. Identical images give 1.
    """
    x, y = _pair(a, b, "ssim")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs images at least {win_size}x{win_size}, got {x.shape[-2:]}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    g = _gaussian_window(win_size, sigma)
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x**2
    var_y = _filter_valid(y * y, g) - mu_y**2
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).reshape(len(x), -1).mean(axis=1)

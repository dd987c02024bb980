"""The MNIST feature network: a small CNN whose penultimate layer is the feature space for
FID / precision-recall on DiT-MNIST and whose logits give class accuracy and IS.

Inception features mean little on 32x32 grey digits, so, as SPEC §8 says, DiT-MNIST is scored in
the space of a classifier trained by this project on MNIST test images 0–7999 (8000–9999 held out).
The weights ship as ``ditq/assets/feature_net.safetensors`` (config in the safetensors metadata)
and the real-image statistics as ``ditq/assets/mnist_feature_stats.npz``; both are made by
``scripts/make_feature_net.py``.

Inputs everywhere are in DiT-MNIST model space: ``float (N, 1, 32, 32)`` in [-1, 1]
(see ``ditq.data.to_model_space``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ditq.atomic import atomic_path

FORMAT = "ditq-feature-net"
FORMAT_VERSION = 1
STATS_VERSION = 1
IMAGE_SHAPE = (1, 32, 32)  # (C, H, W) of the model-space images the net reads


def assets_dir() -> Path:
    """Folder of the bundled assets (``ditq/assets``)."""
    return Path(__file__).resolve().parent.parent / "assets"


def default_feature_net_path() -> Path:
    return assets_dir() / "feature_net.safetensors"


def default_stats_path() -> Path:
    return assets_dir() / "mnist_feature_stats.npz"


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class FeatureNet(nn.Module):
    """Three conv stages (conv-BN-ReLU-maxpool) → linear + BatchNorm = features → ReLU → logits.

    The features are taken before the activation: after a ReLU (or even a GELU) some units are
    dead on all of MNIST, which makes the feature covariance singular and FID's matrix square
    root ill conditioned. The BatchNorm gives every feature unit a comparable scale.
    """

    def __init__(
        self, widths: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.config = {"widths": list(widths), "feature_dim": feature_dim, "num_classes": num_classes}
        stages: list[nn.Module] = []
        in_ch = 1
        for w in widths:
            stages += [
                nn.Conv2d(in_ch, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_ch = w
        self.convs = nn.Sequential(*stages)
        side = 32 // 2 ** len(widths)
        self.fc_features = nn.Linear(in_ch * side * side, feature_dim, bias=False)
        self.bn_features = nn.BatchNorm1d(feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.fc_logits = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 1, 32, 32) in [-1, 1] → features (N, feature_dim), logits (N, num_classes)."""
        h = self.convs(x).flatten(1)  # (N, C * side * side)
        feats = self.bn_features(self.fc_features(h))  # (N, feature_dim)
        logits = self.fc_logits(self.dropout(F.relu(feats)))  # (N, num_classes)
        return feats, logits


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (±10°, scale 0.9–1.1, shift ±2 px); background stays -1."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 16)  # 2 px in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(x)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0, so move the background to 0 first and back after.
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_feature_net(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    augment: bool = True,
) -> FeatureNet:
    """Train a ``FeatureNet`` with AdamW + one-cycle LR; the same seed gives the same weights.

    images: float (N, 1, 32, 32) in [-1, 1]; labels: int (N,) in 0–9. Returns the net in eval mode.
    """
    _check_model_space(images)
    y_all = torch.as_tensor(labels, dtype=torch.int64)
    if y_all.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(y_all.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")

    # Parameter init and dropout draw from torch's global generator: seed it inside fork_rng, so
    # the weights depend on ``seed`` alone and the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet().to(device)
        _fit(net, images.to(torch.float32), y_all, epochs, batch_size, lr, seed, device, progress, augment)
    return net.eval()


def _fit(
    net: FeatureNet,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | torch.device,
    progress: bool,
    augment: bool,
) -> None:
    """AdamW + one-cycle LR over shuffled mini-batches; shuffling and jitter use their own generator."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(x_all.shape[0] / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="feature net", unit="step")
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(x_all.shape[0], generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = _augment(x_all[idx], gen) if augment else x_all[idx]
            _, logits = net(x.to(device))  # (B, 10)
            loss = F.cross_entropy(logits, y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def features_and_logits(
    net: FeatureNet, images: torch.Tensor | np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``float32 (N, feature_dim)`` and logits ``float32 (N, 10)`` of model-space images.

    Runs in eval mode on the net's device (and restores the net's mode after).
    """
    x_all = torch.as_tensor(images)
    _check_model_space(x_all)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    feats, logits = [], []
    for start in range(0, x_all.shape[0], batch_size):
        f, lg = net(x_all[start : start + batch_size].to(device=device, dtype=torch.float32))
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    net.train(was_training)
    if not feats:
        d, k = net.config["feature_dim"], net.config["num_classes"]
        return np.zeros((0, d), np.float32), np.zeros((0, k), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _check_model_space(x: torch.Tensor) -> None:
    if not x.is_floating_point() or x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"expected model-space images float (N, 1, 32, 32) in [-1, 1], got {x.dtype} "
            f"{tuple(x.shape)}; convert uint8 digits with ditq.data.to_model_space"
        )


# ---------------------------------------------------------------------------------------------
# Files: weights (safetensors) and real-image statistics (npz)
# ---------------------------------------------------------------------------------------------


def save_feature_net(net: FeatureNet, path: str | Path, extra: dict | None = None) -> None:
    """Write weights + config to ``path`` atomically (temp file in the same folder, fsync, rename).

    The metadata is one key, ``"ditq"``, holding a sorted-key JSON header: safetensors stores
    metadata as a hash map whose order varies run to run, and a single key keeps the bytes (and
    so the SHA-256 recorded in the statistics file) reproducible.
    """
    path = Path(path)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "config": net.config, "info": extra or {}}
    meta = {"ditq": json.dumps(header, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_feature_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a ``FeatureNet`` (default: the bundled one) in eval mode; strict key/shape check."""
    path = default_feature_net_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature net weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        try:
            header = json.loads((f.metadata() or {})["ditq"])
        except (KeyError, json.JSONDecodeError):
            header = {}
        if not isinstance(header, dict) or header.get("format") != FORMAT or "config" not in header:
            raise ValueError(f"{path} is not a ditq feature net file (no valid 'ditq' metadata header)")
        if int(header.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has feature-net format version {header['version']}, newer than {FORMAT_VERSION}"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = header["config"]
    net = FeatureNet(
        widths=tuple(config["widths"]), feature_dim=config["feature_dim"], num_classes=config["num_classes"]
    )
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file; ties the statistics file to the weights it was computed with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_real_stats(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the real-image statistics npz atomically (compressed, no pickled objects)."""
    arrays = {"version": np.array(STATS_VERSION), **arrays}
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise ValueError(f"stats entry {key!r} is an object array; it would need pickle")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    with atomic_path(path) as tmp:
        write(str(tmp))


def load_real_stats(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Real-image statistics of the feature net (default: the bundled npz).

    Keys: ``mu``/``sigma`` (all 10,000 images), ``mu_half0``/``sigma_half0`` (0–4999),
    ``mu_half1``/``sigma_half1`` (5000–9999), ``fid_floor`` (FID half0 vs half1),
    ``fid_floor_random_split`` (FID of a random 5000/5000 split: sampling noise alone),
    ``feats`` and ``feats_indices`` (real features of a fixed 2,000-image subset, for
    precision/recall),
    ``heldout_accuracy``, ``feature_net_sha256``, ``version``.
    """
    path = default_stats_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature statistics not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        stats = {k: data[k] for k in data.files}
    missing = {"mu", "sigma", "mu_half0", "sigma_half0", "mu_half1", "sigma_half1"} - stats.keys()
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    return stats

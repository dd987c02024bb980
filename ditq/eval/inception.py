"""FID Inception-v3 for real models, and ADM reference batches (FID / sFID / IS / precision).

The network is the one the TensorFlow FID code uses (inception-2015-12-05), in the layout of
pytorch-fid's ``pt_inception-2015-12-05`` state dict: torchvision's Inception-v3 names
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, …, ``fc.weight`` with
1008 classes, no aux head), plus the three FID differences from torchvision's blocks:
average pools that do not count padding (blocks A, C, E), and a max pool in the pool branch of
the last E block. Nothing is downloaded: the user supplies the weights file by path.

Outputs, per image:
- ``pool`` (2048,): global average pool after Mixed_7c (TF ``pool_3``), the FID features;
- ``spatial`` (7·17·17 = 2023,): first 7 channels of Mixed_6d's 1x1 branch (TF ``mixed_6/conv``),
  ADM's sFID features (the size follows the 299x299 input);
- ``logits`` (1008,): ``pool @ fc.weight.T``. ADM's evaluator multiplies by the softmax weight
  only, so the bias is left out by default (``logits_bias=True`` adds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditq.eval.metrics import PR_NEIGHBOURS, feature_stats, fid_from_stats, inception_score, precision_recall

SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of Mixed_6d.branch1x1's 192 channels


# ---------------------------------------------------------------------------------------------
# Blocks (torchvision layout; FID pooling variants)
# ---------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, as TF) → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that, like TF, ignores the zero padding at the borders."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35→17: 3x3/2 | 1x1→3x3→3x3/2 | maxpool/2."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17→8: 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | maxpool/2."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads. ``pool="avg"`` for Mixed_7b, ``"max"`` for Mixed_7c
    (the TF FID graph's max pool there, kept for comparable numbers)."""

    def __init__(self, in_ch: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], 1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


@dataclass
class InceptionOutput:
    pool: torch.Tensor  # (N, 2048)
    spatial: torch.Tensor  # (N, 7 * h * w); 2023 at 299x299
    logits: torch.Tensor | None  # (N, num_classes) when the net has ``fc``


class InceptionV3(nn.Module):
    """FID Inception-v3. Input: RGB ``(N, 3, H, W)`` in [0, 1]; resized bilinearly to 299x299
    (``resize_input=False`` skips that; then H, W ≥ 75) and mapped to [-1, 1] as TF did."""

    def __init__(
        self,
        num_classes: int | None = 1008,
        resize_input: bool = True,
        logits_bias: bool = False,
    ) -> None:
        super().__init__()
        self.resize_input = resize_input
        self.logits_bias = logits_bias
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> InceptionOutput:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionV3 expects RGB images (N, 3, H, W) in [0, 1], got {tuple(x.shape)}")
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (N, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        # sFID taps Mixed_6d's 1x1 branch; recomputing that one 1x1 conv is cheaper than a hook.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        logits = None
        if self.fc is not None:
            logits = F.linear(pool, self.fc.weight, self.fc.bias if self.logits_bias else None)
        return InceptionOutput(pool=pool, spatial=spatial.flatten(1), logits=logits)


def load_inception(
    path: str | Path, device: str | torch.device = "cpu", logits_bias: bool = False
) -> InceptionV3:
    """Build ``InceptionV3`` from a pytorch-fid ``pt_inception-2015-12-05*.pth`` state dict.

    Loaded with ``weights_only=True`` and checked strictly: any missing or unexpected key, or a
    shape mismatch, raises ``ValueError`` naming it. ``fc`` is optional (no logits without it);
    BatchNorm ``num_batches_tracked`` counters are not weights and may be absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (pytorch-fid pt_inception layout expected)")
    has_fc = "fc.weight" in state
    num_classes = int(state["fc.weight"].shape[0]) if has_fc else None
    net = InceptionV3(num_classes=num_classes, logits_bias=logits_bias)
    expected = net.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the pytorch-fid Inception layout: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    bad = [
        f"{k}: file {tuple(v.shape)} vs net {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if bad:
        raise ValueError(f"{path} has tensors of the wrong shape: {bad[:5]}")
    for k, v in expected.items():  # fill absent BN counters so the strict load below passes
        state.setdefault(k, v)
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


@torch.no_grad()
def inception_features(
    net: InceptionV3, images: torch.Tensor | np.ndarray, batch_size: int = 50
) -> dict[str, np.ndarray]:
    """Run ``net`` over images and return numpy ``pool``, ``spatial`` and (if any) ``logits``.

    ``images``: uint8 NHWC in [0, 255] (the ADM ``arr_0`` layout) or float NCHW in [0, 1].
    """
    x_all = torch.as_tensor(images)
    if x_all.dtype == torch.uint8:
        if x_all.ndim != 4 or x_all.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC with 3 channels, got {tuple(x_all.shape)}")
        to_float = lambda b: b.permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    elif x_all.is_floating_point():
        to_float = lambda b: b.float()  # noqa: E731
    else:
        raise ValueError(f"images must be uint8 NHWC or float NCHW, got {x_all.dtype}")
    device = next(net.parameters()).device
    outs: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": [], "logits": []}
    for start in range(0, x_all.shape[0], batch_size):
        out = net(to_float(x_all[start : start + batch_size]).to(device))
        outs["pool"].append(out.pool.cpu())
        outs["spatial"].append(out.spatial.cpu())
        if out.logits is not None:
            outs["logits"].append(out.logits.cpu())
    return {k: torch.cat(v).double().numpy() for k, v in outs.items() if v}


# ---------------------------------------------------------------------------------------------
# ADM reference batches
# ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Statistics of a reference batch. ``pool``/``spatial`` are present only when the file
    carries features (needed for precision/recall); ``mu_s``/``sigma_s`` only with sFID stats."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    spatial: np.ndarray | None = None


def load_reference_stats(npz_path: str | Path) -> ReferenceStats:
    """Read an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``) or an npz of pool
    features (``pool``, optional ``spatial``), loaded without pickle. The ``arr_0`` images are
    never read; a file with nothing else raises ``ValueError`` (compute features first)."""
    path = Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        get = lambda k: data[k].astype(np.float64) if k in keys else None  # noqa: E731
        pool, spatial = get("pool"), get("spatial")
        if "mu" in keys and "sigma" in keys:
            mu, sigma = get("mu"), get("sigma")
        elif pool is not None:
            mu, sigma = feature_stats(pool)
        else:
            raise ValueError(
                f"{path} has neither mu/sigma nor pool features (keys: {sorted(keys)}); "
                "run inception_features() on its images and save 'pool' (and 'spatial')"
            )
        mu_s, sigma_s = get("mu_s"), get("sigma_s")
    if mu_s is None and spatial is not None:
        mu_s, sigma_s = feature_stats(spatial)
    return ReferenceStats(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=pool, spatial=spatial)


def fid_vs_reference(pool: np.ndarray, ref: ReferenceStats) -> float:
    """FID of sample pool features ``(N, 2048)`` against a reference batch."""
    return fid_from_stats(*feature_stats(pool), ref.mu, ref.sigma)


def sfid_vs_reference(spatial: np.ndarray, ref: ReferenceStats) -> float:
    """sFID of sample spatial features ``(N, 2023)`` against a reference batch."""
    if ref.mu_s is None or ref.sigma_s is None:
        raise ValueError("reference batch has no spatial statistics (mu_s/sigma_s or 'spatial' features)")
    return fid_from_stats(*feature_stats(spatial), ref.mu_s, ref.sigma_s)


def inception_score_adm(logits: np.ndarray, split_size: int = 5000) -> float:
    """IS as ADM reports it: the mean over consecutive chunks of ``split_size`` samples
    (the last chunk may be shorter)."""
    if len(logits) == 0:
        raise ValueError("inception_score_adm needs at least one sample")
    chunks = range(0, len(logits), split_size)
    return float(np.mean([inception_score(logits[i : i + split_size]) for i in chunks]))


def precision_recall_vs_reference(pool: np.ndarray, ref: ReferenceStats, k: int = PR_NEIGHBOURS
                                  ) -> tuple[float, float]:
    """Precision/recall of sample pool features against the reference's pool features."""
    if ref.pool is None:
        raise ValueError(
            "reference batch has no pool features; precision/recall needs them, not just mu/sigma"
        )
    return precision_recall(ref.pool, pool, k=k)

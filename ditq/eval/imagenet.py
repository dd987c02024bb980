"""The ImageNet FID protocol for latent DiTs (DiT-XL/2 256 px), data-parallel under torchrun.

As the official DiT evaluation does it: class labels spread over the 1000 classes, latents 4×32×32
sampled with classifier-free guidance on the first three latent channels, decoded by the Stable Diffusion
VAE (a local diffusers `AutoencoderKL` folder) to uint8 images, scored by the FID Inception-v3 (weights
by path) against an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`): FID, sFID, IS, precision
and recall.

Scale-out: with torchrun each rank samples a contiguous shard of the sample indices. Sample k always
draws its noise from generator (seed, k), so a shard draws exactly what one process would; the Inception
features are gathered in rank order and every rank returns the same scores as one process.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ditq.diffusion import sample_images
from ditq.eval.inception import (
    InceptionV3,
    ReferenceStats,
    fid_vs_reference,
    inception_features,
    inception_score_adm,
    precision_recall_vs_reference,
    sfid_vs_reference,
)
from ditq.eval.runner import SampleSettings
from ditq.training.distributed import DistEnv

GUIDED_CHANNELS = 3  # the official sampler guides ε on latent channels 0..2 only (its FID depends on it)


def load_vae(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
             ) -> nn.Module:
    """A diffusers `AutoencoderKL` saved in a local folder (`config.json` + weights); nothing is downloaded."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(_vae_folder(folder)), torch_dtype=dtype, local_files_only=True)
    return vae.to(device).eval()


def vae_latent_channels(folder: str | Path) -> int:
    """Channels of the latents the `AutoencoderKL` in `folder` decodes, read from its config (no weights)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(str(_vae_folder(folder)))
    default = inspect.signature(AutoencoderKL.__init__).parameters["latent_channels"].default
    return int(config.get("latent_channels", default))


def _vae_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--vae {folder}: not a diffusers AutoencoderKL folder (no config.json)")
    return folder


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents (N, 4, h, w) → uint8 images (N, H, W, 3), as the official sampler rounds them."""
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.device, param.dtype) / vae.config.scaling_factor).sample
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of sample indices rank `rank` of `world_size` draws (sizes differ by ≤ 1)."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def sample_decoded(model: nn.Module, vae: nn.Module, settings: SampleSettings, indices: range,
                   progress: bool = False) -> torch.Tensor:
    """uint8 images (len(indices), H, W, 3) of samples `indices` of the run `settings` describes."""
    labels = settings.labels(model.num_classes)
    chunks = []
    for start in range(indices.start, indices.stop, settings.batch_size):
        stop = min(indices.stop, start + settings.batch_size)
        latents = sample_images(model, labels[start:stop], steps=settings.steps, sampler=settings.sampler,
                                cfg_scale=settings.cfg_scale, seed=settings.seed, first_index=start,
                                guide_channels=GUIDED_CHANNELS, progress=progress)
        chunks.append(decode(vae, latents))
    return torch.cat(chunks) if chunks else torch.empty(0, 0, 0, 3, dtype=torch.uint8)


def gather_rows(array: np.ndarray, env: DistEnv | None) -> np.ndarray:
    """Every rank's rows, concatenated in rank order (the single-process order of a contiguous shard)."""
    if env is None or env.world_size == 1:
        return array
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def scores(features: dict[str, np.ndarray], ref: ReferenceStats) -> dict[str, float]:
    """FID, and sFID / IS / precision-recall where the reference batch and the network allow them."""
    row = {"fid": float(fid_vs_reference(features["pool"], ref))}
    if ref.mu_s is not None:
        row["sfid"] = float(sfid_vs_reference(features["spatial"], ref))
    if "logits" in features:
        row["is"] = inception_score_adm(features["logits"])
    if ref.pool is not None:
        row["precision"], row["recall"] = map(float, precision_recall_vs_reference(features["pool"], ref))
    return row


def evaluate_imagenet(
    models: dict[str, nn.Module],
    settings: SampleSettings,
    *,
    vae: nn.Module,
    inception: InceptionV3,
    reference: ReferenceStats,
    env: DistEnv | None = None,
    sizes: dict[str, int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Scores of each model on `settings.samples` images (this rank's shard sampled here, features
    gathered); every rank returns the same results. `sizes`: bytes per model, reported as given."""
    if not models:
        raise ValueError("evaluate_imagenet needs at least one model")
    rank, world = (0, 1) if env is None else (env.rank, env.world_size)
    if settings.samples < world:
        raise ValueError(f"{settings.samples} samples cannot be shared by {world} ranks; ask for at least {world}")
    indices = shard(settings.samples, rank, world)
    results: dict[str, Any] = {"settings": asdict(settings), "protocol": "imagenet-adm",
                               "guided_channels": GUIDED_CHANNELS, "world_size": world}
    for name, model in models.items():
        start = time.perf_counter()
        images = sample_decoded(model, vae, settings, indices, progress=progress and rank == 0)
        seconds = time.perf_counter() - start
        features = {key: gather_rows(value, env) for key, value in inception_features(inception, images).items()}
        row: dict[str, Any] = {"sample_seconds_rank0": round(seconds, 2), **scores(features, reference)}
        if sizes and name in sizes:
            row["size_bytes"] = sizes[name]
        results[name] = row
    return results

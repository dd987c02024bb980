"""Sample from a model and score the samples: the numbers every ditq table is made of.

DiT-MNIST samples are scored in the feature space of the bundled MNIST classifier (FID against the real
images, IS-style score, precision/recall, class accuracy). A quantized model is also compared pixel by pixel
with the full-precision model's samples from the same seeds and noise (PSNR, SSIM).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.checks import check_counts
from ditq.diffusion import sample_images
from ditq.eval.features import IMAGE_SHAPE, features_and_logits, load_feature_net, load_real_stats
from ditq.eval.layers import model_size_bytes
from ditq.eval.metrics import (
    check_scored_samples,
    class_accuracy,
    feature_stats,
    fid_from_stats,
    inception_score,
    precision_recall,
    psnr,
    ssim,
)
from ditq.progress import stage
from ditq.quant.modules import is_quantized
from ditq.threads import map_tasks


@dataclass(frozen=True)
class SampleSettings:
    """Everything that decides which images a model draws; reported next to every score."""

    samples: int = 100
    steps: int = 50
    cfg_scale: float = 1.5
    sampler: str = "ddim"
    seed: int = 0
    batch_size: int = 100

    def __post_init__(self) -> None:
        check_counts(self, ("samples", "steps", "batch_size"))
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale!r}")

    def labels(self, num_classes: int) -> torch.Tensor:
        """Classes spread evenly over the samples, so class accuracy weighs every digit alike."""
        return torch.arange(self.samples) % num_classes


def draw(
    model: nn.Module, settings: SampleSettings, progress: bool = False, samples: range | None = None
) -> tuple[torch.Tensor, float]:
    """(images in [-1, 1] on CPU, seconds spent sampling) of all the samples, or of the shard `samples` (the
    same images the whole run draws for those indices: each sample has its own noise)."""
    samples = samples if samples is not None else range(settings.samples)
    start = time.perf_counter()
    images = sample_images(
        model,
        settings.labels(model.num_classes)[samples.start:samples.stop],
        steps=settings.steps,
        sampler=settings.sampler,
        cfg_scale=settings.cfg_scale,
        seed=settings.seed,
        batch_size=settings.batch_size,
        progress=progress,
        first_index=samples.start,
    )
    return images.float().cpu(), time.perf_counter() - start


def score(
    images: torch.Tensor, labels: torch.Tensor, net: nn.Module | None = None, real: dict | None = None
) -> dict[str, float]:
    """FID (vs all real images), IS-style score, precision/recall and class accuracy of MNIST samples."""
    net = net if net is not None else load_feature_net()
    real = real if real is not None else load_real_stats()
    feats, logits = features_and_logits(net, images)
    mu, sigma = feature_stats(feats)
    precision, recall = precision_recall(real["feats"], feats)
    return {
        "fid": float(fid_from_stats(mu, sigma, real["mu"], real["sigma"])),
        "is": float(inception_score(logits)),
        "precision": float(precision),
        "recall": float(recall),
        "class_acc": float(class_accuracy(logits, labels)),
    }


def compare_pixels(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR/SSIM of samples against the full-precision samples drawn from the same noise."""
    a, b = _unit(images), _unit(reference)
    return {"psnr_vs_fp": float(np.mean(psnr(a, b, 1.0))), "ssim_vs_fp": float(np.mean(ssim(a, b, 1.0)))}


def draw_models(
    models: Mapping[str, nn.Module], settings: SampleSettings, progress: bool = False, workers: int = 1
) -> dict[str, tuple[torch.Tensor, float]]:
    """{name: (images, seconds spent sampling)} for every model, same seeds and noise for each.

    Every batch of `batch_size` samples is a task (the batches `sample_images` would run, with the same noise),
    and with `workers` > 1 the tasks run that many at a time, each op on one torch thread (`ditq.threads`:
    the images do not depend on the count), quantized models first (their emulated layers cost the most on
    a CPU), so every worker stays busy to the end. `progress` shows one bar over all the forward calls.
    """
    size = settings.batch_size
    shards = [range(i, min(i + size, settings.samples)) for i in range(0, settings.samples, size)]
    order = sorted(models, key=lambda name: not is_quantized(models[name]))
    tasks = [(name, shard) for name in order for shard in shards]
    calls = len(tasks) * settings.steps
    stage(progress, f"sampling {', '.join(models)}: {settings.samples} images each, {settings.sampler} "
                    f"{settings.steps} steps, cfg {settings.cfg_scale}")
    bar = tqdm(total=calls, desc="sampling", unit="step", disable=not progress)

    def count(*_: Any) -> None:  # a forward hook's return value would replace the output
        bar.update()

    hooks = [model.register_forward_hook(count) for model in models.values()]
    parts: dict[str, list[tuple[torch.Tensor, float]]] = {name: [] for name in models}
    try:
        for (name, _), part in zip(tasks, map_tasks(lambda task: draw(models[task[0]], settings, samples=task[1]),
                                                    tasks, workers), strict=True):
            parts[name].append(part)
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()
    return {name: (torch.cat([images for images, _ in parts[name]]), sum(seconds for _, seconds in parts[name]))
            for name in models}


def score_models(
    models: Mapping[str, nn.Module],
    drawn: Mapping[str, tuple[torch.Tensor, float]],
    settings: SampleSettings,
    sizes: Mapping[str, int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The results of `evaluate` from images `draw_models` drew; the first model is the reference ("fp").
    `progress` prints each model's scores as they are computed."""
    sizes = sizes or {}
    net, real = load_feature_net(), load_real_stats()
    results: dict[str, Any] = {"settings": asdict(settings)}
    reference = None
    for name, model in models.items():
        images, seconds = drawn[name]
        size = sizes[name] if name in sizes else model_size_bytes(model)
        row: dict[str, Any] = {"size_bytes": size, "sample_seconds": round(seconds, 2)}
        row |= score(images, settings.labels(model.num_classes), net, real)
        if reference is None:
            reference = images
        else:
            row |= compare_pixels(images, reference)
        results[name] = row
        stage(progress, f"{name}: FID {row['fid']:.2f}, class acc {row['class_acc']:.3f} (sampled in {seconds:.1f} s)")
    return results


def evaluate(
    models: dict[str, nn.Module],
    settings: SampleSettings,
    progress: bool = False,
    sizes: Mapping[str, int] | None = None,
    workers: int = 1,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Score several models under one set of sampling settings; the first one is the reference ("fp").

    `sizes` gives the bytes a model takes on disk where the caller knows them (a written checkpoint,
    the FP model in 16 bits); other models are sized by `model_size_bytes`. `workers`: see `draw_models`.
    Returns the results and each model's images (same seeds and noise for every model).
    """
    check_scorable(models, settings.samples)
    drawn = draw_models(models, settings, progress=progress, workers=workers)
    return score_models(models, drawn, settings, sizes, progress), {name: images for name, (images, _) in drawn.items()}


def check_scorable(models: Mapping[str, nn.Module], samples: int) -> None:
    """Raise before any sampling if `evaluate` could not score `samples` images of each model: the
    feature net reads 1×32×32 digits, and pixels are compared with the first model's images."""
    if not models:
        raise ValueError("evaluate needs at least one model")
    check_scored_samples(samples)
    for name, model in models.items():
        shape = (model.in_channels, model.input_size, model.input_size)
        if shape != IMAGE_SHAPE:
            raise ValueError(f"model {name} makes {'×'.join(map(str, shape))} images; the MNIST feature net "
                             f"scores {'×'.join(map(str, IMAGE_SHAPE))} digits (ImageNet models: --vae, "
                             "--inception, --ref-batch)")


def _unit(images: torch.Tensor) -> np.ndarray:
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu().numpy()

"""Fitness of a quantized model for the group-size search; lower is better for every choice.

| name     | what it measures                                                    | cost per candidate        |
|----------|---------------------------------------------------------------------|---------------------------|
| `fid`    | FID of `samples` fixed-noise samples (MNIST feature net), Q-DiT's own | full sampling + features |
| `psnr`   | −PSNR (dB) of `samples` fixed-noise samples vs the FP model's         | full sampling            |
| `output` | relative error of the final output on the FP model's own trajectories | one forward per recorded step, no sampling chain |

Noise, labels and the FP references are fixed when the fitness is built, so a candidate's fitness is a
deterministic function of the candidate. `output` feeds the quantized model the very inputs (x_t, t, y) the FP
model saw while sampling (teacher forcing), so errors do not compound along the chain: the cheapest proxy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ditq.checks import check_counts
from ditq.diffusion import sample_images

FITNESSES = ("fid", "psnr", "output")


@dataclass(frozen=True)
class FitnessSettings:
    """Which samples a fitness draws (fixed noise: `seed`); `steps` DDIM steps with guidance `cfg_scale`."""

    samples: int = 64
    steps: int = 25
    cfg_scale: float = 1.5
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_counts(self, ("samples", "steps"), what="fitness ")
        if not (isinstance(self.cfg_scale, (int, float)) and math.isfinite(self.cfg_scale)):
            raise ValueError(f"fitness cfg_scale must be a finite number, got {self.cfg_scale!r}")

    def labels(self, model: nn.Module) -> torch.Tensor:
        return torch.arange(self.samples) % int(model.num_classes)


class Fitness:
    """Base: `fitness(model) -> float`, lower is better."""

    name = ""

    def __call__(self, model: nn.Module) -> float:
        raise NotImplementedError


class FIDFitness(Fitness):
    """Q-DiT's fitness: FID of a small fixed-noise batch against the real MNIST feature statistics."""

    name = "fid"

    def __init__(self, fp_model: nn.Module, settings: FitnessSettings) -> None:
        from ditq.eval.features import load_feature_net, load_real_stats

        self.settings = settings
        self.net = load_feature_net(device=_device(fp_model))
        self.real = load_real_stats()

    def __call__(self, model: nn.Module) -> float:
        from ditq.eval.features import features_and_logits
        from ditq.eval.metrics import feature_stats, fid_from_stats

        feats, _ = features_and_logits(self.net, _draw(model, self.settings).float())
        mu, sigma = feature_stats(feats)
        return float(fid_from_stats(mu, sigma, self.real["mu"], self.real["sigma"]))


class PSNRFitness(Fitness):
    """−mean PSNR (dB, images in [0, 1]) of fixed-noise samples against the FP model's from the same noise."""

    name = "psnr"

    def __init__(self, fp_model: nn.Module, settings: FitnessSettings) -> None:
        self.settings = settings
        self.reference = _unit(_draw(fp_model, settings))

    def __call__(self, model: nn.Module) -> float:
        images = _unit(_draw(model, self.settings))
        mse = (images - self.reference).pow(2).flatten(1).mean(1).clamp_min(1e-12)  # (N,)
        return float((10 * torch.log10(mse)).mean())  # = −PSNR


class OutputFitness(Fitness):
    """Relative squared error ‖ε̂_q − ε̂_fp‖² / ‖ε̂_fp‖² of the model's output on the FP trajectories' inputs."""

    name = "output"

    def __init__(self, fp_model: nn.Module, settings: FitnessSettings) -> None:
        self.settings = settings
        calls: list[tuple[torch.Tensor, ...]] = []

        def record(_module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x, t, y = (list(args) + [kwargs.get(k) for k in ("x", "t", "y")][len(args):])[:3]
            calls.append((x.detach(), t.detach(), y.detach(), output.detach()))

        handle = fp_model.register_forward_hook(record, with_kwargs=True)
        try:
            _draw(fp_model, settings)
        finally:
            handle.remove()
        self.calls = calls
        self.norm = float(sum(out.float().pow(2).sum() for *_, out in calls))

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            error = sum(float((model(x, t, y).float() - out.float()).pow(2).sum()) for x, t, y, out in self.calls)
        finally:
            model.train(was_training)
        return error / max(self.norm, 1e-30)


def make_fitness(name: str, fp_model: nn.Module, settings: FitnessSettings) -> Fitness:
    """The fitness `name` (one of `FITNESSES`) with its fixed noise and FP references."""
    kinds = {"fid": FIDFitness, "psnr": PSNRFitness, "output": OutputFitness}
    if name not in kinds:
        raise ValueError(f"fitness {name!r} is not one of {FITNESSES}")
    return kinds[name](fp_model, settings)


def _draw(model: nn.Module, settings: FitnessSettings) -> torch.Tensor:
    return sample_images(model, settings.labels(model), steps=settings.steps, cfg_scale=settings.cfg_scale,
                         seed=settings.seed, batch_size=settings.batch_size)  # fmt: skip


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(-1, 1) + 1) / 2


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"spearman needs two equally long lists of >= 3 values, got {len(a)} and {len(b)}")
    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


__all__ = ["FITNESSES", "FIDFitness", "Fitness", "FitnessSettings", "OutputFitness", "PSNRFitness",
           "make_fitness", "spearman"]  # fmt: skip

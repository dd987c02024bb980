"""Learning-rate and EMA-decay schedules, and the EMA update: pure functions of the config and the step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ditq.training.config import TrainConfig

__all__ = ["ema_decay_at", "lr_at", "update_ema"]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the 0-based optimizer step `step`: linear warm-up, then constant, cosine, or
    step (lr until `lr_decay_step`, lr·`lr_decay_factor` from there on: TerDiT's late reduction)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        return cfg.lr * (cfg.lr_decay_factor if step >= cfg.lr_decay_step else 1.0)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(cfg: TrainConfig, done: int) -> float:
    """EMA decay after `done` steps. The warm-up keeps a 0.9999 EMA of a short run from being
    mostly its random initialisation: the average covers ~10% of the steps taken so far."""
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1.0 + done) / (10.0 + done))
    return cfg.ema_decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for every parameter (frozen ones are equal anyway)."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for b_ema, b_model in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b_model)

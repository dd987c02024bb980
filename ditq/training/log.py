"""The run's JSON-lines log: per-interval means kept on the device, and trimming after a resume."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ditq.training.schedules import ema_decay_at

if TYPE_CHECKING:
    from ditq.training.loop import Run

__all__ = ["LogMeter", "trim_log"]


class LogMeter:
    """Loss and grad-norm sums since the last log line, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device, elapsed_before: float) -> None:
        self.sums = torch.zeros(2, device=device)
        self.count, self.elapsed_before = 0, elapsed_before
        self.t_start = self.t_last = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.sums += torch.stack([loss, grad_norm.detach().to(self.sums.device)])
        self.count += 1

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def record(self, run: Run, done: int, lr: float) -> dict[str, Any]:
        """The log line for `done` steps (means over ranks and steps), then reset the sums."""
        stats = self.sums / self.count
        if run.env.world_size > 1:
            dist.all_reduce(stats)
            stats /= run.env.world_size
        mean_loss, mean_norm = stats.tolist()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {done}: lower lr or check the data")
        now = time.perf_counter()
        record = {
            "step": done, "epoch": (done - 1) // run.batches.steps_per_epoch, "loss": mean_loss,
            "grad_norm": mean_norm, "lr": lr, "ema_decay": ema_decay_at(run.cfg, done),
            "steps_per_s": self.count / (now - self.t_last), "elapsed_s": self.elapsed(),
        }  # fmt: skip
        self.sums.zero_()
        self.count, self.t_last = 0, now
        return record


def trim_log(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the crash
    path.write_text("".join(line + "\n" for line in kept))

"""The run's JSON-lines log: per-interval means kept on the device, and trimming after a resume."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ditq.atomic import write_text

__all__ = ["LogMeter", "trim_log"]


class LogMeter:
    """Loss and grad-norm sums since the last log line, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device, elapsed_before: float, world_size: int) -> None:
        self.sums = torch.zeros(2, device=device)
        self.count, self.elapsed_before, self.world_size = 0, elapsed_before, world_size
        self.t_start = self.t_last = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.sums += torch.stack([loss, grad_norm.detach().to(self.sums.device)])
        self.count += 1

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def record(self, done: int, epoch: int, lr: float, ema_decay: float) -> dict[str, Any]:
        """The log line for `done` steps (means over ranks and steps), then reset the sums."""
        stats = self.sums / self.count
        if self.world_size > 1:
            dist.all_reduce(stats)
            stats /= self.world_size
        mean_loss, mean_norm = stats.tolist()
        if not (math.isfinite(mean_loss) and math.isfinite(mean_norm)):
            raise FloatingPointError(
                f"loss is {mean_loss}, gradient norm {mean_norm} at step {done}: lower lr or check the data"
            )
        now = time.perf_counter()
        record = {
            "step": done, "epoch": epoch, "loss": mean_loss, "grad_norm": mean_norm, "lr": lr,
            "ema_decay": ema_decay, "steps_per_s": self.count / (now - self.t_last), "elapsed_s": self.elapsed(),
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
    write_text(path, "".join(line + "\n" for line in kept))

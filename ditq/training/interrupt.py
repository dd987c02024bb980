"""Ctrl-C or a time limit during training: the step in progress finishes, a resumable checkpoint is written,
the run stops.

A time limit lets a run be cut into calls of bounded length, each continuing the last (`resume=True`).
SIGINT only raises a flag, so no step is cut in half; the loop asks `StopRequest.should_stop()` after every
step. Under DDP every rank must stop after the same step (writing the checkpoint is collective), so the ranks
agree through an all-reduce of their flags on a CPU (gloo) group, started after one step and read after the
next: no device sync per step, one step of delay.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopRequest", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or the time limit stopped a run after `step`; `checkpoint` continues it (`TrainConfig(resume=True)`,
    `--resume`). `reason` says which: "interrupted" or "stopped at the time limit"."""

    def __init__(self, step: int, checkpoint: Path, reason: str = "interrupted") -> None:
        super().__init__(f"{reason} after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


class StopRequest:
    """Within `with`: SIGINT, or the `time.monotonic()` clock passing `deadline`, asks for a stop after the
    current step, which every rank agrees on."""

    def __init__(self, world_size: int, deadline: float | None = None) -> None:
        self.world_size, self.deadline = world_size, deadline
        self.interrupted = False
        self._group: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None  # the all-reduce started after the last step
        self._previous_handler: Any = None

    def __enter__(self) -> StopRequest:
        # only the main thread receives signals; a process started to ignore SIGINT (`nohup`, `&`) keeps ignoring it
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        if self.world_size > 1:
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
        if self._group is not None:
            if self._pending is not None and exc_type is None:  # every rank started it; after an error, maybe not
                self._pending[0].wait()
            dist.destroy_process_group(self._group)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True

    @property
    def reason(self) -> str:
        return "interrupted" if self.interrupted else "stopped at the time limit"

    def _wants_stop(self) -> bool:
        return self.interrupted or (self.deadline is not None and time.monotonic() >= self.deadline)

    def should_stop(self) -> bool:
        """Whether to stop after this step; every rank calls it once per step.

        Alone: whether Ctrl-C was pressed or the deadline passed. Under DDP: whether any rank had been
        interrupted or past the deadline by the end of the previous step.
        """
        if self._group is None:
            return self._wants_stop()
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            self._pending = None
            if flags.item():  # the same answer on every rank: all stop here, none starts another all-reduce
                return True
        flags = torch.tensor([int(self._wants_stop())])
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        return False

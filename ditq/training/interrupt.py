"""Ctrl-C during training: the step in progress finishes, a resumable checkpoint is written, the run stops.

SIGINT only raises a flag, so no step is cut in half; the loop asks `StopRequest.should_stop()` after every
step. Under DDP every rank must stop after the same step (writing the checkpoint is collective), so the ranks
agree through an all-reduce of their flags on a CPU (gloo) group, started after one step and read after the
next: no device sync per step, one step of delay.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopRequest", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after `step`; `checkpoint` continues it (`TrainConfig(resume=True)`, `--resume`)."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Within `with`: SIGINT asks for a stop after the current step, which every rank agrees on."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
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

    def should_stop(self) -> bool:
        """Whether to stop after this step; every rank calls it once per step.

        Alone: whether Ctrl-C was pressed. Under DDP: whether any rank had been interrupted by the end of the
        previous step.
        """
        if self._group is None:
            return self.interrupted
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            self._pending = None
            if flags.item():  # the same answer on every rank: all stop here, none starts another all-reduce
                return True
        flags = torch.tensor([int(self.interrupted)])
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        return False

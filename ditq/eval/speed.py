"""Forward-pass timing of a zoo transformer, as `ditq bench` reports it: medians of repeats after warm-up.

A quantized model is only worth its bits if it also runs fast, and speed claims are only comparable when
measured side by side: `ditq bench` times the full-precision model and the quantized one in one process on
the same inputs, each prepared the same way (dtype, `torch.compile`, CUDA graphs), and reports the ratio.
On CUDA the clock is a pair of CUDA events around each forward; on the CPU, wall time. Beside the lone calls'
median, `back_to_back_ms` is the time per call of `repeats` calls queued without waiting, as a sampling loop
makes them: there the host launches a call's kernels while the GPU still runs the previous one's, where a lone
call also pays every stretch in which launching outruns the GPU (a model of many small kernels pays more).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ditq.checks import check_count, check_counts
from ditq.progress import stage

__all__ = ["SpeedSettings", "synchronize", "time_back_to_back", "time_calls", "time_forward"]


@dataclass(frozen=True)
class SpeedSettings:
    """How a forward pass is timed; reported next to every timing."""

    batch: int = 8
    dtype: str = "float32"
    compile: bool = False
    cuda_graphs: bool = False  # torch.compile(mode="reduce-overhead"); implies compile
    repeats: int = 20
    warmup: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("batch", "repeats", "warmup"))
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def time_forward(model: nn.Module, settings: SpeedSettings, progress: bool = False) -> dict[str, Any]:
    """Median/min/max milliseconds of lone calls `model(x, t, y)` on random latents, timesteps and labels of the
    model's own sizes, and per call back to back; `model` must already be on its device in `settings.dtype`.
    `progress` prints a line as compiling (minutes for a large model) and timing start."""
    device = next(model.parameters()).device
    if settings.cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
    g = torch.Generator(device=device).manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    shape = (settings.batch, model.in_channels, model.input_size, model.input_size)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    t = torch.randint(0, 1000, (settings.batch,), generator=g, device=device)
    y = torch.randint(0, model.num_classes + 1, (settings.batch,), generator=g, device=device)
    forward = model
    compile_s = None
    with torch.no_grad():
        if settings.compile or settings.cuda_graphs:
            torch._dynamo.reset()
            mode = "reduce-overhead" if settings.cuda_graphs else None
            forward = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
            stage(progress, f"  compiling (torch.compile, fullgraph{', CUDA graphs' if mode else ''}) at batch "
                            f"{settings.batch}; the first call can take minutes")
            start = time.perf_counter()
            forward(x, t, y)
            synchronize(device)
            compile_s = round(time.perf_counter() - start, 1)
            stage(progress, f"  compiled in {compile_s} s")
        stage(progress, f"  timing: {settings.warmup} warm-up calls, {settings.repeats} timed, "
                        f"{settings.repeats} back to back")
        times = time_calls(forward, (x, t, y), device, warmup=settings.warmup, repeats=settings.repeats)
        back_to_back = time_back_to_back(forward, (x, t, y), device, calls=settings.repeats)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "back_to_back_ms": back_to_back, "repeats": settings.repeats, "compile_s": compile_s}  # fmt: skip


def time_calls(fn: Callable[..., Any], args: tuple, device: torch.device, *, warmup: int, repeats: int
               ) -> list[float]:
    """Milliseconds of each of `repeats` calls `fn(*args)` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn(*args)
    synchronize(device)
    return [_timed(fn, args, device) for _ in range(repeats)]


def time_back_to_back(fn: Callable[..., Any], args: tuple, device: torch.device, *, calls: int) -> float:
    """Milliseconds per call of `calls` calls `fn(*args)` queued one after another, nothing waited for between
    them (`fn` already warm)."""
    check_count("calls", calls)
    synchronize(device)
    return _timed(fn, args, device, calls)


def _timed(forward: Callable[..., Any], args: tuple, device: torch.device, calls: int = 1) -> float:
    """Milliseconds per call of `calls` calls in a row, from an idle device."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            forward(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        forward(*args)
    return (time.perf_counter() - start_s) * 1000 / calls


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

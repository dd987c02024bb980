"""Triton kernels (FP8 expansion, the lowbit GEMM): each has a PyTorch reference it is tested against.

The kernel modules are imported lazily by the backends so that ditq runs without Triton; CI runs them on
the CPU under `TRITON_INTERPRET=1` at small shapes. This package's own functions need no Triton.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FP8_K_STEP", "device_support", "interpreted", "kernel_op"]

FP8_K_STEP = 32  # an FP8 tensor-core product takes 32 columns of K: the least K block on e4m3 codes


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`, the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Register a function that launches Triton kernels (through `torch.library.wrap_triton`) as the op `name`.

    On GPUs it is a `triton_op`: `torch.compile` traces into it and inductor launches the kernels from its own
    wrapper, where an opaque Python op cost 160 µs of host time per call (DiT-XL/2 W4A8-FP8 at batch 64 on an
    H200: 23.6 ms of kernels in a 26.5 ms forward). Under Triton's CPU interpreter, whose kernels cannot be
    traced, it is an opaque `custom_op` with `fake` as its shape function. Decided when the op is defined: set
    `TRITON_INTERPRET` before importing ditq's kernels. Kernels launched outside the op, in eager, go through
    torch's traceable wrapper (~100 µs of host time): the library launches through the ops only."""

    def register(fn: Callable[..., Any]) -> Any:
        if not interpreted():
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return register


def device_support(
    device: torch.device, min_capability: tuple[int, int], hardware: str, kernels: str
) -> str | None:
    """None when Triton kernels that need `hardware` (compute capability `min_capability`) can run on
    `device`, else why not; on the CPU only under the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < min_capability:
            return f"{hardware} need compute capability {min_capability[0]}.{min_capability[1]}+"
        return None
    if device.type == "cpu" and interpreted():
        return None
    return f"no {kernels} kernels on {device.type}"

"""Triton kernels (FP8 expansion, the lowbit GEMM): each has a PyTorch reference it is tested against.

The kernel modules are imported lazily by the backends so that ditq runs without Triton; CI runs them on
the CPU under `TRITON_INTERPRET=1` at small shapes. This package's own functions need no Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["device_support", "interpreted"]


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`, the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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

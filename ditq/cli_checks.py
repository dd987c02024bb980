"""Argument types and path checks of the `ditq` command line: bad values are refused before any work."""

from __future__ import annotations

import argparse
import itertools
import math
import os
from pathlib import Path

import torch

__all__ = ["check_output_dir", "check_output_file", "check_steps", "default_device", "device_arg", "finite_float",
           "positive_int"]


# ---- argument types: refused at parse time, before anything is loaded -----------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def device_arg(text: str) -> str:
    from ditq.fileformat import check_device

    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- paths: checked before the work, nothing created ------------------------------------------------


def check_output_file(path: Path, flag: str) -> None:
    """Refuse a file path that cannot be written (a directory, a path under a file, no permission)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} is not writable")
    _check_parents(path, flag)


def check_output_dir(path: Path, flag: str) -> None:
    """Refuse a folder path that cannot be created or written into."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} is not writable")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` must be a writable folder (the rest is created)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: folder {parent} is not writable")
            return


def check_steps(steps: int, sampler: str, flag: str) -> None:
    """Refuse a step count the sampler cannot respace 1000 diffusion steps to, naming workable ones."""
    from ditq.diffusion.samplers import create_diffusion

    try:
        create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps))
    except ValueError as err:
        by_distance = sorted(range(1, 1001), key=lambda n: (abs(n - steps), n))
        near = sorted(itertools.islice((n for n in by_distance if _respaces(n, sampler)), 2))
        raise ValueError(f"{flag} {steps}: {err} ({sampler}); the nearest that work: "
                         f"{' and '.join(map(str, near))}") from None


def _respaces(steps: int, sampler: str) -> bool:
    from ditq.diffusion.samplers import create_diffusion

    try:
        create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps))
    except ValueError:
        return False
    return True

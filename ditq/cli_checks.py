"""Argument types and path checks of the `ditq` command line: bad values are refused before any work."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["check_output_dir", "check_output_file", "check_scored_samples", "check_steps", "default_device",
           "device_arg", "finite_float", "positive_int"]


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


# ---- paths: checked before the work, nothing left behind ----------------------------------------------


def check_output_file(path: Path, flag: str, suffix: str) -> None:
    """Refuse a file path that cannot be written: another extension than `suffix`, a directory, a folder
    that cannot be created or written into."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a {suffix} file path")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: give a {suffix} file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} is not writable")
    _check_folder(path.parent, path, flag)


def check_output_dir(path: Path, flag: str, files: tuple[str, ...] = ()) -> None:
    """Refuse a folder path that cannot be created or written into, or where one of the `files` it will
    receive is a directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{flag} {path}: {path / name} is a directory; the command writes a file there")
    _check_folder(path, path, flag)


def _check_folder(folder: Path, path: Path, flag: str) -> None:
    """The nearest existing folder at or above `folder` must take a new file (the rest is created).

    Tried for real with an unnamed temporary file: permission bits do not tell (root passes them, and
    /proc or a read-only mount refuse what they allow)."""
    for existing in (folder.absolute(), *folder.absolute().parents):
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
            try:
                with tempfile.TemporaryFile(dir=existing):
                    pass
            except OSError as err:
                raise ValueError(f"{flag} {path}: cannot write into folder {existing} "
                                 f"({err.strerror or err})") from None
            return


def check_scored_samples(samples: int, flag: str) -> None:
    """Refuse a sample count too small for the scores, before any model is loaded."""
    from ditq.eval.metrics import MIN_SAMPLES

    if samples < MIN_SAMPLES:
        raise ValueError(f"{flag} {samples}: FID and precision/recall need at least {MIN_SAMPLES} samples")


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

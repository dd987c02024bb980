"""Random streams of a training run, per rank: seeding, and capture/restore for exact resume.

A step draws from the torch CPU/CUDA generators (label dropout inside the model) and from our own
noise generator (batch timesteps, noise, flips). numpy and python `random` are unused by ditq; their
states are kept anyway so that user code plugged into the loop resumes exactly too.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng(noise_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream a step may touch: torch CPU/CUDA (label dropout), our noise generator,
    and numpy/python (unused by ditq, kept so that user code plugged in stays reproducible)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "noise": noise_gen.get_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],  # JSON-ready
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(state: dict[str, Any], noise_gen: torch.Generator, device: torch.device) -> None:
    """Put every stream back where `capture_rng` found it (call after all setup has drawn)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    noise_gen.set_state(state["noise"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_rank(seed: int, rank: int, noise_gen: torch.Generator) -> None:
    """Independent streams per rank and per purpose, all derived from the one run seed."""
    torch_seed, noise_seed = np.random.SeedSequence([seed, rank]).generate_state(2)
    torch.manual_seed(int(torch_seed))
    noise_gen.manual_seed(int(noise_seed))

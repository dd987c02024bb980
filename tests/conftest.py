"""Shared fixtures. Without a GPU, Triton kernels run in its interpreter (set before any kernel is defined)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.tiny import make_tiny_dit  # noqa: E402


@pytest.fixture
def tiny_dit():
    return make_tiny_dit()


@pytest.fixture
def one_thread():
    """Tiny matmuls on one thread: OpenMP hand-offs cost more than the work on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

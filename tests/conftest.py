"""Shared fixtures. Without a GPU, Triton kernels run in its interpreter (set before any kernel is defined)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.tiny import make_tiny_dit  # noqa: E402

THREADS = torch.get_num_threads()  # the run's; what a test changes it must give back


@pytest.fixture(autouse=True)
def same_start(request):
    """Each test starts from the same global RNG state and thread count, whatever ran before it on its xdist
    worker: unseeded draws are then the same in every run, and a thread count left behind (which changes the
    summation order of the tests after it) fails where it was left."""
    threads = torch.get_num_threads()
    assert threads == THREADS, f"{threads} threads, not {THREADS}, as {request.node.nodeid}'s fixtures set up"
    torch.manual_seed(0)
    yield
    threads = torch.get_num_threads()
    assert threads == THREADS, f"{request.node.nodeid} left torch on {threads} threads, not {THREADS}"


@pytest.fixture
def tiny_dit():
    return make_tiny_dit()


@pytest.fixture
def one_thread():
    """Tiny matmuls on one thread: OpenMP hand-offs cost more than the work and are erratic on a shared CPU
    (15 ms instead of 0.2 ms per 512x64x256 product seen on 2 vCPUs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

import pytest
import torch

from tests.tiny import make_tiny_dit


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

import pytest

from tests.tiny import make_tiny_dit


@pytest.fixture
def tiny_dit():
    return make_tiny_dit()

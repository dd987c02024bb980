"""Timing functions: how many calls each clock covers, and bad counts refused by name."""

from __future__ import annotations

import pytest
import torch

from ditq.eval.speed import time_back_to_back, time_calls


def test_back_to_back_makes_exactly_the_calls_asked_and_reports_per_call():
    calls = []
    per_call = time_back_to_back(lambda x: calls.append(x), (1,), torch.device("cpu"), calls=7)
    assert calls == [1] * 7 and per_call >= 0
    calls.clear()
    assert len(time_calls(lambda x: calls.append(x), (2,), torch.device("cpu"), warmup=2, repeats=3)) == 3
    assert calls == [2] * 5


@pytest.mark.parametrize("calls", [0, -1, True, 2.0])
def test_back_to_back_refuses_a_count_that_is_not_a_positive_integer(calls):
    with pytest.raises(ValueError, match="calls must be a positive integer"):
        time_back_to_back(lambda: None, (), torch.device("cpu"), calls=calls)

"""CPU threads chosen per job: independent tasks spread over Python threads, each op on one torch thread.

On a small shared CPU, torch's intra-op threads cost more than they save for small linear algebra: an SVD
of a 768×256 weight ran 6–18× slower on two threads than on one on a loaded 2-core machine, since every op
waits at a barrier for its slowest thread and a thread whose core another process holds is slow. Work made
of independent tasks (the grid points of a search, the models of an evaluation) is spread instead: one
Python thread per worker, every op on one torch thread. torch releases the GIL inside an op, no worker waits
for another, and each task computes exactly what it computes in a one-thread run, whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["map_tasks", "torch_threads"]

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count is `n` inside the block (for every thread of the process), restored after."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_tasks(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`fn` over `items`, results in order: with `workers` > 1 on that many Python threads, one torch thread
    per op; with one worker in the calling thread, on the threads torch has.

    The caller should consume the results as they come: a task's result is held only until it is taken.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        yield from pool.map(fn, items)

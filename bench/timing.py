"""How the benches time a kernel alone: the median of CUDA-graph replays.

A Triton kernel launched outside its op goes through torch's traceable wrapper (`torch.library.wrap_triton`,
~100 µs of host time per launch), which an eager timing loop would measure instead of the kernel; replaying a
captured graph leaves only the GPU's time. The inputs may stay in the L2 between replays (`triton.testing.do_bench`
flushes it; it cannot replay).
"""

from __future__ import annotations

from collections.abc import Callable

import triton


def replay_us(fn: Callable[[], object], rep: int = 200) -> float:
    """µs per call of `fn`, the median of CUDA-graph replays over about `rep` ms."""
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")

"""How the benches time a kernel alone: the median of CUDA-graph replays.

A Triton kernel launched outside its op goes through torch's traceable wrapper (`torch.library.wrap_triton`,
~100 µs of host time per launch), which an eager timing loop would measure instead of the kernel; replaying a
captured graph leaves only the GPU's time. The repeat count comes from replaying a graph of one call, not from
eager calls as `triton.testing.do_bench_cudagraph` estimates it: the host time of eager calls makes that estimate
large, so few calls are captured and a replay's own launch cost is spread over too few of them
(`bench/results/prepass_v1_h200.md` and `prepass_v2_h200.md` were timed before this). The inputs may stay in the L2
between replays.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def replay_us(fn: Callable[[], object], rep: int = 200) -> float:
    """µs per call of `fn`, the median of 10 replays of a graph of as many calls as fill about `rep` ms."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # warm-up: compiles, allocates
        once = _captured(fn, 1)
        estimate = max(
            _replay_ms(once, 1) for _ in range(3)
        )  # the slowest of a few, so the repeat count is safe
        calls = max(10, min(2000, int(rep / max(estimate, 1e-3))))
        graph = _captured(fn, calls)
        return 1e3 * statistics.median(_replay_ms(graph, calls) for _ in range(10))


def _captured(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls

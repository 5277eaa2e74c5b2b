"""Kernel timing as users under CUDA graphs see it: median per-call time of graph replays of a list of calls
(one per rotated weight copy, so each call finds its weight cold), eager when a capture fails."""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch

log = logging.getLogger("prunekit")


def _per_call_us(run: Callable[[], object], n_calls: int, samples: int, min_sample_us: float) -> float:
    for _ in range(2):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    reps = max(1, math.ceil(min_sample_us / max(start.elapsed_time(end) * 1000.0, 1.0)))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / (reps * n_calls))
    return sorted(times)[len(times) // 2]


def graph_time_us(calls: Sequence[Callable[[], object]], samples: int = 11, min_sample_us: float = 200.0) -> float:
    """Median µs per call of graph replays of `calls` (warmed up on a side stream first)."""
    def eager():
        for call in calls:
            call()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
    except RuntimeError as exc:
        log.info("timing: graph capture failed (%s); timing eagerly", exc)
        torch.cuda.synchronize()
        return _per_call_us(eager, len(calls), samples, min_sample_us)
    return _per_call_us(graph.replay, len(calls), samples, min_sample_us)

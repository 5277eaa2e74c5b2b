"""Kernel timing as users under CUDA graphs see it (shared by the 2:4 dispatcher and decode v2's autotuning):
the median per-call time of graph replays of a list of calls (one per rotated weight copy, so each call finds
its weight cold, as in a real model), eager event timing only when a graph cannot be captured."""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch

log = logging.getLogger("prunekit")


def capture_graph(calls: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls`, warmed up on a side stream first (lazy init, autotuning, cached copies per
    weight happen outside the graph). Raises RuntimeError when the calls cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def graph_time_us(calls: Sequence[Callable[[], object]], samples: int = 15, min_sample_us: float = 200.0) -> float:
    """Median per-call µs of graph replays of `calls` (see capture_graph)."""
    return _replays_us(capture_graph(calls).replay, len(calls), samples, min_sample_us)


def eager_time_us(calls: Sequence[Callable[[], object]], samples: int = 15, min_sample_us: float = 200.0) -> float:
    for call in calls:
        call()

    def run():
        for call in calls:
            call()
    return _replays_us(run, len(calls), samples, min_sample_us)


def time_us(calls: Sequence[Callable[[], object]], what: str = "timing") -> tuple[float, str]:
    """(µs per call, 'graph' | 'eager'): graph replays, eager when a graph cannot be captured (logged)."""
    try:
        return graph_time_us(calls), "graph"
    except RuntimeError as exc:  # a route that cannot be captured: time it eagerly, and say so
        log.info("%s: graph capture failed (%s); timing eagerly", what, exc)
        torch.cuda.synchronize()
        return eager_time_us(calls), "eager"


def replay_times_us(run: Callable[[], object], n_calls: int, samples: int, min_sample_us: float,
                    warmup: int = 2) -> list[float]:
    """Per-call µs samples of `run` (which makes `n_calls` calls): each sample times enough back-to-back
    runs between CUDA events to last `min_sample_us`, so launch noise averages out."""
    for _ in range(warmup):
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
    return times


def _replays_us(run, n_calls: int, samples: int, min_sample_us: float) -> float:
    times = sorted(replay_times_us(run, n_calls, samples, min_sample_us))
    return times[len(times) // 2]

"""CPU route of the sparse linear layers: the C++ SIMD kernel (ops/sparse_cpu.py) or dense F.linear, chosen per
(format, N, K, dtype, bias, M bucket, threads) by timing both once per process on the layer's own weight.

The sparse kernel is kept for a key when dense F.linear on a dense copy of the same weight (the layer the sparse
one replaced) is not faster than it by more than the 0.97x floor (TIE): medians of >= 5 interleaved calls.
The copy built for the measurement is dropped right after it.
`nn.SparseLinear` / `nn.UnstructuredSparseLinear` ask `decide()` before each CPU forward: once dense wins for
any M bucket of a layer's key, the layer turns into a dense layer for good (its packed form is freed, so the
dense weight is then the only copy: memory <= dense), and otherwise it holds only the packed weight.
PRUNEKIT_SPARSE_CPU=auto (default) | sparse | dense forces the choice (tests, benchmarks).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from . import sparse_cpu

log = logging.getLogger("prunekit")

ENV_MODE = "PRUNEKIT_SPARSE_CPU"
MAX_BUCKET = 256
TIE = 0.97  # sparse is kept while dense time / sparse time >= TIE (the "never below 0.97x dense" floor)
_choices: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


def mode() -> str:
    value = os.environ.get(ENV_MODE, "auto")
    if value not in ("auto", "sparse", "dense"):
        raise ValueError(f"{ENV_MODE} must be auto, sparse or dense, got {value!r}")
    return value


def bucket(M: int) -> int:
    """Powers of two up to MAX_BUCKET; larger M behaves like MAX_BUCKET (compute-bound, time linear in M)."""
    return min(MAX_BUCKET, 1 << max(0, (M - 1).bit_length()))


def clear() -> None:
    _choices.clear()
    _timings.clear()


def chosen_routes() -> dict[tuple, str]:
    """{(format, N, K, dtype, bias, M bucket, threads): 'sparse' | 'dense'} measured so far."""
    return dict(_choices)


def timings() -> dict[tuple, dict[str, float]]:
    """The measured medians (seconds) behind each choice."""
    return {k: dict(v) for k, v in _timings.items()}


def key(fmt: str, N: int, K: int, dtype: torch.dtype, has_bias: bool, M: int) -> tuple:
    return (fmt, N, K, dtype, has_bias, bucket(M), torch.get_num_threads())


def layer_dense(fmt: str, N: int, K: int, dtype: torch.dtype, has_bias: bool) -> bool:
    """Whether dense won any measured M bucket of this layer shape (at the current thread count)."""
    threads = torch.get_num_threads()
    return any(c == "dense" for k, c in _choices.items()
               if k[:5] == (fmt, N, K, dtype, has_bias) and k[6] == threads)


def _median_times(fns: dict[str, Callable[[], object]], budget_s: float = 0.1, max_reps: int = 15) -> dict[str, float]:
    """Median seconds of each fn, interleaved (a, b, a, b, ...) so that machine noise hits both alike."""
    for fn in fns.values():
        fn()  # warm-up (first-touch allocations, caches)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        reps = len(next(iter(samples.values())))
        if reps >= max_reps or (reps >= 5 and time.perf_counter() - start > budget_s):
            break
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def decide(fmt: str, x2d: torch.Tensor, N: int, has_bias: bool, sparse_fn: Callable[[torch.Tensor], object],
           dense_weight: Callable[[], torch.Tensor], bias: torch.Tensor | None) -> str:
    """'sparse' or 'dense' for this call (measured on first use of its key)."""
    forced = mode()
    if forced != "auto":
        return forced
    if not sparse_cpu.available():
        return "dense"
    M, K = x2d.shape
    if M == 0:
        return "sparse"
    k = key(fmt, N, K, x2d.dtype, has_bias, M)
    choice = _choices.get(k)
    if choice is None:
        probe = torch.randn(k[5], K, dtype=x2d.dtype)
        with torch.inference_mode(False), torch.no_grad():
            W = dense_weight()
            times = _median_times({"dense": lambda: torch.nn.functional.linear(probe, W, bias),
                                   "sparse": lambda: sparse_fn(probe)})
            del W
        # within the 0.97x floor the packed weight (half the memory) wins; a noisy tie does not unpack a layer
        choice = "sparse" if times["sparse"] * TIE <= times["dense"] else "dense"
        _choices[k], _timings[k] = choice, times
        log.info("sparse CPU route %s: dense %.1f us, sparse %.1f us -> %s", k, times["dense"] * 1e6,
                 times["sparse"] * 1e6, choice)
    return choice

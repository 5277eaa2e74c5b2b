"""CPU route of the sparse linear layers: the C++ SIMD kernel (ops/sparse_cpu.py) or dense F.linear, chosen per
(format, N, K, dtype, bias, M bucket, threads) by timing both once per process on the layer's own weight.

Per key: the sparse kernel is kept when dense F.linear on a dense copy of the same weight (the layer the sparse
one replaced) is not faster than it by more than the 0.97x floor (TIE): medians of >= 5 interleaved calls, for
M buckets <= 16 each call with the caches evicted first (in a whole model a layer's weight comes from memory:
a small layer timed alone would sit in the cache and favour dense). The copy built for the measurement is
dropped right after it.

A layer holds one copy of its weight, so per layer (nn/cpu_route.py, `layer_plan`):
- its form follows its *decode bucket* (M = 1, or PRUNEKIT_SPARSE_CPU_DECODE_M: the batch size of your
  decoding), where generation spends its time: when dense wins that bucket the layer turns into a dense layer
  for good (the dense weight is then its only copy: memory <= dense, speed = dense at every M). The decode
  bucket is measured on a layer shape's first call whatever its M (a prompt comes first).
- otherwise it stays packed (the kernel, at most 0.6x the dense bytes), so decoding is never slower than dense,
  and a bucket where dense wins (e.g. a long prompt) runs the faster of the kernel and dense F.linear on a
  transient unpacked copy (freed after the call; its cost, one pass over the weight, is measured once per
  shape): near dense speed at large M, where the unpacking is small next to the GEMM.
PRUNEKIT_SPARSE_CPU=auto (default) | sparse | dense forces the choice (tests, benchmarks).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import torch

from .. import _native
from . import sparse_cpu

log = logging.getLogger("prunekit")

ENV_MODE = "PRUNEKIT_SPARSE_CPU"
ENV_DECODE_M = "PRUNEKIT_SPARSE_CPU_DECODE_M"
MAX_BUCKET = 2048  # measured: the fp32 2:4 kernel beats dense at M = 256 on 384x1536 / 1536x384 but not at 1600
LARGE_M = 512  # buckets from here are timed with 3 rounds instead of 5 (a 4096x11008 call at M = 2048 takes ~1 s)
TIE = 0.97  # sparse is kept while dense time / sparse time >= TIE (the "never below 0.97x dense" floor)
_choices: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}
_unpack_s: dict[tuple, float] = {}
_generation = [0]  # bumped by clear(): layers drop the plans they cached from earlier measurements


def mode() -> str:
    value = os.environ.get(ENV_MODE, "auto")
    if value not in ("auto", "sparse", "dense"):
        raise ValueError(f"{ENV_MODE} must be auto, sparse or dense, got {value!r}")
    return value


def decode_m() -> int:
    """The M of the bucket that decides a layer's form (PRUNEKIT_SPARSE_CPU_DECODE_M, default 1)."""
    value = os.environ.get(ENV_DECODE_M, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV_DECODE_M} must be a positive integer (the M of decoding), got {value!r}")
    return int(value)


def bucket(M: int) -> int:
    """Powers of two up to MAX_BUCKET; larger M behaves like MAX_BUCKET (compute-bound, time ~linear in M)."""
    return min(MAX_BUCKET, 1 << max(0, (M - 1).bit_length()))


def context() -> tuple:
    """What a layer's cached plan depends on besides its shape and M bucket: (mode, decode M, threads, the
    generation of the measurements)."""
    return mode(), decode_m(), torch.get_num_threads(), _generation[0]


def clear() -> None:
    _generation[0] += 1
    _choices.clear()
    _timings.clear()
    _unpack_s.clear()


def chosen_routes() -> dict[tuple, str]:
    """{(format, N, K, dtype, bias, M bucket, threads): 'sparse' | 'dense'} measured so far."""
    return dict(_choices)


def timings() -> dict[tuple, dict[str, float]]:
    """The measured medians (seconds) behind each choice."""
    return {k: dict(v) for k, v in _timings.items()}


def key(fmt: str, N: int, K: int, dtype: torch.dtype, has_bias: bool, M: int) -> tuple:
    return (fmt, N, K, dtype, has_bias, bucket(M), torch.get_num_threads())


def layer_dense(fmt: str, N: int, K: int, dtype: torch.dtype, has_bias: bool, form_m: int | None = None) -> bool:
    """Whether dense won this layer shape's decode bucket (`form_m`, default decode_m(); at the current thread
    count): the layer goes dense."""
    return _choices.get(key(fmt, N, K, dtype, has_bias, form_m or decode_m())) == "dense"


def interleaved_samples(fns: dict[str, Callable[[], object]], min_reps: int = 5, max_reps: int | None = 15,
                        budget_s: float = 0.1, clock: Callable[[], float] = time.perf_counter,
                        before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, in rounds (a, b, a, b, ...) so that machine noise hits all alike, after one
    warm-up call each: at least `min_reps` rounds, then more until `budget_s` has passed or `max_reps` rounds.
    `clock`: wall time by default; time.thread_time counts only this thread's CPU time (one-thread runs on a
    shared machine). `before`: called (untimed) before each timed call."""
    for fn in fns.values():
        fn()  # warm-up (first-touch allocations, caches)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            if before is not None:
                before()
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)
        reps = len(next(iter(samples.values())))
        if reps >= min_reps and ((max_reps is not None and reps >= max_reps) or time.perf_counter() - start > budget_s):
            return samples


def _flusher(tensors: Sequence[torch.Tensor]) -> Callable[[], object] | None:
    """A `before` hook that evicts exactly these tensors' bytes from the caches (clflush): the next call reads its
    weight from memory, as in a whole model, while the interpreter, x and everything else stay cached. None where
    the CPU has no cache-line flush (the caller falls back to _evict_caches)."""
    mod = _native.cpu_module()
    if mod is None or not hasattr(mod, "flush_cache_lines") or not tensors:
        return None
    spans = [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if t is not None and t.numel()]
    if not spans or not mod.flush_cache_lines(spans[0][0], 0):
        return None
    return lambda: [mod.flush_cache_lines(p, n) for p, n in spans]


def _evict_caches() -> None:
    """Writes a buffer of twice the last-level cache, so the next call finds its weight in memory (as in a whole
    model, whose weights exceed the cache), not left in the cache by the previous call. Coarser than _flusher:
    it also evicts the interpreter's and torch's own data, a constant tens of µs that blurs a small layer's
    ratio (measured: 384x384 fp32 M=1, dense 105 vs sparse 107 µs this way, 60 vs 29 µs with weights alone
    read from memory); used only where no cache-line flush exists."""
    global _evict_buf
    if _evict_buf is None:
        try:
            llc = int(os.sysconf("SC_LEVEL3_CACHE_SIZE")) or int(os.sysconf("SC_LEVEL2_CACHE_SIZE"))
        except (ValueError, OSError, AttributeError):
            llc = 0
        _evict_buf = torch.empty(max(2 * llc, 64 << 20) // 4, dtype=torch.float32)
    _evict_buf.fill_(1.0)


_evict_buf: torch.Tensor | None = None
COLD_MAX_M = 16  # buckets up to this M (memory-bound: decode, small batches) are timed with cold weights


def _median_times(fns: dict[str, Callable[[], object]], budget_s: float = 0.1, max_reps: int = 15,
                  before: Callable[[], object] | None = None, min_reps: int = 5) -> dict[str, float]:
    """Median seconds of each fn (interleaved_samples); `before`: run untimed before each call (cache eviction)."""
    samples = interleaved_samples(fns, min_reps, max_reps, budget_s, before=before)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def decide(fmt: str, x2d: torch.Tensor, N: int, has_bias: bool, sparse_fn: Callable[[torch.Tensor], object],
           dense_weight: Callable[[], torch.Tensor], bias: torch.Tensor | None,
           packed: Sequence[torch.Tensor] = ()) -> str:
    """'sparse' or 'dense' for this call's key (measured on first use of the key; only x2d's shape and dtype
    are used). `packed`: the tensors sparse_fn reads (values, meta, ...), evicted with the dense copy before each
    call of a cold (M <= COLD_MAX_M) measurement."""
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
            before = None
            if k[5] <= COLD_MAX_M:  # evict exactly the weights (both forms) where the CPU can, else the whole cache
                before = (_flusher([W, bias, *packed]) if packed else None) or _evict_caches
            times = _median_times({"dense": lambda: torch.nn.functional.linear(probe, W, bias),
                                   "sparse": lambda: sparse_fn(probe)}, before=before,
                                  min_reps=3 if k[5] >= LARGE_M else 5)
            del W
        # within the 0.97x floor the packed weight (half the memory) wins; a noisy tie does not unpack a layer
        choice = "sparse" if times["sparse"] * TIE <= times["dense"] else "dense"
        _choices[k], _timings[k] = choice, times
        log.info("sparse CPU route %s: dense %.1f us, sparse %.1f us -> %s", k, times["dense"] * 1e6,
                 times["sparse"] * 1e6, choice)
    return choice


def unpack_seconds(fmt: str, N: int, K: int, dtype: torch.dtype, dense_weight: Callable[[], torch.Tensor]) -> float:
    """Median seconds of building the dense weight from the packed one (measured once per shape and threads)."""
    k = (fmt, N, K, dtype, torch.get_num_threads())
    if k not in _unpack_s:
        with torch.inference_mode(False), torch.no_grad():
            samples = interleaved_samples({"unpack": dense_weight}, 3, 5, budget_s=0.05)["unpack"]
            _unpack_s[k] = sorted(samples)[len(samples) // 2]
    return _unpack_s[k]


def layer_plan(fmt: str, x2d: torch.Tensor, N: int, has_bias: bool, sparse_fn: Callable[[torch.Tensor], object],
               dense_weight: Callable[[], torch.Tensor], bias: torch.Tensor | None, form_m: int | None = None,
               packed: Sequence[torch.Tensor] = ()) -> str:
    """For a layer holding one copy of its weight (module docstring): 'dense' (dense won the decode bucket
    `form_m`, default decode_m(): the layer turns dense), 'sparse' (the kernel, for this call) or 'unpack' (this
    call: dense F.linear on a transient unpacked weight beats the kernel)."""
    M, K = x2d.shape
    dm = form_m or decode_m()
    if decide(fmt, x2d.new_empty(dm, K), N, has_bias, sparse_fn, dense_weight, bias, packed) == "dense":
        return "dense"
    if (M == 0 or bucket(M) == bucket(dm)
            or decide(fmt, x2d, N, has_bias, sparse_fn, dense_weight, bias, packed) == "sparse"):
        return "sparse"
    times = _timings.get(key(fmt, N, K, x2d.dtype, has_bias, M))
    if times is None:  # forced modes do not measure
        return "sparse"
    unpack = unpack_seconds(fmt, N, K, x2d.dtype, dense_weight)
    return "unpack" if unpack + times["dense"] < times["sparse"] else "sparse"

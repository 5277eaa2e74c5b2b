"""CUDA route of `prunekit::sparse24_linear`: the mma.sp decode kernel (M <= 64), the Hopper CUTLASS
sm90 prefill GEMM (M bucket >= 128, compute capability 9.x; ops/sparse24_sm90.py), or the dense route:
F.linear on the unpacked weight, cached per weight (ops/sparse24_dense.py).

Choice per (device, N, K, dtype, bias, M bucket), by timing the candidates once per process on the
layer's own weight (cached), so the sparse layer is never slower than the dense route on that shape. The
kernels are timed against the cached dense route (the real competitor: F.linear on a dense weight that
is already there), or against unpack + F.linear when PRUNEKIT_SPARSE24_DENSE_CACHE=0. A converted or
unpacked copy that was built only to be measured is dropped when no bucket of that shape uses its route.
The first measurement also compares each kernel's output with the dense route: a kernel that disagrees
is never used for that key and an error is logged. PRUNEKIT_SPARSE24_KERNEL=mma|sm90|dense forces one
route where it applies (tests, benchmarks); `auto` (default) measures. The metadata is trusted on this
path (validated when the weight was packed or loaded), so a call never synchronizes with the host.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from .. import _native
from . import _dispatch, sparse24_dense, sparse24_sm90

log = logging.getLogger("prunekit")

_BF16_FP16 = (torch.bfloat16, torch.float16)
_choices: dict[tuple, str] = {}


def clear_cache() -> None:
    _choices.clear()
    sparse24_sm90.clear_cache()
    sparse24_dense.clear_cache()


def chosen_routes() -> dict[tuple, str]:
    """What the timing picked so far: {(device, N, K, dtype, bias, M bucket): 'mma' | 'sm90' | 'dense'}."""
    return dict(_choices)


def _mode() -> str:
    mode = os.environ.get("PRUNEKIT_SPARSE24_KERNEL", "auto")
    if mode not in ("auto", "mma", "sm90", "dense"):
        raise ValueError(f"PRUNEKIT_SPARSE24_KERNEL must be auto, mma, sm90 or dense, got {mode!r}")
    return mode


def kernel_supports(x2d: torch.Tensor, values: torch.Tensor) -> bool:
    mod = _native.cuda_module()
    if mod is None or not hasattr(mod, "sparse24_decode_gemm"):
        return False
    M, K = x2d.shape
    return (values.dtype in _BF16_FP16 and 1 <= M <= mod.SPARSE24_MAX_TOKENS and values.shape[0] >= 1
            and K >= mod.SPARSE24_CHUNK_K and K % mod.SPARSE24_CHUNK_K == 0
            and _dispatch.device_capability(x2d.device) >= (8, 0))


def _splits(N: int, K: int, device: torch.device, mod) -> int:
    """Enough K splits that about two blocks per SM are in flight."""
    row_blocks = math.ceil(N / mod.SPARSE24_ROWS_PER_BLOCK)
    chunks = K // mod.SPARSE24_CHUNK_K
    return max(1, min(chunks, math.ceil(2 * _dispatch.sm_count(device) / row_blocks)))


def mma_sp_linear(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                  splits: int | None = None) -> torch.Tensor:
    """y [M, N] from the mma.sp kernel; x2d [M, K] with M <= 64, K % 64 == 0, bf16/fp16 on CUDA."""
    mod = _native.require_cuda_module()
    M, K = x2d.shape
    N = values.shape[0]
    x2d = x2d.contiguous()
    if x2d.data_ptr() % 4:
        x2d = x2d.clone()
    values, meta = values.contiguous(), meta.contiguous()
    if values.data_ptr() % 16 or meta.data_ptr() % 8:  # views into a larger buffer
        values, meta = values.clone(), meta.clone()
    bias = None if bias is None else bias.contiguous()
    chunks = K // mod.SPARSE24_CHUNK_K
    splits = min(splits or _splits(N, K, x2d.device, mod), chunks)
    per_split = math.ceil(chunks / splits)
    splits = math.ceil(chunks / per_split)
    workspace = torch.empty(splits, M, N, dtype=torch.float32, device=x2d.device)
    y = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    # The launch goes to the current device: make it x's (custom ops get no device guard; a model spread
    # over several GPUs calls this with another device current).
    with torch.cuda.device(x2d.device):
        mod.sparse24_decode_gemm(x2d.data_ptr(), values.data_ptr(), meta.data_ptr(),
                                 0 if bias is None else bias.data_ptr(), y.data_ptr(), workspace.data_ptr(),
                                 M, N, K, splits, per_split, _native.dtype_code(x2d, "x"),
                                 _native.stream_of(x2d))
    return y


def dense_linear(x, values, meta, bias):
    """cuBLAS on the cached unpacked weight (Triton unpack on first use; ops/sparse24_dense.py). The
    metadata is not re-validated here: that would cost a host sync and break CUDA graph capture;
    SparseLinear and io.load validate it once."""
    return sparse24_dense.linear(x, values, meta, bias)


def _bucket(M: int) -> int:
    return 1 << max(0, (M - 1).bit_length())


def _time_us(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return sorted(times)[len(times) // 2]


_KERNELS = {"mma": mma_sp_linear, "sm90": sparse24_sm90.linear}


def _candidates(x2d: torch.Tensor, values: torch.Tensor) -> list[str]:
    """The kernels that can serve this call (dense always can)."""
    found = []
    if kernel_supports(x2d, values):
        found.append("mma")
    if sparse24_sm90.supports(x2d, values, _bucket(x2d.shape[0])):
        found.append("sm90")
    return found


def _agrees(key, name: str, probe, values, meta, bias, reference) -> bool:
    try:
        got = _KERNELS[name](probe, values, meta, bias).float()
    except (RuntimeError, ValueError) as exc:
        log.error("sparse24_linear: the %s kernel failed on %s (%s); not using it", name, key, exc)
        return False
    err = float((got - reference).norm() / reference.norm().clamp_min(1e-6))
    if not err < 2e-2:
        log.error("sparse24_linear: the %s kernel disagrees with the dense route on %s (rel err %.3g); "
                  "not using it. Please report this.", name, key, err)
        return False
    return True


def _measure(key, x2d, values, meta, bias, candidates) -> str:
    M = key[-1]
    probe = torch.randn(M, x2d.shape[1], device=x2d.device, dtype=x2d.dtype)
    reference = dense_linear(probe, values, meta, bias).float()  # builds the cached dense copy
    times = {"dense": _time_us(lambda: dense_linear(probe, values, meta, bias))}
    for name in candidates:
        if _agrees(key, name, probe, values, meta, bias, reference):
            times[name] = _time_us(lambda: _KERNELS[name](probe, values, meta, bias))
    choice = min(times, key=times.get)
    log.info("sparse24_linear %s: %s -> %s", key, ", ".join(f"{k} {t:.1f} us" for k, t in times.items()), choice)
    return choice


def _drop_unused_copies(key, values: torch.Tensor) -> None:
    """Frees the copies built only to be measured: those of routes no bucket of this shape uses."""
    used = {choice for k, choice in _choices.items() if k[:-1] == key[:-1]}
    if "sm90" not in used:
        sparse24_sm90.forget(values)
    if "dense" not in used:
        sparse24_dense.forget(values)


def linear_cuda(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None):
    N, K = values.shape[0], 2 * values.shape[1]
    x2d = x.reshape(-1, K)
    mode = _mode()
    candidates = [] if mode == "dense" or x2d.shape[0] == 0 else _candidates(x2d, values)
    if mode in ("mma", "sm90"):
        if mode not in candidates:
            if x2d.shape[0]:
                log.debug("sparse24_linear: the %s kernel does not support M=%d N=%d K=%d %s here; dense route", mode,
                          x2d.shape[0], N, K, values.dtype)
            return dense_linear(x, values, meta, bias)
        choice = mode
    elif not candidates:
        return dense_linear(x, values, meta, bias)
    else:
        key = (str(x.device), N, K, values.dtype, bias is not None, _bucket(x2d.shape[0]))
        choice = _choices.get(key)
        if choice is None:
            if torch.cuda.is_current_stream_capturing():  # cannot time inside a graph capture
                return dense_linear(x, values, meta, bias)
            with torch.cuda.device(x.device):  # the timing events record on the current device
                choice = _choices[key] = _measure(key, x2d, values, meta, bias, candidates)
            _drop_unused_copies(key, values)
        if choice not in candidates:
            return dense_linear(x, values, meta, bias)
    if (choice == "sm90" and torch.cuda.is_current_stream_capturing()
            and not sparse24_sm90.is_prepared(values, meta)):
        return dense_linear(x, values, meta, bias)  # the weight conversion cannot run inside a graph capture
    return _KERNELS[choice](x2d, values, meta, bias).reshape(*x.shape[:-1], N)

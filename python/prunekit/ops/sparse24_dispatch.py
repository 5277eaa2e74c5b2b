"""CUDA route of `prunekit::sparse24_linear`: the mma.sp decode kernel or unpack + dense F.linear.

Choice per (device, N, K, dtype, bias, M bucket), by timing both once per process on the layer's own
weight (cached), so the sparse layer is never slower than the dense route on that shape. The first
measurement also compares the two outputs: if the kernel disagrees with the dense route, it is never
used for that key and an error is logged. PRUNEKIT_SPARSE24_KERNEL=mma|dense forces one route
(tests, benchmarks); `auto` (default) measures. The metadata is trusted on this path (validated when
the weight was packed or loaded), so a call never synchronizes with the host.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F

from .. import _native
from ..kernels import pack24 as unpack_kernel

log = logging.getLogger("prunekit")

_BF16_FP16 = (torch.bfloat16, torch.float16)
_choices: dict[tuple, str] = {}


def clear_cache() -> None:
    _choices.clear()


def chosen_routes() -> dict[tuple, str]:
    """What the timing picked so far: {(device, N, K, dtype, bias, M bucket): 'mma' | 'dense'}."""
    return dict(_choices)


def _mode() -> str:
    mode = os.environ.get("PRUNEKIT_SPARSE24_KERNEL", "auto")
    if mode not in ("auto", "mma", "dense"):
        raise ValueError(f"PRUNEKIT_SPARSE24_KERNEL must be auto, mma or dense, got {mode!r}")
    return mode


def kernel_supports(x2d: torch.Tensor, values: torch.Tensor) -> bool:
    mod = _native.cuda_module()
    if mod is None or not hasattr(mod, "sparse24_decode_gemm"):
        return False
    M, K = x2d.shape
    return (values.dtype in _BF16_FP16 and 1 <= M <= mod.SPARSE24_MAX_TOKENS and values.shape[0] >= 1
            and K >= mod.SPARSE24_CHUNK_K and K % mod.SPARSE24_CHUNK_K == 0 and _capability(x2d.device) >= (8, 0))


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(N: int, K: int, device: torch.device, mod) -> int:
    """Enough K splits that about two blocks per SM are in flight."""
    row_blocks = math.ceil(N / mod.SPARSE24_ROWS_PER_BLOCK)
    chunks = K // mod.SPARSE24_CHUNK_K
    return max(1, min(chunks, math.ceil(2 * _sm_count(device) / row_blocks)))


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
    """Unpack (Triton) + cuBLAS. The metadata is not re-validated here: that would cost a host sync per
    call and break CUDA graph capture; SparseLinear and io.load validate it once."""
    return F.linear(x, unpack_kernel.unpack24(values.contiguous(), meta.contiguous()), bias)


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


def _measure(key, x2d, values, meta, bias) -> str:
    M = key[-1]
    probe = torch.randn(M, x2d.shape[1], device=x2d.device, dtype=x2d.dtype)
    reference = dense_linear(probe, values, meta, bias).float()
    try:
        got = mma_sp_linear(probe, values, meta, bias).float()
    except (RuntimeError, ValueError) as exc:
        log.error("sparse24_linear: the mma.sp kernel failed on %s (%s); using the dense route", key, exc)
        return "dense"
    err = float((got - reference).norm() / reference.norm().clamp_min(1e-6))
    if not err < 2e-2:
        log.error("sparse24_linear: the mma.sp kernel disagrees with the dense route on %s (rel err %.3g); "
                  "using the dense route. Please report this.", key, err)
        return "dense"
    t_mma = _time_us(lambda: mma_sp_linear(probe, values, meta, bias))
    t_dense = _time_us(lambda: dense_linear(probe, values, meta, bias))
    choice = "mma" if t_mma < t_dense else "dense"
    log.info("sparse24_linear %s: mma.sp %.1f us, dense %.1f us -> %s", key, t_mma, t_dense, choice)
    return choice


def linear_cuda(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None):
    N, K = values.shape[0], 2 * values.shape[1]
    x2d = x.reshape(-1, K)
    mode = _mode()
    if mode == "dense" or x2d.shape[0] == 0 or not kernel_supports(x2d, values):
        if mode == "mma" and x2d.shape[0] and not kernel_supports(x2d, values):
            log.debug("sparse24_linear: mma.sp kernel does not support M=%d K=%d %s; dense route", x2d.shape[0], K,
                      values.dtype)
        return dense_linear(x, values, meta, bias)
    if mode == "auto":
        key = (str(x.device), N, K, values.dtype, bias is not None, _bucket(x2d.shape[0]))
        choice = _choices.get(key)
        if choice is None:
            if torch.cuda.is_current_stream_capturing():  # cannot time inside a graph capture
                return dense_linear(x, values, meta, bias)
            with torch.cuda.device(x.device):  # the timing events record on the current device
                choice = _choices[key] = _measure(key, x2d, values, meta, bias)
        if choice == "dense":
            return dense_linear(x, values, meta, bias)
    return mma_sp_linear(x2d, values, meta, bias).reshape(*x.shape[:-1], N)

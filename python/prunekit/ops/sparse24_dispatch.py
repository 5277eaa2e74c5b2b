"""CUDA route of `prunekit::sparse24_linear`: a registry of 2:4 kernels (the mma.sp decode kernels `mma` (v1)
and `v2` for M <= 64, the Hopper CUTLASS sm90 prefill GEMM for M bucket >= 128 on compute capability 9.x;
more can be added with `register`) and the dense route: F.linear on the unpacked weight, cached per weight
(ops/sparse24_dense.py).

Choice per (device, N, K, dtype, bias, M bucket), made once per process on the layer's own weight:
1. every candidate kernel is first checked against the dense route on a seeded probe (ops/selfcheck.py):
   per output feature, |y - y_dense| / (|y_dense| + |x|·|w_n|) must stay under 2e-2 (a few wrong rows of
   a large output cannot hide in a global norm); the check synchronizes inside it, so an asynchronous
   fault is caught; a kernel that raises or disagrees is disabled for the process on that device (logged);
2. the survivors and the dense route are timed as users under CUDA graphs see them: graph replays of
   calls that rotate over enough copies of the weight to exceed twice the L2 (cold weights: a 2:4
   weight that fits the L2 while the dense one does not would otherwise win unfairly); eager event
   timing only when a graph cannot be captured;
3. the fastest wins, so the sparse layer is never slower than the dense route on that shape.
Copies built only to be measured are dropped when no bucket of that shape uses their route.
PRUNEKIT_SPARSE24_KERNEL=<kernel name>|dense forces one route where it applies (still self-checked
unless PRUNEKIT_SELFCHECK=0); `auto` (default) measures. The metadata is trusted on this path (validated
when the weight was packed or loaded), so a call never synchronizes with the host, and the eager host
path allocates only the output: the mma kernel's fp32 workspace is kept per (device, stream).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _native
from . import _dispatch, _timing, selfcheck, sparse24_decode_v2, sparse24_dense, sparse24_sm90

log = logging.getLogger("prunekit")

_BF16_FP16 = (torch.bfloat16, torch.float16)
OP = "sparse24_linear"
TOLERANCE = 2e-2  # per output feature, relative to |y| + |x|·|w| (bf16 outputs round at ~4e-3)
_choices: dict[tuple, str] = {}


@dataclass
class Kernel:
    """A 2:4 kernel the dispatcher may pick: fn(x2d [M, K], values, meta, bias) -> y [M, N];
    supports(x2d, values, M bucket) says whether it can serve the call at all."""

    name: str
    fn: Callable[..., torch.Tensor]
    supports: Callable[[torch.Tensor, torch.Tensor, int], bool]


KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> None:
    """Adds a candidate (e.g. a decode kernel variant); bench_linear times every registered kernel."""
    KERNELS[kernel.name] = kernel


def clear_cache() -> None:
    _choices.clear()
    _dispatch.clear_workspaces()
    sparse24_sm90.clear_cache()
    sparse24_decode_v2.clear_cache()
    sparse24_dense.clear_cache()


def chosen_routes() -> dict[tuple, str]:
    """What the timing picked so far: {(device, N, K, dtype, bias, M bucket): kernel name | 'dense'}."""
    return dict(_choices)


def _mode() -> str:
    mode = os.environ.get("PRUNEKIT_SPARSE24_KERNEL", "auto")
    if mode not in ("auto", "dense", *KERNELS):
        raise ValueError(f"PRUNEKIT_SPARSE24_KERNEL must be auto, {', '.join(KERNELS)} or dense, got {mode!r}")
    return mode


# ---- the mma.sp decode kernel ----

def kernel_supports(x2d: torch.Tensor, values: torch.Tensor, bucket: int | None = None) -> bool:
    mod = _native.cuda_module()
    if mod is None or not hasattr(mod, "sparse24_decode_gemm"):
        return False
    M, K = x2d.shape
    return (values.dtype in _BF16_FP16 and 1 <= M <= mod.SPARSE24_MAX_TOKENS and values.shape[0] >= 1
            and K >= mod.SPARSE24_CHUNK_K and K % mod.SPARSE24_CHUNK_K == 0
            and _dispatch.device_capability(x2d.device) >= (8, 0))


@functools.lru_cache(maxsize=4096)
def _split_plan(N: int, K: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(splits, chunks per split): by default enough K splits that about two blocks per SM are in flight.
    PRUNEKIT_SPARSE24_SPLITS (benchmarks) or `splits` overrides the count."""
    mod = _native.require_cuda_module()
    chunks = K // mod.SPARSE24_CHUNK_K
    if splits is None:
        row_blocks = math.ceil(N / mod.SPARSE24_ROWS_PER_BLOCK)
        splits = max(1, math.ceil(2 * _dispatch.sm_count(device) / row_blocks))
    splits = max(1, min(splits, chunks))
    per_split = math.ceil(chunks / splits)
    return math.ceil(chunks / per_split), per_split


def _env_splits() -> int | None:
    value = os.environ.get("PRUNEKIT_SPARSE24_SPLITS")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"PRUNEKIT_SPARSE24_SPLITS must be a positive integer, got {value!r}")
    return int(value)


def mma_sp_linear(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                  splits: int | None = None) -> torch.Tensor:
    """y [M, N] from the mma.sp kernel; x2d [M, K] with M <= 64, K % 64 == 0, bf16/fp16 on CUDA."""
    mod = _native.require_cuda_module()
    M, K = x2d.shape
    N = values.shape[0]
    fresh = torch.contiguous_format
    if not x2d.is_contiguous() or x2d.data_ptr() % 4:
        x2d = x2d.clone(memory_format=fresh)
    if not (values.is_contiguous() and meta.is_contiguous()) or values.data_ptr() % 16 or meta.data_ptr() % 8:
        values, meta = values.clone(memory_format=fresh), meta.clone(memory_format=fresh)  # views into a buffer
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    device = x2d.device
    splits, per_split = _split_plan(N, K, device, splits or _env_splits())
    y = torch.empty(M, N, dtype=x2d.dtype, device=device)
    # The launch goes to the current device: make it x's (custom ops get no device guard; a model spread
    # over several GPUs calls this with another device current). Entered only when it is not current.
    guard = _dispatch.device_guard(device)
    with guard:
        stream = _native.stream_of(x2d)
        workspace = _dispatch.workspace(device, stream, 4 * splits * M * N)
        mod.sparse24_decode_gemm(x2d.data_ptr(), values.data_ptr(), meta.data_ptr(),
                                 0 if bias is None else bias.data_ptr(), y.data_ptr(), workspace.data_ptr(),
                                 M, N, K, splits, per_split, _native.dtype_code(x2d, "x"), stream)
    return y


register(Kernel("mma", mma_sp_linear, kernel_supports))
register(Kernel("sm90", sparse24_sm90.linear, sparse24_sm90.supports))
# decode kernel v2 (M <= 64): autotunes its own variant x blocks-per-SM config once per key, each config
# checked against the dense product; bench_linear reports every config (ops/sparse24_decode_v2.py)
register(Kernel("v2", sparse24_decode_v2.tuned_linear, sparse24_decode_v2.supports))


def dense_linear(x, values, meta, bias):
    """cuBLAS on the cached unpacked weight (Triton unpack on first use; ops/sparse24_dense.py). The
    metadata is not re-validated here: that would cost a host sync and break CUDA graph capture;
    SparseLinear and io.load validate it once."""
    return sparse24_dense.linear(x, values, meta, bias)


def _bucket(M: int) -> int:
    return 1 << max(0, (M - 1).bit_length())


def _candidates(x2d: torch.Tensor, values: torch.Tensor) -> list[str]:
    """The registered kernels that can serve this call and are not disabled on this device."""
    bucket = _bucket(x2d.shape[0])
    return [name for name, k in KERNELS.items()
            if not selfcheck.is_disabled(OP, name, x2d.device) and k.supports(x2d, values, bucket)]


# ---- first-use check: per output feature, against the dense route ----

def _compare(x2d: torch.Tensor, W: torch.Tensor):
    """Per output feature n: ||y[:, n] - ref[:, n]|| / (||ref[:, n]|| + ||(|x|·|w_n|)||): the second term is
    the size of the dot product's terms, so features that cancel to ~0 are judged against rounding."""
    W = W.float()
    scale = torch.sqrt((x2d.float() ** 2) @ (W ** 2).t()).norm(dim=0)  # [N]

    def compare(got, expected):
        err = selfcheck.row_relative_error(got.float().t(), expected.float().t(), scale)
        return err, f"max per-feature rel err {err:.3g} (tolerance {TOLERANCE:g})"
    compare.tolerance = TOLERANCE
    return compare


def _verified(key, name: str, probe: torch.Tensor, values, meta, bias) -> bool:
    """Whether kernel `name` may serve `key` (checked against F.linear on the unpacked weight on first use;
    the unpack is itself self-checked)."""
    route = selfcheck.Route(name, lambda x: KERNELS[name].fn(x, values, meta, bias))
    weight = {}

    def reference(x):
        weight["W"] = sparse24_dense.unpack(values, meta)
        return torch.nn.functional.linear(x, weight["W"], bias)

    def compare(got, expected):
        return _compare(probe, weight["W"])(got, expected)
    compare.tolerance = TOLERANCE
    return selfcheck.ready(OP, route, reference, lambda: (probe,), compare, device=probe.device,
                           dtype=values.dtype, shape_class=key[1:])


# ---- timing as users under CUDA graphs see it ----

def _rotation(values, meta, bias, budget_bytes: int = 1 << 30) -> list[tuple]:
    """The weight plus enough copies that one pass over all of them exceeds twice the L2 (at most 8, and
    at most `budget_bytes` of dense copies), so every call finds its weight cold, as a real model does."""
    device = values.device
    N, K = values.shape[0], 2 * values.shape[1]
    packed = values.numel() * values.element_size() + meta.numel()
    dense = N * K * values.element_size()
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    n = min(8, max(1, math.ceil(2 * l2 / packed)), max(1, budget_bytes // (dense + packed)))
    copies = [(values, meta, bias)]
    try:
        for _ in range(n - 1):
            copies.append((values.clone(), meta.clone(), bias))
    except torch.cuda.OutOfMemoryError:
        log.info("sparse24_linear: no memory for weight copies to time cold weights; timing with %d", len(copies))
    return copies


def _time_route(fn, probe, copies) -> tuple[float, str]:
    return _timing.time_us([lambda v=v, m=m, b=b: fn(probe, v, m, b) for v, m, b in copies], "sparse24_linear")


def _measure(key, x2d, values, meta, bias, candidates) -> str:
    M = key[-1]
    gen = torch.Generator(device=x2d.device).manual_seed(0)
    probe = torch.randn(M, x2d.shape[1], device=x2d.device, dtype=x2d.dtype, generator=gen)
    verified = [name for name in candidates if _verified(key, name, probe, values, meta, bias)]
    copies = _rotation(values, meta, bias)
    times = {"dense": _time_route(dense_linear, probe, copies)}
    for name in verified:
        times[name] = _time_route(KERNELS[name].fn, probe, copies)
    del copies
    choice = min(times, key=lambda k: times[k][0])
    log.info("sparse24_linear %s: %s -> %s", key,
             ", ".join(f"{k} {t:.1f} us ({how}, {len(times)} routes)" for k, (t, how) in times.items()), choice)
    return choice


def _drop_unused_copies(key, values: torch.Tensor) -> None:
    """Frees the copies built only to be measured: those of routes no bucket of this shape uses."""
    used = {choice for k, choice in _choices.items() if k[:-1] == key[:-1]}
    if "sm90" not in used:
        sparse24_sm90.forget(values)
    if "v2" not in used:
        sparse24_decode_v2.forget(values)
    if "dense" not in used:
        sparse24_dense.forget(values)


def linear_cuda(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None):
    N, K = values.shape[0], 2 * values.shape[1]
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    mode = _mode()
    candidates = [] if mode == "dense" or M == 0 else _candidates(x2d, values)
    key = (str(x.device), N, K, values.dtype, bias is not None, _bucket(M))
    if mode != "auto" and mode != "dense":
        if mode not in candidates:
            if M:
                log.debug("sparse24_linear: the %s kernel does not serve M=%d N=%d K=%d %s here; dense route",
                          mode, M, N, K, values.dtype)
            return dense_linear(x, values, meta, bias)
        if not _verified(key, mode, x2d[: min(M, 8)].contiguous(), values, meta, bias):
            return dense_linear(x, values, meta, bias)
        choice = mode
    elif not candidates:
        return dense_linear(x, values, meta, bias)
    else:
        choice = _choices.get(key)
        if choice is None:
            if torch.cuda.is_current_stream_capturing():  # cannot check or time inside a graph capture
                return dense_linear(x, values, meta, bias)
            with torch.cuda.device(x.device):  # the timing events record on the current device
                choice = _choices[key] = _measure(key, x2d, values, meta, bias, candidates)
            _drop_unused_copies(key, values)
        if choice not in candidates:  # disabled since, or not supported for this exact M
            return dense_linear(x, values, meta, bias)
    if (choice == "sm90" and torch.cuda.is_current_stream_capturing()
            and not sparse24_sm90.is_prepared(values, meta)):
        return dense_linear(x, values, meta, bias)  # the weight conversion cannot run inside a graph capture
    return KERNELS[choice].fn(x2d, values, meta, bias).reshape(*x.shape[:-1], N)

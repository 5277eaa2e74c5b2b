"""Hopper prefill route of `prunekit::sparse24_linear`: CUTLASS's sm90 2:4 GEMM (csrc/cuda/sparse24_sm90.cu).

The kernel reads W in CUTLASS's own compressed layout and sm90 metadata, not the logical format that is
saved (DESIGN.md §5). `prepared` converts once per weight tensor and device (unpack to dense 2:4 with
Triton, then CUTLASS's compressor) and caches the result next to the weight (ops/_weight_cache.py: keyed
by the `values` tensor object, dropped with it, rebuilt when values/meta change in place or meta is
replaced).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import _native
from . import _dispatch, _weight_cache, sparse24_dense

MIN_TOKENS = 128  # below this, the decode kernel or dense wins (DESIGN.md §6); the dispatcher times it
_BF16_FP16 = (torch.bfloat16, torch.float16)


@dataclass
class Sm90Weight:
    compressed: torch.Tensor  # uint8, CUTLASS compressed A
    metadata: torch.Tensor    # uint8, CUTLASS sm90 metadata E


_prepared = _weight_cache.DerivedWeights()


def clear_cache() -> None:
    _prepared.clear()


def compiled() -> tuple[bool, str]:
    """(whether this build has the sm90 GEMM, why not)."""
    mod = _native.cuda_module()
    if mod is None:
        return False, f"prunekit._C_cuda did not load ({_native._errors.get('_C_cuda', 'not loaded')})"
    if not hasattr(mod, "sparse24_sm90_compiled"):
        return False, "prunekit._C_cuda predates the sm90 2:4 GEMM; rebuild"
    return bool(mod.sparse24_sm90_compiled()), mod.sparse24_sm90_reason()


def supports(x2d: torch.Tensor, values: torch.Tensor, bucket: int) -> bool:
    """Shape/dtype/device rules of the kernel, plus the M >= 128 bucket rule of the dispatcher."""
    N, K = values.shape[0], 2 * values.shape[1]
    if bucket < MIN_TOKENS or values.dtype not in _BF16_FP16 or K % 16 or N % 8 or not x2d.is_cuda:
        return False
    return compiled()[0] and _dispatch.device_capability(x2d.device)[0] == 9 and _cutlass_accepts(N, K, values.dtype)


@functools.lru_cache(maxsize=None)
def _cutlass_accepts(N: int, K: int, dtype: torch.dtype) -> bool:
    """CUTLASS's own host-side checks of the layouts and alignments this weight shape gives."""
    return _native.require_cuda_module().sparse24_sm90_can_implement(MIN_TOKENS, N, K, _native.DTYPE_CODES[dtype])


def is_prepared(values: torch.Tensor, meta: torch.Tensor) -> bool:
    return _prepared.lookup(values, meta) is not None


def compress(values: torch.Tensor, meta: torch.Tensor) -> Sm90Weight:
    """Logical (values, meta) on a CUDA device -> CUTLASS's sm90 compressed A + metadata (not cached)."""
    mod = _native.require_cuda_module()
    N, K = values.shape[0], 2 * values.shape[1]
    code = _native.dtype_code(values, "values")
    compressed_bytes, metadata_bytes, workspace_bytes = mod.sparse24_sm90_sizes(N, K, code)
    dense = sparse24_dense.unpack(values, meta)  # at most 2 nonzeros per group (self-checked Triton unpack)
    device = values.device
    compressed = torch.zeros(compressed_bytes, dtype=torch.uint8, device=device)
    metadata = torch.zeros(metadata_bytes, dtype=torch.uint8, device=device)
    workspace = torch.empty(max(workspace_bytes, 16), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):  # launches go to the current device; custom ops get no device guard
        mod.sparse24_sm90_compress(dense.data_ptr(), compressed.data_ptr(), metadata.data_ptr(),
                                   workspace.data_ptr(), N, K, code, _native.stream_of(values))
    return Sm90Weight(compressed, metadata)


def forget(values: torch.Tensor) -> None:
    """Drops a weight's converted copy (the dispatcher did not pick sm90 for it: no memory kept for nothing)."""
    _prepared.forget(values)


def prepared(values: torch.Tensor, meta: torch.Tensor) -> Sm90Weight:
    if not is_prepared(values, meta) and _weight_cache.capturing(values):
        raise RuntimeError("sparse24_linear (sm90): the weight's one-time conversion cannot run inside a CUDA "
                           "graph capture; run one forward before capturing")
    return _prepared.get_or_build(values, meta, compress)


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(device: torch.device, M: int, N: int, K: int, code: int) -> int:
    return _native.require_cuda_module().sparse24_sm90_workspace_bytes(M, N, K, code, _dispatch.sm_count(device))


def linear(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ W.T + bias on Hopper; bf16/fp16, N % 8 == 0, K % 16 == 0."""
    mod = _native.require_cuda_module()
    weight = prepared(values, meta)
    M, K = x2d.shape
    N = values.shape[0]
    if not x2d.is_contiguous() or x2d.data_ptr() % 16:
        x2d = x2d.clone(memory_format=torch.contiguous_format)
    if bias is not None and (not bias.is_contiguous() or bias.data_ptr() % 16):
        bias = bias.clone(memory_format=torch.contiguous_format)
    code = _native.dtype_code(x2d, "x")
    device = x2d.device
    workspace_bytes = _workspace_bytes(device, M, N, K, code)
    y = torch.empty(M, N, dtype=x2d.dtype, device=device)
    with _dispatch.device_guard(device):  # the launch (and CUTLASS's device queries) use the current device
        stream = _native.stream_of(x2d)
        workspace = _dispatch.workspace(device, stream, workspace_bytes) if workspace_bytes else None
        mod.sparse24_sm90_gemm(x2d.data_ptr(), weight.compressed.data_ptr(), weight.metadata.data_ptr(),
                               0 if bias is None else bias.data_ptr(), y.data_ptr(),
                               0 if workspace is None else workspace.data_ptr(), workspace_bytes, M, N, K, code,
                               _dispatch.sm_count(device), stream)
    return y

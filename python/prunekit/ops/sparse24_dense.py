"""Dense route of `prunekit::sparse24_linear`: F.linear on the unpacked weight, the unpacked copy cached.

Unpacking on every call reads the packed weight and writes a dense one before F.linear reads it again
(~1.5x the dense weight bytes more than nn.Linear), so a layer on this route would be slower than the dense
layer it replaced. The unpacked [out, in] weight is therefore cached per weight (ops/_weight_cache.py:
built on first use, keyed by the `values` tensor, freed with it, rebuilt after an in-place change to
values/meta or a replaced meta). The price is memory: a layer that takes this route keeps a dense copy
next to its packed weight. PRUNEKIT_SPARSE24_DENSE_CACHE=0 turns the cache off (unpack per call, and any
cached copy is dropped at its next use).

CUDA graphs: the copy cannot be built inside a capture; a capture uses a valid cached copy when there is one
and otherwise unpacks inside the graph (correct, slower). Run one forward per input shape before capturing
(as the sm90 route needs anyway) so the copy exists.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..ref import pack24 as ref_pack
from . import _weight_cache, selfcheck

ENV = "PRUNEKIT_SPARSE24_DENSE_CACHE"

_unpacked = _weight_cache.DerivedWeights()


def enabled() -> bool:
    flag = os.environ.get(ENV, "1")
    if flag not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {flag!r}")
    return flag == "1"


def unpack(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense [out, in] weight, not cached. CUDA: the Triton kernel without re-validating meta (a host
    sync per call, and no graph capture; SparseLinear and io.load validate it once). CPU: the C++ op."""
    if values.is_cuda:
        return _unpack_gpu(values.contiguous(), meta.contiguous())
    return torch.ops.prunekit.unpack24(values, meta)


def _unpack_triton(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    from ..kernels import pack24 as unpack_kernel

    return unpack_kernel.unpack24(values, meta)


def unpack_torch(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The reference unpack without the nibble validation (no host sync: safe inside a graph capture)."""
    rows, half = values.shape
    nib = ref_pack.nibbles(meta).reshape(rows, half // 2)
    pos = torch.stack((nib & 3, nib >> 2), dim=-1)
    bits = ref_pack.as_bits(values).reshape(rows, half // 2, 2)
    out = torch.zeros(rows, half // 2, 4, dtype=bits.dtype, device=values.device)
    return out.scatter_(-1, pos, bits).reshape(rows, 2 * half).view(values.dtype)


def _unpack_gpu(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The Triton unpack, self-checked on first use against the reference on a few rows (ops/selfcheck.py);
    the torch unpack when it is disabled (or unchecked inside a graph capture)."""
    return selfcheck.run("unpack24", [selfcheck.Route("triton", _unpack_triton)], unpack_torch, (values, meta),
                         probe=lambda: (selfcheck.head_rows(values, 4), selfcheck.head_rows(meta, 4)),
                         compare=selfcheck.exact, device=values.device, dtype=values.dtype,
                         shape_class=(2 * values.shape[1],))


def weight(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense weight from the cache (built here on first use) unless the cache is off or a CUDA graph is
    being captured without a valid copy."""
    if not enabled():
        _unpacked.forget(values)
        return unpack(values, meta)
    cached = _unpacked.lookup(values, meta)
    if cached is not None:
        return cached
    if _weight_cache.capturing(values):
        return unpack(values, meta)
    return _unpacked.get_or_build(values, meta, unpack)


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight(values, meta), bias)


def uncached_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, unpack(values, meta), bias)


def is_cached(values: torch.Tensor, meta: torch.Tensor) -> bool:
    return _unpacked.lookup(values, meta) is not None


def forget(values: torch.Tensor) -> None:
    """Drops a weight's dense copy (the dispatcher does not use the dense route for its shape)."""
    _unpacked.forget(values)


def clear_cache() -> None:
    _unpacked.clear()

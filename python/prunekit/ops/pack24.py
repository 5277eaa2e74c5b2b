"""Custom ops `prunekit::pack24(W) -> (values, meta)` and `prunekit::unpack24(values, meta) -> W`.

Format and choices: prunekit/ref/pack24.py. CPU runs the C++ kernel (csrc/cpu/pack24.cpp), CUDA runs
the Triton kernels (kernels/pack24.py); both agree bit for bit with the reference.
"""
from __future__ import annotations

import torch

from .. import _native
from ..ref import pack24 as ref
from . import selfcheck
from ._dispatch import contiguous


def _word_bytes(t: torch.Tensor) -> int:
    return t.element_size()


@torch.library.custom_op("prunekit::pack24", mutates_args=())
def pack24(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.pack24(W)


@pack24.register_fake
def _(W):
    ref.check_packable(W)
    rows, k = W.shape
    return W.new_empty(rows, k // 2), W.new_empty(rows, k // 8, dtype=torch.uint8)


@torch.library.custom_op("prunekit::unpack24", mutates_args=())
def unpack24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return ref.unpack24(values, meta)


@unpack24.register_fake
def _(values, meta):
    ref.check_packed(values, meta)
    rows, half = values.shape
    return values.new_empty(rows, 2 * half)


def _raise_over_full(W: torch.Tensor, flat_group: int):
    rows, k = W.shape
    r, g = divmod(flat_group, k // 4)
    count = int(ref.nonzero_bits(W[r, 4 * g: 4 * g + 4]).sum())
    raise ref.over_full_error("W", r, g, count)


@pack24.register_kernel("cpu")
def _(W):
    ref.check_packable(W)
    W = contiguous(W)
    rows, k = W.shape
    values = torch.empty(rows, k // 2, dtype=W.dtype)
    meta = torch.empty(rows, k // 8, dtype=torch.uint8)
    bad = _native.require_cpu_module().pack24(W.data_ptr(), values.data_ptr(), meta.data_ptr(), rows, k,
                                              _word_bytes(W))
    if bad >= 0:
        _raise_over_full(W, bad)
    return values, meta


@unpack24.register_kernel("cpu")
def _(values, meta):
    ref.check_packed(values, meta)
    values, meta = contiguous(values), contiguous(meta)
    rows, half = values.shape
    W = torch.empty(rows, 2 * half, dtype=values.dtype)
    bad = _native.require_cpu_module().unpack24(values.data_ptr(), meta.data_ptr(), W.data_ptr(), rows, 2 * half,
                                                _word_bytes(values))
    if bad >= 0:
        ref.nibble_positions(meta)  # words the error (row, group, nibble)
        raise ValueError(f"meta: invalid 2:4 metadata nibble in group {bad} (flat index)")
    return W


def triton_pack24(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path with the reference's checks and error messages (CUDA, or CPU under the interpreter)."""
    from ..kernels import pack24 as kernel

    ref.check_packable(W)
    values, meta = kernel.pack24(contiguous(W))
    over_full = ((meta & 0xF) == 0) | ((meta >> 4) == 0)  # nibble 0x0 marks a group with >2 nonzeros
    if bool(over_full.any()):
        first = int(over_full.reshape(-1).nonzero()[0])
        r, byte = divmod(first, meta.shape[1])
        g = 2 * byte if int(meta[r, byte]) & 0xF == 0 else 2 * byte + 1
        _raise_over_full(W, r * (W.shape[1] // 4) + g)
    return values, meta


def triton_unpack24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    from ..kernels import pack24 as kernel

    ref.check_packed(values, meta)
    ref.nibble_positions(meta)  # validates every nibble (1/16 of the dense bytes) before the kernel
    return kernel.unpack24(contiguous(values), contiguous(meta))


PROBE_ROWS = 4  # rows are packed independently


def checked_pack24(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton pack, self-checked on first use (exact, ops/selfcheck.py); the reference when disabled."""
    ref.check_packable(W)
    return selfcheck.run("pack24", [selfcheck.Route("triton", triton_pack24)], ref.pack24, (W,),
                         probe=lambda: (selfcheck.head_rows(W, PROBE_ROWS),), compare=selfcheck.exact,
                         device=W.device, dtype=W.dtype, shape_class=(W.shape[1],))


def checked_unpack24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    ref.check_packed(values, meta)
    return selfcheck.run("unpack24", [selfcheck.Route("triton", triton_unpack24)], ref.unpack24, (values, meta),
                         probe=lambda: (selfcheck.head_rows(values, PROBE_ROWS), selfcheck.head_rows(meta, PROBE_ROWS)),
                         compare=selfcheck.exact, device=values.device, dtype=values.dtype,
                         shape_class=(2 * values.shape[1],))


@pack24.register_kernel("cuda")
def _(W):
    return checked_pack24(W)


@unpack24.register_kernel("cuda")
def _(values, meta):
    return checked_unpack24(values, meta)

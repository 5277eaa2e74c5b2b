"""Custom ops `prunekit::bitmask_linear(x, values, mask, row_offsets, bias?) -> y`: y = x @ W.T + bias with W in
the bitmask format for unstructured sparsity (ref/bitmask.py), and `prunekit::bitmask_unpack(values, mask) -> W`
(the dense weight, bit for bit the reference's). CPU: the C++ SIMD kernel or dense F.linear (on the C++
unpack), chosen per (shape, dtype, M bucket) by a one-time timing (ops/sparse_cpu_route.py). Other devices:
the reference (unpack + F.linear). Inference only (no autograd formula).
"""
from __future__ import annotations

import torch

from ..ref import bitmask as ref
from . import sparse_cpu, sparse_cpu_route


def check_inputs(x, values, mask, row_offsets, bias) -> None:
    if mask.dim() != 2 or mask.dtype != torch.uint8:
        raise ValueError(f"mask: expected uint8 [out_features, in_features/8], got {tuple(mask.shape)} {mask.dtype}")
    N, K = mask.shape[0], 8 * mask.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dimension {K} (in_features), got shape {tuple(x.shape)}")
    if x.dtype != values.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the sparse weight has {values.dtype}; cast one of them")
    if values.dim() != 1:
        raise ValueError(f"values: expected a 1-D tensor (kept values + {ref.PADDING} padding), got {tuple(values.shape)}")
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (N + 1,):
        raise ValueError(f"row_offsets: expected int64 [{N + 1}], got {tuple(row_offsets.shape)} {row_offsets.dtype}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != values.dtype):
        raise ValueError(f"bias: expected shape ({N},) and dtype {values.dtype}, got {tuple(bias.shape)} {bias.dtype}")


@torch.library.custom_op("prunekit::bitmask_linear", mutates_args=())
def bitmask_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    check_inputs(x, values, mask, row_offsets, bias)
    return ref.linear(x, values, mask, bias)


@bitmask_linear.register_fake
def _(x, values, mask, row_offsets, bias=None):
    check_inputs(x, values, mask, row_offsets, bias)
    return x.new_empty(*x.shape[:-1], mask.shape[0])


@torch.library.custom_op("prunekit::bitmask_unpack", mutates_args=())
def bitmask_unpack(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ref.unpack(values, mask)


@bitmask_unpack.register_fake
def _(values, mask):
    return values.new_empty(mask.shape[0], 8 * mask.shape[1])


@bitmask_unpack.register_kernel("cpu")
def _(values, mask):
    if values.dtype not in sparse_cpu.DTYPES or not sparse_cpu.available():
        return ref.unpack(values, mask)
    return sparse_cpu.bitmask_unpack(values, mask)


def _dense_linear(x, values, mask, bias):
    return torch.nn.functional.linear(x, bitmask_unpack(values, mask), bias)


@bitmask_linear.register_kernel("cpu")
def _(x, values, mask, row_offsets, bias=None):
    check_inputs(x, values, mask, row_offsets, bias)
    N, K = mask.shape[0], 8 * mask.shape[1]
    if values.dtype not in sparse_cpu.DTYPES:
        return ref.linear(x, values, mask, bias)
    choice = sparse_cpu_route.decide("bitmask", x.reshape(-1, K), N, bias is not None,
                                     lambda p: sparse_cpu.bitmask_linear(p, values, mask, row_offsets, bias),
                                     lambda: bitmask_unpack(values, mask), bias, (values, mask, row_offsets))
    if choice == "dense":
        return _dense_linear(x, values, mask, bias)
    return sparse_cpu.bitmask_linear(x, values, mask, row_offsets, bias)

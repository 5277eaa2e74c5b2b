"""Per-input-feature sum of squares of a [tokens, features] activation, read once in its own dtype.

The plain route (x.float().pow(2).sum(0)) writes and re-reads an fp32 copy of the activation; this
kernel upcasts in registers. Programs own a column tile and a slice of the rows; the slices' partial
sums are added in a fixed order afterwards, so the result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

BLOCK_R = 64
BLOCK_C = 64
MAX_SPLITS = 64


@triton.jit
def _sum_sq_kernel(x_ptr, partial_ptr, rows, cols, stride_r, rows_per_split,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, rows)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(first, last, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < last)[:, None] & (c < cols)[None, :]
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_r + c[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + split * cols + c, tl.sum(acc, axis=0), mask=c < cols)


def sum_sq_triton(x: torch.Tensor) -> torch.Tensor:
    """Σ_rows x² per column of a 2-D tensor with unit column stride, in fp32."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"sum_sq_triton: expected a 2-D tensor with unit column stride, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return torch.zeros(cols, dtype=torch.float32, device=x.device)
    # Enough row slices to fill the GPU when there are few column tiles, each slice a few row tiles.
    splits = max(1, min(MAX_SPLITS, triton.cdiv(rows, 4 * BLOCK_R)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), BLOCK_R) * BLOCK_R
    splits = max(1, triton.cdiv(rows, rows_per_split))
    partial = torch.empty((splits, cols), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(cols, BLOCK_C), splits)
    with _launch.on_device(x):
        _sum_sq_kernel[grid](x, partial, rows, cols, x.stride(0), rows_per_split, BLOCK_R=BLOCK_R,
                             BLOCK_C=BLOCK_C)
    return partial.sum(0)

"""Triton 2:4 pack/unpack for CUDA tensors (the logical format of prunekit/ref/pack24.py).

Weights travel as raw integer words (int16 for fp16/bf16, int32 for fp32): values are copied, never
computed. Each program handles BLOCK_R rows x BLOCK_B metadata bytes (= 2 groups = 8 inputs each).
A group with more than two nonzeros gets the undefined nibble 0x0, which the caller finds afterwards
(valid nibbles are never 0), so no atomics are needed to report the first offending group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

BLOCK_R = 16
BLOCK_B = 32


@triton.jit
def _pack_group(w_ptr, row_off, col0, mask, MAG: tl.constexpr):
    """Kept values and nibble of the group starting at column col0 ([BR, BB] tiles)."""
    x0 = tl.load(w_ptr + row_off + col0 + 0, mask=mask, other=0)
    x1 = tl.load(w_ptr + row_off + col0 + 1, mask=mask, other=0)
    x2 = tl.load(w_ptr + row_off + col0 + 2, mask=mask, other=0)
    x3 = tl.load(w_ptr + row_off + col0 + 3, mask=mask, other=0)
    n0 = ((x0 & MAG) != 0).to(tl.int32)
    n1 = ((x1 & MAG) != 0).to(tl.int32)
    n2 = ((x2 & MAG) != 0).to(tl.int32)
    n3 = ((x3 & MAG) != 0).to(tl.int32)
    count = n0 + n1 + n2 + n3
    fill = 2 - count  # how many of the lowest zero positions become explicit zeros
    # a zero position j is filled when fewer than `fill` zeros precede it
    z0 = 1 - n0
    z1 = 1 - n1
    z2 = 1 - n2
    z3 = 1 - n3
    c0 = (n0 + z0 * (0 < fill).to(tl.int32)) > 0
    c1 = (n1 + z1 * (z0 < fill).to(tl.int32)) > 0
    c2 = (n2 + z2 * (z0 + z1 < fill).to(tl.int32)) > 0
    c3 = (n3 + z3 * (z0 + z1 + z2 < fill).to(tl.int32)) > 0
    idx0 = tl.where(c0, 0, tl.where(c1, 1, 2))
    idx1 = tl.where(c3, 3, tl.where(c2, 2, 1))
    v0 = tl.where(c0, x0, tl.where(c1, x1, x2))
    v1 = tl.where(c3, x3, tl.where(c2, x2, x1))
    nibble = tl.where(count > 2, 0, idx0 | (idx1 << 2))
    return v0, v1, nibble


@triton.jit
def _pack24_kernel(w_ptr, v_ptr, m_ptr, rows, k, MAG: tl.constexpr, BR: tl.constexpr, BB: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    b = tl.program_id(1) * BB + tl.arange(0, BB)[None, :]
    mask = (r < rows) & (b < k // 8)
    row_w = r.to(tl.int64) * k
    row_v = r.to(tl.int64) * (k // 2)
    v0, v1, lo = _pack_group(w_ptr, row_w, 8 * b, mask, MAG)
    tl.store(v_ptr + row_v + 4 * b + 0, v0, mask=mask)
    tl.store(v_ptr + row_v + 4 * b + 1, v1, mask=mask)
    v2, v3, hi = _pack_group(w_ptr, row_w, 8 * b + 4, mask, MAG)
    tl.store(v_ptr + row_v + 4 * b + 2, v2, mask=mask)
    tl.store(v_ptr + row_v + 4 * b + 3, v3, mask=mask)
    tl.store(m_ptr + r.to(tl.int64) * (k // 8) + b, (lo | (hi << 4)).to(tl.uint8), mask=mask)


@triton.jit
def _unpack_group(v_ptr, w_ptr, row_v, row_w, b, nibble, half: tl.constexpr, mask):
    idx0 = nibble & 3
    idx1 = nibble >> 2
    v0 = tl.load(v_ptr + row_v + 4 * b + 2 * half, mask=mask, other=0)
    v1 = tl.load(v_ptr + row_v + 4 * b + 2 * half + 1, mask=mask, other=0)
    zero = tl.zeros_like(v0)
    col = 8 * b + 4 * half
    for j in tl.static_range(4):
        out = tl.where(idx0 == j, v0, tl.where(idx1 == j, v1, zero))
        tl.store(w_ptr + row_w + col + j, out, mask=mask)


@triton.jit
def _unpack24_kernel(v_ptr, m_ptr, w_ptr, rows, k, BR: tl.constexpr, BB: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    b = tl.program_id(1) * BB + tl.arange(0, BB)[None, :]
    mask = (r < rows) & (b < k // 8)
    byte = tl.load(m_ptr + r.to(tl.int64) * (k // 8) + b, mask=mask, other=0x44).to(tl.int32)
    row_v = r.to(tl.int64) * (k // 2)
    row_w = r.to(tl.int64) * k
    _unpack_group(v_ptr, w_ptr, row_v, row_w, b, byte & 0xF, 0, mask)
    _unpack_group(v_ptr, w_ptr, row_v, row_w, b, (byte >> 4) & 0xF, 1, mask)


_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float16: (torch.int16, 0x7FFF),
         torch.bfloat16: (torch.int16, 0x7FFF)}


def _grid(rows: int, k: int):
    return (triton.cdiv(max(rows, 1), BLOCK_R), triton.cdiv(max(k // 8, 1), BLOCK_B))


def pack24(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs a contiguous [rows, K] weight (K % 8 == 0). Groups with >2 nonzeros get nibble 0x0."""
    rows, k = W.shape
    bits_dtype, mag = _BITS[W.dtype]
    values = torch.empty(rows, k // 2, dtype=W.dtype, device=W.device)
    meta = torch.empty(rows, k // 8, dtype=torch.uint8, device=W.device)
    if W.numel():
        with _launch.on_device(W):
            _pack24_kernel[_grid(rows, k)](W.view(bits_dtype), values.view(bits_dtype), meta, rows, k,
                                           MAG=mag, BR=BLOCK_R, BB=BLOCK_B)
    return values, meta


def unpack24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Unpacks validated metadata (the caller checks nibbles) into a dense [rows, K] weight."""
    rows, half = values.shape
    k = 2 * half
    bits_dtype, _ = _BITS[values.dtype]
    W = torch.empty(rows, k, dtype=values.dtype, device=values.device)
    if W.numel():
        with _launch.on_device(values):
            _unpack24_kernel[_grid(rows, k)](values.view(bits_dtype), meta, W.view(bits_dtype), rows, k,
                                             BR=BLOCK_R, BB=BLOCK_B)
    return W

"""Triton keep-mask selection: N:M per group and per-row unstructured, on scores or fused with
Wanda's scoring |W| * sqrt(act_norm_sq). Masks equal prunekit/ref/selection.py exactly: among equal
scores the lower index is pruned first (a stable ascending sort).

Per-row selection does not sort. Scores map to int32 keys whose signed order is the float order;
the k-th smallest key T is built bit by bit (the largest T with #{key < T} <= k - 1), then every key
below T is pruned, plus the first k - #{key < T} keys equal to T in index order.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

# Rows up to this width stay in registers during the search; wider rows are re-read per step.
MAX_ROW_BLOCK = 16384
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _scores(src_ptr, sqrt_norm_ptr, row_base, cols, inb, FUSED: tl.constexpr):
    """float32 scores at `cols` of one row (or of a tile of rows via row_base's shape)."""
    x = tl.load(src_ptr + row_base + cols, mask=inb, other=0.0).to(tl.float32)
    if FUSED:
        x = tl.abs(x) * tl.load(sqrt_norm_ptr + cols, mask=inb, other=0.0)
    return x


@triton.jit
def _order_keys(x):
    """int32 keys in the order of the float scores; -0.0 and +0.0 share the key 0."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _nm_kernel(src_ptr, sqrt_norm_ptr, keep_ptr, rows, width,
               N: tl.constexpr, M: tl.constexpr, FUSED: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    # full [BLOCK_R, BLOCK_C] column indices, so the norm loads need no pointer/mask broadcasting
    c = tl.broadcast_to(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :], (BLOCK_R, BLOCK_C))
    inb = (r < rows) & (c < width)
    row_base = r.to(tl.int64) * width
    x = _scores(src_ptr, sqrt_norm_ptr, row_base, c, inb, FUSED)
    group_start = c - c % M
    # rank = how many entries of the group a stable ascending sort puts before this one
    rank = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for j in tl.static_range(M):
        cj = group_start + j
        other = _scores(src_ptr, sqrt_norm_ptr, row_base, cj, inb, FUSED)
        rank += ((other < x) | ((other == x) & (cj < c))).to(tl.int32)
    tl.store(keep_ptr + row_base + c, (rank >= M - N).to(tl.uint8), mask=inb)


@triton.jit
def _count_below(src_ptr, sqrt_norm_ptr, row_base, width, bound, FUSED: tl.constexpr, BLOCK: tl.constexpr):
    """#{key < bound} over a row too wide for registers, one chunk at a time."""
    total = tl.full([], 0, tl.int32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < width
        key = _order_keys(_scores(src_ptr, sqrt_norm_ptr, row_base, cols, inb, FUSED))
        total += tl.sum(((key < bound) & inb).to(tl.int32), axis=0)
    return total


@triton.jit
def _row_kernel(src_ptr, sqrt_norm_ptr, keep_ptr, width, n_prune,
                FUSED: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row_base = tl.program_id(0).to(tl.int64) * width
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK)
        inb = cols < width
        key = _order_keys(_scores(src_ptr, sqrt_norm_ptr, row_base, cols, inb, FUSED))
        below = tl.sum(((key < 0) & inb).to(tl.int32), axis=0)
    else:
        below = _count_below(src_ptr, sqrt_norm_ptr, row_base, width, 0, FUSED, BLOCK)
    # Sign step first (int32 two's complement), then bits 30..0 can be OR-ed in.
    t = tl.where(below <= n_prune - 1, 0, -2147483647 - 1)
    for b in tl.static_range(30, -1, -1):
        candidate = t | (1 << b)
        if ONE_CHUNK:
            below = tl.sum(((key < candidate) & inb).to(tl.int32), axis=0)
        else:
            below = _count_below(src_ptr, sqrt_norm_ptr, row_base, width, candidate, FUSED, BLOCK)
        t = tl.where(below <= n_prune - 1, candidate, t)
    # t is the n_prune-th smallest key: prune all below it and the first ties in index order.
    if ONE_CHUNK:
        below = tl.sum(((key < t) & inb).to(tl.int32), axis=0)
        tie = ((key == t) & inb).to(tl.int32)
        tie_rank = tl.cumsum(tie, axis=0) - tie
        pruned = (key < t) | ((tie == 1) & (tie_rank < n_prune - below))
        tl.store(keep_ptr + row_base + cols, (pruned == 0).to(tl.uint8), mask=inb)
    else:
        below = _count_below(src_ptr, sqrt_norm_ptr, row_base, width, t, FUSED, BLOCK)
        ties_seen = tl.full([], 0, tl.int32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inb = cols < width
            key = _order_keys(_scores(src_ptr, sqrt_norm_ptr, row_base, cols, inb, FUSED))
            tie = ((key == t) & inb).to(tl.int32)
            tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
            pruned = (key < t) | ((tie == 1) & (tie_rank < n_prune - below))
            tl.store(keep_ptr + row_base + cols, (pruned == 0).to(tl.uint8), mask=inb)
            ties_seen += tl.sum(tie, axis=0)


def _check(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous 2-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the Triton kernel takes float32/float16/bfloat16, got {t.dtype}")


def _launch_nm(src, sqrt_norm, n, m, fused):
    rows, width = src.shape
    keep = torch.empty((rows, width), dtype=torch.uint8, device=src.device)
    if keep.numel():
        block_c = min(256, triton.next_power_of_2(width))
        block_r = max(1, min(16, 4096 // block_c))
        grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_c))
        with _launch.on_device(src):
            _nm_kernel[grid](src, sqrt_norm, keep, rows, width, N=n, M=m, FUSED=fused,
                             BLOCK_R=block_r, BLOCK_C=block_c)
    return keep.view(torch.bool)


def _launch_rows(src, sqrt_norm, n_prune, fused, max_block):
    rows, width = src.shape
    if n_prune == 0 or src.numel() == 0:
        return torch.ones((rows, width), dtype=torch.bool, device=src.device)
    keep = torch.empty((rows, width), dtype=torch.uint8, device=src.device)
    block = min(triton.next_power_of_2(width), max_block)
    with _launch.on_device(src):
        _row_kernel[(rows,)](src, sqrt_norm, keep, width, n_prune, FUSED=fused, ONE_CHUNK=block >= width,
                             BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return keep.view(torch.bool)


def nm_keep_mask_triton(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores of each row (width divisible by m)."""
    _check(scores, "scores")
    return _launch_nm(scores, scores, n, m, fused=False)


def row_keep_mask_triton(scores: torch.Tensor, sparsity: float, max_block: int = MAX_ROW_BLOCK) -> torch.Tensor:
    """Per row prune the int(width * sparsity) lowest scores. `max_block` (a power of two) caps the
    register-resident chunk; rows wider than it take the chunked path."""
    _check(scores, "scores")
    return _launch_rows(scores, scores, int(scores.shape[1] * sparsity), fused=False, max_block=max_block)


def wanda_keep_mask_triton(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity: float = 0.0,
                           n: int = 0, m: int = 0, max_block: int = MAX_ROW_BLOCK) -> torch.Tensor:
    """Wanda's keep mask in one pass over W: score |W| * sqrt(act_norm_sq), then N:M (m > 0) or
    per-row selection of int(width * sparsity) pruned entries (m == 0)."""
    _check(W, "W")
    # torch's sqrt is correctly rounded, as in the reference; the kernel multiplies in float32.
    sqrt_norm = torch.sqrt(act_norm_sq.to(device=W.device, dtype=torch.float32)).contiguous()
    if m:
        return _launch_nm(W, sqrt_norm, n, m, fused=True)
    return _launch_rows(W, sqrt_norm, int(W.shape[1] * sparsity), fused=True, max_block=max_block)

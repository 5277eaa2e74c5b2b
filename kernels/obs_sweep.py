"""SparseGPT's in-block OBS sweep as one Triton launch per block of columns.

Each program owns a tile of rows and keeps the whole block (B <= 128 columns, padded to a power of two)
in registers; the column loop, the rank-1 updates and the N:M selection every M columns all run inside
the kernel, so a block costs one launch instead of ~10 per column (DESIGN.md §4). Rows are independent
given Hinv1, which is what makes the row tiling legal. Arithmetic is fp32 and follows the reference's
operation order (w*w/(d*d) scores, err = (w-q)/d, w -= err*h) so masks come out identical. On a GPU that
needs two things the interpreter does not show: every division is round-to-nearest (`tl.div_rn`; a plain
`/` compiles to the approximate `div.full.f32`), and the launch disables FP contraction
(`enable_fp_fusion=False`), or `w - e*h` becomes one FMA with a single rounding. `compile_ptx` compiles
the kernel for a GPU target without a GPU, so tests can read the PTX for both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

MAX_BLOCK = 128
# No FP contraction: `w - e*h` must round the product, then the difference, as the reference does.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _column(tile, cols, i):
    """Column i of a [rows, cols] register tile (a masked row reduction: registers cannot be indexed)."""
    return tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)


@triton.jit
def _select_nm(w, diag, keep, cols, start, N: tl.constexpr, M: tl.constexpr):
    """Within columns start..start+M-1 keep the N highest w²/d²; ties prune the lower index first."""
    scores = tl.div_rn(w * w, (diag * diag)[None, :])
    in_group = (cols >= start) & (cols < start + M)
    # rank of each column = how many group members are pruned before it (stable ascending order)
    rank = tl.zeros(w.shape, dtype=tl.int32)
    for k in range(M):
        s_k = _column(scores, cols, start + k)[:, None]
        before = (s_k < scores) | ((s_k == scores) & (start + k < cols)[None, :])
        rank += before.to(tl.int32)
    return tl.where(in_group[None, :], rank >= M - N, keep)


@triton.jit
def _obs_sweep_kernel(w_ptr, hinv_ptr, keep_ptr, q_ptr, err_ptr, loss_ptr, keep_out_ptr,
                      rows, B, N: tl.constexpr, M: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    row_ok = r < rows
    col_ok = cols < B
    tile_ok = row_ok[:, None] & col_ok[None, :]
    offs = r.to(tl.int64)[:, None] * B + cols[None, :]

    w = tl.load(w_ptr + offs, mask=tile_ok, other=0.0)
    diag = tl.load(hinv_ptr + cols * (B + 1), mask=col_ok, other=1.0)
    if M > 0:
        keep = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32) != 0
    else:
        keep = tl.load(keep_ptr + offs, mask=tile_ok, other=0) != 0
    q = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    err = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    loss = tl.zeros((BLOCK_R,), dtype=tl.float32)

    # GROUP = M for N:M (select at every group start), 1 for unstructured (mask given).
    for start in range(0, B, GROUP):
        if M > 0:
            keep = _select_nm(w, diag, keep, cols, start, N, M)
        for j in range(GROUP):
            i = start + j
            on_i = cols[None, :] == i
            w_i = _column(w, cols, i)
            kept_i = tl.sum(tl.where(on_i & keep, 1, 0), axis=1) > 0
            d = tl.load(hinv_ptr + i * B + i)
            q_i = tl.where(kept_i, w_i, 0.0)
            delta = w_i - q_i
            loss += tl.div_rn(tl.div_rn(delta * delta, d * d), 2.0)
            e_i = tl.div_rn(delta, d)
            q = tl.where(on_i, q_i[:, None], q)
            err = tl.where(on_i, e_i[:, None], err)
            h = tl.load(hinv_ptr + i * B + cols, mask=col_ok & (cols >= i), other=0.0)
            w = w - e_i[:, None] * h[None, :]

    tl.store(q_ptr + offs, q, mask=tile_ok)
    tl.store(err_ptr + offs, err, mask=tile_ok)
    tl.store(keep_out_ptr + offs, keep.to(tl.uint8), mask=tile_ok)
    tl.store(loss_ptr + r, loss, mask=row_ok)


def _check(W1: torch.Tensor, Hinv1: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> None:
    if W1.dim() != 2 or W1.dtype != torch.float32:
        raise ValueError(f"obs_sweep W1: expected a 2-D float32 tensor, got {W1.dtype} {tuple(W1.shape)}")
    rows, B = W1.shape
    if not 1 <= B <= MAX_BLOCK:
        raise ValueError(f"obs_sweep W1: block width must be 1..{MAX_BLOCK}, got {B}")
    if Hinv1.dtype != torch.float32 or tuple(Hinv1.shape) != (B, B):
        raise ValueError(f"obs_sweep Hinv1: expected float32 ({B}, {B}), got {Hinv1.dtype} {tuple(Hinv1.shape)}")
    if keep.dtype != torch.bool or tuple(keep.shape) != (rows, B):
        raise ValueError(f"obs_sweep keep: expected bool ({rows}, {B}), got {keep.dtype} {tuple(keep.shape)}")
    if W1.device != Hinv1.device or W1.device != keep.device:
        raise ValueError(f"obs_sweep: W1 ({W1.device}), Hinv1 ({Hinv1.device}) and keep ({keep.device}) "
                         "must be on one device")
    if m < 0 or (m > 0 and (not 0 <= n <= m or B % m != 0)):
        raise ValueError(f"obs_sweep: N:M pattern {n}:{m} needs 0 <= N <= M and the block width {B} "
                         "divisible by M (m=0 means unstructured)")


def obs_sweep_triton(W1: torch.Tensor, Hinv1: torch.Tensor, keep: torch.Tensor, n: int, m: int):
    """(Q1, Err1, losses, keep_out) of one SparseGPT block; see prunekit.ref.obs_sweep for semantics."""
    _check(W1, Hinv1, keep, n, m)
    W1, Hinv1, keep = W1.contiguous(), Hinv1.contiguous(), keep.contiguous()
    rows, B = W1.shape
    q = torch.empty_like(W1)
    err = torch.empty_like(W1)
    losses = torch.empty(rows, dtype=torch.float32, device=W1.device)
    keep_out = torch.empty((rows, B), dtype=torch.bool, device=W1.device)
    if rows == 0:
        return q, err, losses, keep_out
    block_b = max(16, triton.next_power_of_2(B))
    # ~2K live fp32 values per tile and program: enough rows to fill a warp group, few enough to stay
    # in registers next to the q/err/keep tiles.
    block_r = min(max(1, 2048 // block_b), triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_r),)
    with _launch.on_device(W1):
        _obs_sweep_kernel[grid](W1, Hinv1, keep.view(torch.uint8), q, err, losses, keep_out.view(torch.uint8),
                                rows, B, N=n if m else 0, M=m, GROUP=m if m else 1,
                                BLOCK_R=block_r, BLOCK_B=block_b, **LAUNCH_OPTIONS)
    return q, err, losses, keep_out


def compile_ptx(B: int = 128, n: int = 2, m: int = 4, capability: int = 90, block_r: int = 16) -> str:
    """The PTX of the sweep compiled for sm_<capability> with the launch options above; needs no GPU
    (and must run without TRITON_INTERPRET=1, which replaces the kernel by the interpreter)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_b = max(16, triton.next_power_of_2(B))
    signature = {"w_ptr": "*fp32", "hinv_ptr": "*fp32", "keep_ptr": "*u8", "q_ptr": "*fp32", "err_ptr": "*fp32",
                 "loss_ptr": "*fp32", "keep_out_ptr": "*u8", "rows": "i32", "B": "i32", "N": "constexpr",
                 "M": "constexpr", "GROUP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_B": "constexpr"}
    constexprs = {"N": n if m else 0, "M": m, "GROUP": m if m else 1, "BLOCK_R": block_r, "BLOCK_B": block_b}
    source = ASTSource(fn=_obs_sweep_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(LAUNCH_OPTIONS))
    return compiled.asm["ptx"]

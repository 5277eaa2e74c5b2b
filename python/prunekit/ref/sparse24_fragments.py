"""CPU emulation of csrc/cuda/sparse24_gemm.cu: which logical weight/token entries every lane feeds to
`mma.sp.m16n8k32`, and the instruction itself as documented in the PTX ISA, so the kernel's index
bookkeeping is tested without a GPU.

The kernel reads the logical 2:4 format directly (no device re-layout). Per 64-wide K chunk a lane
(g = lane // 4, t = lane % 4) loads the 16-byte word of groups 4t..4t+3 of rows g and g+8; mma step
j in {0, 1} maps the instruction's slot group s (its 4-wide K sub-chunks) to logical group
`logical_group(s, j)`. These functions mirror the CUDA ones line for line.
"""
from __future__ import annotations

import torch

from . import pack24

CHUNK_K = 64


def logical_group(s: int, j: int) -> int:
    return 4 * s + 2 * j if s < 4 else 4 * (s - 4) + 2 * j + 1


def a_register_groups(t: int, j: int) -> list[tuple[int, int]]:
    """(row offset, logical group) of A registers 0..3 of lane t in step j (each register = 2 values)."""
    return [(0, 4 * t + 2 * j), (8, 4 * t + 2 * j), (0, 4 * t + 2 * j + 1), (8, 4 * t + 2 * j + 1)]


def b_register_k(t: int, j: int, r: int) -> int:
    """Logical K (within the chunk) of the first of the two tokens' inputs in B register r of lane t."""
    return 4 * logical_group(2 * r + t // 2, j) + 2 * (t % 2)


def meta_register(meta_g: int, meta_g8: int, t: int, j: int) -> int:
    """The lane's 32-bit metadata operand from the chunk's 64-bit metadata of rows g and g+8."""
    e = 0
    for i in range(4):
        L = logical_group(4 * (t % 2) + i, j)
        e |= ((meta_g >> (4 * L)) & 0xF) << (4 * i)
        e |= ((meta_g8 >> (4 * L)) & 0xF) << (16 + 4 * i)
    return e


def d_register_position(lane: int, i: int) -> tuple[int, int]:
    """(row offset, token offset) of accumulator register i of a lane (the kernel's write-out)."""
    g, t = divmod(lane, 4)
    return g + (8 if i >= 2 else 0), 2 * t + (i & 1)


def _mma_sp_m16n8k32(a: list, b: list, e: list, selector: int = 0) -> torch.Tensor:
    """The instruction (PTX ISA, sparse m16n8k32 f16/bf16): per-lane registers in, D [16, 8] out.
    a[lane]: 4 registers x 2 values; b[lane]: 4 x 2; e[lane]: int. The sparsity selector (0 or 1) picks the
    lane pair of each quad whose metadata is read: t = 2*selector (K 0-15) and 2*selector + 1 (K 16-31)."""
    A = torch.zeros(16, 32, dtype=torch.float64)
    B = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        # A fragment = dense m16n8k16 layout over the 16 compressed columns
        for reg, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            s = col // 2  # compressed columns 2s, 2s+1 belong to slot group s
            meta_lane = 4 * g + 2 * selector + (s // 4)  # lanes 2*sel (slot groups 0-3), 2*sel+1 (4-7)
            nib = (e[meta_lane] >> (16 * (row >= 8) + 4 * (s % 4))) & 0xF
            idx = (nib & 3, nib >> 2)
            for h in range(2):
                A[row, 4 * s + idx[h]] += a[lane][reg][h]
        for r in range(4):
            for h in range(2):
                B[2 * t + 8 * r + h, g] = b[lane][r][h]
    return A @ B


def emulate_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x [M, K] · Wᵀ computed the way the kernel feeds mma.sp (float64, small sizes only)."""
    M, K = x.shape
    N = values.shape[0]
    assert K % CHUNK_K == 0
    vals = values.double()
    xs = x.double()
    meta64 = [[int.from_bytes(bytes(meta[r, 8 * c: 8 * c + 8].tolist()), "little") for c in range(K // CHUNK_K)]
              for r in range(N)]
    zero_meta = 0x4444444444444444
    y = torch.zeros(M, N, dtype=torch.float64)
    for row0 in range(0, N, 16):
        for n0 in range(0, M, 8):
            acc = torch.zeros(16, 8, dtype=torch.float64)
            for c in range(K // CHUNK_K):
                for j in range(2):
                    a, b, e = [], [], []
                    for lane in range(32):
                        g, t = divmod(lane, 4)
                        regs = []
                        for dr, L in a_register_groups(t, j):
                            row = row0 + g + dr
                            v = vals[row, 32 * c + 2 * L: 32 * c + 2 * L + 2] if row < N else torch.zeros(2)
                            regs.append(v.tolist())
                        a.append(regs)
                        mg = meta64[row0 + g][c] if row0 + g < N else zero_meta
                        mg8 = meta64[row0 + g + 8][c] if row0 + g + 8 < N else zero_meta
                        e.append(meta_register(mg, mg8, t, j))
                        token = n0 + g
                        b.append([(xs[token, CHUNK_K * c + b_register_k(t, j, r): CHUNK_K * c + b_register_k(t, j, r) + 2]
                                   .tolist() if token < M else [0.0, 0.0]) for r in range(4)])
                    acc += _mma_sp_m16n8k32(a, b, e)
            for lane in range(32):  # the kernel's write-out of each lane's accumulators
                for i in range(4):
                    dr, dn = d_register_position(lane, i)
                    if row0 + dr < N and n0 + dn < M:
                        y[n0 + dn, row0 + dr] = acc[dr, dn]
    return y


def dense_weight(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return pack24.unpack24(values, meta)

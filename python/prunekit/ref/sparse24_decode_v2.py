"""Decode kernel v2 (csrc/cuda/sparse24_decode_v2.cu) on the CPU: its pack-time device layout, the registers
each lane feeds to `mma.sp.m16n8k32` (both sparsity selectors), its stream-K schedule with the in-kernel
ordered reduction, and the instruction itself, in plain torch, so all of its index bookkeeping is tested
without a GPU.

Device layout (built once per weight from the logical format of ref/pack24.py): rows padded with zero
weights (nibble 0x4) to a multiple of 16, K padded the same way to a multiple of 64, then one 1152-byte
block per (16-row tile, 64-wide K chunk), stored [tiles, chunks, 1152] (uint8):

  bytes    0..1023  A fragments: [step j (2)][lane (32)][register (4)][2 values]. Step j is the mma over
                    logical K 32j..32j+31 of the chunk (slot group s = logical group 8j + s). Lane
                    (g = lane // 4, t = lane % 4) holds registers a0 = row g, group 8j+t; a1 = row g+8,
                    group 8j+t; a2 = row g, group 8j+4+t; a3 = row g+8, group 8j+4+t (2 kept values each):
                    one 16-byte shared-memory load per lane per step.
  bytes 1024..1151  metadata: one 32-bit word per lane. Lane (g, t) holds the word that selector
                    j = t // 2 reads from it in step j: nibbles i = 0..3 of row g (bits 4i) and row g+8
                    (bits 16+4i) for logical groups 8j + 4(t % 2) + i. Step 0 runs with sparsity selector 0
                    (lanes t = 0, 1 supply metadata), step 1 with selector 1 (lanes t = 2, 3), so each lane
                    loads one word per chunk and every loaded bit is used.

The B operand (tokens) is read from shared memory with ldmatrix.x4 at natural K: register r of lane (g, t)
holds token g, K 32j + 8r + 2t (+1); accumulators are the usual m16n8 D layout.

Schedule ("stream-K"): a block of W warps owns a block tile of 16W rows; a tile's K is cut in k-iterations
of `chunks_per_stage` chunks; the tiles x k-iterations units are dealt out in equal contiguous runs to
`grid` blocks. The blocks that share a tile add their partial sums into y in a fixed order — the block
with the highest index first (it meets the tile at the start of its run), the lowest last — each waiting
on a per-tile lock for its turn and reading the previous partial from y (so partials are rounded to y's
dtype between blocks; deterministic; no fp32 workspace; no second launch). `schedule` mirrors the kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import pack24
from .sparse24_fragments import _mma_sp_m16n8k32

TILE_N = 16
CHUNK_K = 64
VALUE_BYTES = 1024
META_BYTES = 128
BLOCK_BYTES = VALUE_BYTES + META_BYTES
ZERO_NIBBLE = 0x4  # positions (0, 1): the nibble of padding groups (their values are zero)


def padded_sizes(N: int, K: int) -> tuple[int, int]:
    """(16-row tiles, 64-wide K chunks) of the device layout."""
    return math.ceil(N / TILE_N), math.ceil(K / CHUNK_K)


# ---------------- the pack-time re-layout and its inverse ----------------

def _value_view(tiles: int, chunks: int) -> tuple[int, ...]:
    # logical padded values [tiles*16, chunks*32] -> [tile, row half, g, chunk, step j, slot half, t, 2]
    return (tiles, 2, 8, chunks, 2, 2, 4, 2)


_VALUE_ORDER = (0, 3, 4, 2, 6, 5, 1, 7)  # -> [tile, chunk, j, g, t, slot half, row half, 2]: lane = 4g+t,
#                                          register = 2 * slot half + row half
_META_ORDER = (0, 3, 2, 4, 5, 1, 6)      # [tile, rh, g, chunk, j, h, i] -> [tile, chunk, g, j, h, rh, i]


def relayout(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Logical (values [N, K/2] fp16/bf16, meta uint8 [N, K/8]) -> the v2 device layout, uint8
    [tiles, chunks, 1152], on the same device (plain torch: runs once per weight, CPU or GPU)."""
    pack24.check_packed(values, meta)
    if values.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"values: the v2 decode kernel takes float16/bfloat16 weights, got {values.dtype}")
    N, K = values.shape[0], 2 * values.shape[1]
    tiles, chunks = padded_sizes(N, K)
    Np, Kp = tiles * TILE_N, chunks * CHUNK_K
    bits = pack24.as_bits(values.contiguous())
    v = torch.zeros(Np, Kp // 2, dtype=torch.int16, device=values.device)
    v[:N, : K // 2] = bits
    v = v.reshape(_value_view(tiles, chunks)).permute(_VALUE_ORDER).reshape(tiles, chunks, VALUE_BYTES // 2)
    nib = torch.full((Np, Kp // 4), ZERO_NIBBLE, dtype=torch.uint8, device=values.device)
    nib[:N, : K // 4] = pack24.nibbles(meta).to(torch.uint8)
    nib = nib.reshape(tiles, 2, 8, chunks, 2, 2, 4).permute(_META_ORDER).reshape(tiles, chunks, META_BYTES, 2)
    meta_bytes = nib[..., 0] | (nib[..., 1] << 4)  # nibble 2b in the low half of byte b (little-endian word)
    value_bytes = v.contiguous().view(torch.uint8)  # little-endian int16 -> 2 bytes
    return torch.cat((value_bytes, meta_bytes), dim=-1).contiguous()


def restore(weight: torch.Tensor, N: int, K: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `relayout`: the logical (values, meta) back from the device layout."""
    tiles, chunks = padded_sizes(N, K)
    check_layout(weight, N, K)
    v = weight[..., :VALUE_BYTES].contiguous().view(torch.int16)
    inv = [0] * len(_VALUE_ORDER)
    for dst, src in enumerate(_VALUE_ORDER):
        inv[src] = dst
    shape = _value_view(tiles, chunks)
    v = v.reshape(tuple(shape[i] for i in _VALUE_ORDER)).permute(inv).reshape(tiles * TILE_N, chunks * CHUNK_K // 2)
    values = v[:N, : K // 2].contiguous().view(dtype)
    mb = weight[..., VALUE_BYTES:]
    nib = torch.stack((mb & 0xF, mb >> 4), dim=-1)  # [tiles, chunks, 128, 2]
    inv_m = [0] * len(_META_ORDER)
    for dst, src in enumerate(_META_ORDER):
        inv_m[src] = dst
    mshape = (tiles, 2, 8, chunks, 2, 2, 4)
    nib = nib.reshape(tuple(mshape[i] for i in _META_ORDER)).permute(inv_m).reshape(tiles * TILE_N, chunks * 16)
    nib = nib[:N, : K // 4]
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return values, meta


def check_layout(weight: torch.Tensor, N: int, K: int) -> None:
    tiles, chunks = padded_sizes(N, K)
    if weight.dtype != torch.uint8 or tuple(weight.shape) != (tiles, chunks, BLOCK_BYTES):
        raise ValueError(f"weight: expected the v2 decode layout uint8 {(tiles, chunks, BLOCK_BYTES)} for N={N}, "
                         f"K={K}, got {weight.dtype} {tuple(weight.shape)}")


# ---------------- what each lane loads ----------------

def a_register_source(lane: int, j: int, reg: int) -> tuple[int, int]:
    """(row within the tile, logical group within the chunk) of A register `reg` of a lane in step j."""
    g, t = divmod(lane, 4)
    return g + 8 * (reg & 1), 8 * j + 4 * (reg >> 1) + t


def meta_word_source(lane: int, nibble: int) -> tuple[int, int]:
    """(row within the tile, logical group within the chunk) described by nibble 0..7 of a lane's word."""
    g, t = divmod(lane, 4)
    return g + 8 * (nibble >> 2), 8 * (t >> 1) + 4 * (t & 1) + (nibble & 3)


def b_register_k(lane: int, j: int, r: int) -> int:
    """Logical K (within the chunk) of the first of the two inputs in B register r (ldmatrix matrix r)."""
    return 32 * j + 8 * r + 2 * (lane % 4)


def d_register_position(lane: int, i: int) -> tuple[int, int]:
    """(row within the tile, token within the n-tile) of accumulator register i."""
    g, t = divmod(lane, 4)
    return g + 8 * (i >> 1), 2 * t + (i & 1)


def lane_registers(block: torch.Tensor, j: int) -> tuple[list, list]:
    """From one 1152-byte (tile, chunk) block: per lane, the 4 A registers of step j (2 values each, float64)
    and the metadata word — read by byte offsets exactly as the kernel's shared-memory loads do."""
    raw = block[: VALUE_BYTES].view(torch.int16)
    a = []
    for lane in range(32):
        base = (j * 32 + lane) * 8  # int16 offset: step j, lane, 4 registers x 2 values
        a.append([[int(raw[base + 2 * reg + h]) for h in range(2)] for reg in range(4)])
    words = block[VALUE_BYTES:].reshape(32, 4).to(torch.int64)
    e = [int(words[lane, 0] | (words[lane, 1] << 8) | (words[lane, 2] << 16) | (words[lane, 3] << 24))
         for lane in range(32)]
    return a, e


# ---------------- the schedule (mirrors the kernel) ----------------

@dataclass(frozen=True)
class Plan:
    warps: int
    chunks_per_stage: int
    block_tiles: int   # tiles of 16 * warps rows
    k_iters: int       # k-iterations per tile
    iters: int         # units per block
    grid: int          # blocks launched

    def tile_blocks(self, tile: int) -> tuple[int, int]:
        """(first, last) block that works on this block tile."""
        return (tile * self.k_iters) // self.iters, ((tile + 1) * self.k_iters - 1) // self.iters

    def segments(self, block: int) -> list[tuple[int, int, int, int, int]]:
        """(tile, k-iteration begin, end, order, count) for each tile the block works on, in run order;
        `order` is the block's turn in that tile's reduction (0 adds the bias and writes first)."""
        out = []
        u, end = block * self.iters, min((block + 1) * self.iters, self.block_tiles * self.k_iters)
        while u < end:
            tile, kt = divmod(u, self.k_iters)
            stop = min(end, (tile + 1) * self.k_iters)
            first, last = self.tile_blocks(tile)
            out.append((tile, kt, kt + (stop - u), last - block, last - first + 1))
            u = stop
        return out

    def max_splits(self) -> int:
        return max(self.tile_blocks(t)[1] - self.tile_blocks(t)[0] + 1 for t in range(self.block_tiles))


def plan(N: int, K: int, warps: int, chunks_per_stage: int, blocks: int) -> Plan:
    """The kernel's schedule for `blocks` requested blocks (the launcher first caps them at what fits on
    the GPU at once: waiting blocks need the blocks they wait for to be resident)."""
    tiles, chunks = padded_sizes(N, K)
    block_tiles = math.ceil(tiles / warps)
    k_iters = math.ceil(chunks / chunks_per_stage)
    total = block_tiles * k_iters
    iters = math.ceil(total / max(1, blocks))
    return Plan(warps, chunks_per_stage, block_tiles, k_iters, iters, math.ceil(total / iters))


# ---------------- emulation of the whole kernel ----------------

def emulate_linear(x: torch.Tensor, weight: torch.Tensor, N: int, dtype: torch.dtype,
                   bias: torch.Tensor | None = None, *, warps: int = 4, chunks_per_stage: int = 1, blocks: int = 1,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] · Wᵀ (+ bias) computed the way the kernel does (`dtype`: the weight's, fp16/bf16):
    per block of the schedule, per tile segment, per chunk and step, the lanes' registers read from the device
    layout, `mma.sp` with sparsity selector j, and the ordered reduction into y (partials rounded to
    `out_dtype` between blocks when given; float64 throughout otherwise). Small sizes only (Python loops)."""
    M, K = x.shape
    check_layout(weight, N, K)
    p = plan(N, K, warps, chunks_per_stage, blocks)
    chunks = weight.shape[1]
    xs = torch.zeros(M, chunks * CHUNK_K, dtype=torch.float64)
    xs[:, :K] = x.double()
    y = torch.zeros(M, N, dtype=torch.float64)
    turn = {}
    # blocks run concurrently on the GPU; here each tile's segments are applied in the kernel's order
    work = [(tile, order, count, block, kb, ke) for block in range(p.grid)
            for tile, kb, ke, order, count in p.segments(block)]
    for tile, order, count, block, kb, ke in sorted(work):
        assert turn.get(tile, 0) == order, "reduction order broken"
        turn[tile] = order + 1
        for w in range(warps):
            tile16 = tile * warps + w
            if tile16 >= weight.shape[0]:
                continue
            acc = [torch.zeros(16, 8, dtype=torch.float64) for _ in range(math.ceil(M / 8))]
            for kt in range(kb, ke):
                for c in range(kt * chunks_per_stage, min(chunks, (kt + 1) * chunks_per_stage)):
                    for j in range(2):
                        a_bits, e = lane_registers(weight[tile16, c], j)
                        a = [[[_bits_to_float(v, dtype) for v in reg] for reg in a_bits[lane]] for lane in range(32)]
                        for n in range(len(acc)):
                            b = []
                            for lane in range(32):
                                token = 8 * n + lane // 4
                                b.append([[float(xs[token, CHUNK_K * c + b_register_k(lane, j, r) + h])
                                           if token < M else 0.0 for h in range(2)] for r in range(4)])
                            acc[n] += _mma_sp_m16n8k32(a, b, e, selector=j)
            for n in range(len(acc)):
                for lane in range(32):
                    for i in range(4):
                        dr, dn = d_register_position(lane, i)
                        row, token = tile16 * TILE_N + dr, 8 * n + dn
                        if row >= N or token >= M:
                            continue
                        v = float(acc[n][dr, dn])
                        if order == 0:
                            v += 0.0 if bias is None else float(bias[row])
                        else:
                            v += float(y[token, row])
                        if out_dtype is not None:  # the kernel adds in fp32 and stores y's dtype
                            v = float(torch.tensor(v, dtype=torch.float32).to(out_dtype))
                        y[token, row] = v
    assert all(turn.get(t, 0) == p.tile_blocks(t)[1] - p.tile_blocks(t)[0] + 1 for t in range(p.block_tiles))
    return y


def _bits_to_float(v: int, dtype: torch.dtype) -> float:
    return float(torch.tensor([v], dtype=torch.int16).view(dtype)[0])

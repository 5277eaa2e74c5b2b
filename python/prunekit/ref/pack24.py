"""Reference 2:4 pack/unpack (DESIGN.md §5, the logical format that is saved).

Per group of 4 consecutive input features of a row: the 2 stored values in ascending position
order, and a nibble `idx0 | idx1 << 2` (idx0 < idx1). Storage:
  values  [rows, K/2], same dtype as W
  meta    uint8 [rows, K/8], two nibbles per byte, the low nibble is the lower group.

Choices (shared by every implementation, so they agree bit for bit):
- "Nonzero" means the value's bits other than the sign are not all zero: -0.0 counts as zero, NaN
  counts as nonzero. Values are copied as raw bits, never computed.
- A group with fewer than 2 nonzeros stores its nonzeros plus the lowest unused positions, in
  ascending order (all-zero group -> positions 0,1, nibble 0x4).
- K must be a multiple of 8 (whole metadata bytes).
- Round trip: unpack(pack(W)) == W bitwise, except that a -0.0 at a position that was not stored
  comes back as +0.0 (unstored positions are written as +0.0).
"""
from __future__ import annotations

import torch

VALID_NIBBLES = (0x4, 0x8, 0xC, 0x9, 0xD, 0xE)
_BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_MAGNITUDE_MASK = {torch.int32: 0x7FFFFFFF, torch.int16: 0x7FFF}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_DTYPE[t.dtype])


def check_packable(W: torch.Tensor, name: str = "W") -> None:
    if W.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}")
    if W.dtype not in _BITS_DTYPE:
        raise TypeError(f"{name}: 2:4 packing supports float32/float16/bfloat16, got {W.dtype}")
    if W.shape[1] % 8 != 0:
        raise ValueError(f"{name}: 2:4 packing needs in_features divisible by 8 (whole metadata bytes), "
                         f"got {W.shape[1]}")


def nonzero_bits(W: torch.Tensor) -> torch.Tensor:
    bits = as_bits(W)
    return (bits & _MAGNITUDE_MASK[bits.dtype]) != 0


def over_full_error(name: str, row: int, group: int, count: int) -> ValueError:
    return ValueError(f"{name} is not 2:4 sparse: row {row}, group {group} (input features {4 * group}..{4 * group + 3}) "
                      f"has {count} nonzeros, at most 2 allowed")


def kept_positions(W: torch.Tensor, name: str = "W") -> torch.Tensor:
    """bool [rows, K]: the two stored positions of every group (nonzeros first, then lowest unused)."""
    rows, k = W.shape
    nz = nonzero_bits(W).reshape(rows, k // 4, 4)
    count = nz.sum(-1)
    bad = count > 2
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        r, g = divmod(first, k // 4)
        raise over_full_error(name, r, g, int(count[r, g]))
    zeros_before = torch.cumsum((~nz).to(torch.int8), -1) - (~nz).to(torch.int8)
    fill = (~nz) & (zeros_before < (2 - count).unsqueeze(-1))
    return (nz | fill).reshape(rows, k)


def pack24(W: torch.Tensor, name: str = "W") -> tuple[torch.Tensor, torch.Tensor]:
    check_packable(W, name)
    rows, k = W.shape
    keep = kept_positions(W, name).reshape(rows, k // 4, 4)
    # positions of the two kept entries per group, ascending (stable sort puts kept first in order)
    pos = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    bits = as_bits(W).reshape(rows, k // 4, 4)
    values = torch.gather(bits, -1, pos).reshape(rows, k // 2).view(W.dtype)
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # [rows, K/4]
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def nibbles(meta: torch.Tensor) -> torch.Tensor:
    """int64 [rows, K/4]: the metadata nibble of every group, unchecked."""
    rows, nbytes = meta.shape
    return torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(rows, nbytes * 2).to(torch.int64)


def nibble_positions(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, K/4] idx0 and idx1 of every group; raises on an undefined nibble."""
    rows, nbytes = meta.shape
    nibble = nibbles(meta)
    valid = torch.zeros(16, dtype=torch.bool, device=meta.device)
    valid[list(VALID_NIBBLES)] = True
    bad = ~valid[nibble]
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        r, g = divmod(first, nbytes * 2)
        raise ValueError(f"meta: invalid 2:4 metadata nibble 0x{int(nibble[r, g]):X} at row {r}, group {g} "
                         f"(byte {g // 2}); valid nibbles are 0x4 0x8 0xC 0x9 0xD 0xE")
    return nibble & 3, nibble >> 2


def check_packed(values: torch.Tensor, meta: torch.Tensor) -> None:
    if values.dim() != 2 or meta.dim() != 2:
        raise ValueError(f"values/meta: expected 2-D tensors, got shapes {tuple(values.shape)} and {tuple(meta.shape)}")
    if values.dtype not in _BITS_DTYPE:
        raise TypeError(f"values: expected float32/float16/bfloat16, got {values.dtype}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"meta: expected uint8, got {meta.dtype}")
    rows, half = values.shape
    if half % 4 != 0 or tuple(meta.shape) != (rows, half // 4):
        raise ValueError(f"values {tuple(values.shape)} and meta {tuple(meta.shape)} do not describe one 2:4 "
                         f"weight: expected values [rows, K/2] and meta [rows, K/8] with K divisible by 8")


def unpack24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    check_packed(values, meta)
    rows, half = values.shape
    k = half * 2
    idx0, idx1 = nibble_positions(meta)
    pos = torch.stack((idx0, idx1), dim=-1)  # [rows, K/4, 2]
    bits = as_bits(values).reshape(rows, k // 4, 2)
    out = torch.zeros(rows, k // 4, 4, dtype=bits.dtype, device=values.device)
    out.scatter_(-1, pos, bits)
    return out.reshape(rows, k).view(values.dtype)

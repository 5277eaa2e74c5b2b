"""Reference bitmask format for unstructured sparse weights (the CPU kernel's second format).

Per row of W [N, K]: `mask` uint8 [N, K/8], bit j of byte b set when input 8b + j is kept (nonzero: bits other
than the sign not all zero, as for 2:4), and the kept values in row-major order in one flat `values` tensor
followed by `PADDING` zeros (the SIMD loads may read past the last value). `row_offsets` int64 [N + 1] is
the prefix sum of the per-row counts (derived from the mask, never trusted from a file). K % 8 == 0.
Bytes per weight element (bf16, 80% sparse): 0.2 * 2 + 1/8 = 0.525 of 2 (dense): ~3.8x fewer.
"""
from __future__ import annotations

import torch

from .pack24 import nonzero_bits

PADDING = 16
_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def check_packable(W: torch.Tensor, name: str = "W") -> None:
    if W.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}")
    if W.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: the bitmask format supports float32/bfloat16/float16, got {W.dtype}")
    if W.shape[1] % 8 != 0:
        raise ValueError(f"{name}: the bitmask format needs in_features divisible by 8, got {W.shape[1]}")


def row_offsets(mask: torch.Tensor) -> torch.Tensor:
    """int64 [N + 1]: where each row's values start (popcount prefix sum of the mask)."""
    bits = (mask.unsqueeze(-1) & _BIT.to(mask.device)) != 0
    counts = bits.reshape(mask.shape[0], -1).sum(1)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def pack(W: torch.Tensor, name: str = "W") -> tuple[torch.Tensor, torch.Tensor]:
    """(values [nnz + PADDING], mask uint8 [N, K/8])."""
    check_packable(W, name)
    N, K = W.shape
    keep = nonzero_bits(W)
    mask = (keep.reshape(N, K // 8, 8).to(torch.uint8) * _BIT.to(W.device)).sum(-1, dtype=torch.uint8)
    values = torch.cat([W[keep], W.new_zeros(PADDING)])
    return values.contiguous(), mask.contiguous()


def unpack(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    N, nbytes = mask.shape
    keep = ((mask.unsqueeze(-1) & _BIT.to(mask.device)) != 0).reshape(N, nbytes * 8)
    nnz = int(keep.sum())
    if values.dim() != 1 or values.numel() != nnz + PADDING:
        raise ValueError(f"values: expected {nnz} kept values + {PADDING} padding for this mask, got "
                         f"{tuple(values.shape)}")
    W = values.new_zeros(N, nbytes * 8)
    W[keep] = values[:nnz]
    return W


def linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, unpack(values, mask), bias)

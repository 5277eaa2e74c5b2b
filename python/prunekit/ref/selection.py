"""Reference mask selection. Masks are bool, True = kept. Ties: the lower index is pruned first
(a stable ascending sort), so fast kernels can be compared exactly."""
from __future__ import annotations

import torch


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row, prune the int(width * sparsity) lowest scores (Wanda's per-output selection)."""
    n_prune = int(scores.shape[-1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :n_prune]
        keep.scatter_(-1, order, False)
    return keep


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive entries along the last dim keep the n highest scores."""
    rows, width = scores.shape
    groups = scores.reshape(rows, width // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, False)
    return keep.reshape(rows, width)


def tensor_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Over the whole tensor, prune the int(numel * sparsity) lowest scores."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    n_prune = int(flat.numel() * sparsity)
    if n_prune:
        keep[torch.sort(flat, stable=True).indices[:n_prune]] = False
    return keep.reshape(scores.shape)

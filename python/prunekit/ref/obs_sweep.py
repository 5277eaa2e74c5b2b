"""Reference of SparseGPT's in-block sweep (the inner `for i in range(count)` loop of fasterprune):
one column at a time, vectorised over rows. It is the default body of `prunekit::obs_sweep` and the
oracle of the C++, CUDA and Triton kernels, which must reproduce its masks exactly."""
from __future__ import annotations

import torch

from .selection import nm_keep_mask


def obs_sweep(W1: torch.Tensor, Hinv1: torch.Tensor, keep: torch.Tensor, n: int, m: int):
    """Prune one block of columns and spread each pruned weight's error over the rest of the block.

    W1 [rows, B] float32: the block's weights (already updated by earlier blocks).
    Hinv1 [B, B] float32: the block's diagonal tile of the upper Cholesky factor of H^-1.
    keep [rows, B] bool: the kept-mask for unstructured pruning (ignored when m > 0).
    n, m: N:M pattern (n kept of every m columns), chosen from the updated weights every m columns;
    m = 0 means unstructured (use `keep`).
    Returns (Q1, Err1, losses, keep_out): pruned block, scaled errors (w - q) / d, the OBS loss
    sum_i (w - q)^2 / d^2 / 2 per row, and the mask actually applied.
    """
    W1 = W1.clone()
    rows, B = W1.shape
    diag = torch.diag(Hinv1)
    if not bool(torch.isfinite(diag).all()) or not bool((diag > 0).all()):
        raise ValueError("obs_sweep: Hinv1 has a non-positive or non-finite diagonal entry "
                         "(it is not an upper Cholesky factor of a positive definite H^-1)")
    keep_out = keep.clone() if m == 0 else torch.zeros_like(W1, dtype=torch.bool)
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Losses1 = torch.zeros_like(W1)
    for i in range(B):
        if m > 0 and i % m == 0:
            scores = W1[:, i:i + m] ** 2 / diag[i:i + m].reshape(1, -1) ** 2
            keep_out[:, i:i + m] = nm_keep_mask(scores, n, m)
        w = W1[:, i]
        d = Hinv1[i, i]
        q = torch.where(keep_out[:, i], w, torch.zeros_like(w))
        Q1[:, i] = q
        Losses1[:, i] = (w - q) ** 2 / d ** 2
        err = (w - q) / d
        W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err
    return Q1, Err1, torch.sum(Losses1, 1) / 2, keep_out

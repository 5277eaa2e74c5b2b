"""Loop-by-loop transcription of the pruning step of Wanda's reference code (locuslab/wanda,
lib/prune.py `prune_wanda`, one layer, `use_variant` off). It is the test oracle and the benchmark
baseline of the fast paths, so it keeps the reference's shape on purpose: the per-group Python loop
with `torch.topk` for N:M and a full stable sort per row for unstructured sparsity.

Conventions of the reference, kept here: `prune_n` is the number PRUNED in every group of
`prune_m` (prunekit's N:M counts kept entries, so prunekit "2:4" is prune_n=2, prune_m=4), and the
returned mask is True where a weight is PRUNED.
"""
from __future__ import annotations

import torch


def wanda_metric(W: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(scaler_row), broadcast over rows (float16/bfloat16 W promotes to float32)."""
    return torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))


def wanda_prune_mask(W: torch.Tensor, scaler_row: torch.Tensor, sparsity_ratio: float,
                     prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """The reference's W_mask for one layer: True where the weight is set to zero."""
    W_metric = wanda_metric(W, scaler_row)
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    return W_mask


def wanda_prune(W: torch.Tensor, scaler_row: torch.Tensor, sparsity_ratio: float,
                prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """The pruned copy of W, as the reference leaves `weight.data` after `W[W_mask] = 0`."""
    pruned = W.clone()
    pruned[wanda_prune_mask(W, scaler_row, sparsity_ratio, prune_n, prune_m)] = 0
    return pruned

"""Running calibration statistics of one layer input, exactly as the references accumulate them.

`nsamples` samples were seen before this batch of `batch` samples; both statistics are running means:
  Wanda (locuslab/wanda, WrappedGPT.add_batch):  s <- s * n/(n+b) + Σ_rows x² / (n+b)
  SparseGPT (IST-DASLab/sparsegpt, add_batch):   H <- H * n/(n+b) + Σ_rows x̃ᵀx̃,  x̃ = x·sqrt(2/(n+b))
both in fp32 whatever the activation dtype. x is [tokens, in_features].
"""
from __future__ import annotations

import torch


def act_norm_sq_update(x: torch.Tensor, norm_sq: torch.Tensor, nsamples: int, batch: int) -> torch.Tensor:
    total = nsamples + batch
    return norm_sq * (nsamples / total) + x.float().pow(2).sum(0) / total


def hessian_update(x: torch.Tensor, hessian: torch.Tensor, nsamples: int, batch: int) -> torch.Tensor:
    total = nsamples + batch
    scaled = x.float() * (2.0 / total) ** 0.5
    return torch.addmm(hessian * (nsamples / total), scaled.t(), scaled)

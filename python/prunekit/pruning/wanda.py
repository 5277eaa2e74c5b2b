"""Wanda (Sun et al. 2024, locuslab/wanda): prune by |W| * sqrt(mean squared input norm).

Per output row the lowest int(in_features * sparsity) scores are pruned, or per group of M
consecutive inputs the M - N lowest (N:M keeps N). Masks equal the reference's on the same
statistics (prunekit/ref/wanda.py), ties included: the lower index is pruned first.
"""
from __future__ import annotations

import torch

from .. import _validate, patterns
from ..ops import select_mask  # noqa: F401  (registers torch.ops.prunekit.wanda_keep_mask)
from .base import LayerResult, PruningMethod
from .stats import LayerStats


def wanda_mask(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity="0.5", *, name: str = "layer") -> torch.Tensor:
    """Keep mask (bool, True = kept) of W [out_features, in_features].

    act_norm_sq: [in_features], the running mean of per-feature squared input norms
    (`LayerStats.act_norm_sq`, Wanda's `scaler_row`); used in float32 as in the reference.
    sparsity: a fraction pruned per row (0.5, "50%") or "N:M" (N kept of every M).
    """
    pattern = patterns.parse(sparsity)
    _validate.float_tensor(W, f"{name}.weight", ndim=2)
    _validate.float_tensor(act_norm_sq, f"{name} act_norm_sq", ndim=1)
    _validate.shape(act_norm_sq, (W.shape[1],), f"{name} act_norm_sq")
    _validate.same_device(f"{name}.weight", W, f"{name} act_norm_sq", act_norm_sq)
    pattern.check_width(W.shape[1], f"{name}.weight")
    _validate.finite(W, f"{name}.weight")
    _validate.finite(act_norm_sq, f"{name} act_norm_sq")
    if bool((act_norm_sq < 0).any()):
        raise ValueError(f"{name} act_norm_sq: squared norms must be non-negative, found "
                         f"{int((act_norm_sq < 0).sum())} negative value(s)")
    return torch.ops.prunekit.wanda_keep_mask(W.contiguous(), act_norm_sq.float().contiguous(),
                                              pattern.sparsity, pattern.n, pattern.m)


class Wanda(PruningMethod):
    """Wanda pruning: needs the per-input-feature activation norms of each layer."""

    name = "wanda"
    needs_act_norm = True

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats | None, name: str = "layer") -> LayerResult:
        if stats is None or stats.act_norm_sq is None:
            raise ValueError(f"{name}: Wanda needs activation norms; create the stats with "
                             "method.new_stats(...) and feed the layer inputs to add_batch")
        if stats.nsamples == 0:
            raise ValueError(f"{name}: Wanda statistics saw no calibration samples")
        stats.check_finite()
        keep = wanda_mask(weight, stats.act_norm_sq.to(weight.device), self.pattern, name=name)
        return LayerResult(weight=weight.masked_fill(~keep, 0), mask=keep, pattern=self.pattern)

"""The contract between pruning methods and the whole-model pipeline.

A method prunes one weight of shape [out_features, in_features] (nn.Linear layout) given the
`LayerStats` it asked for, and returns a `LayerResult`. The pipeline (prunekit.prune) owns hooks,
block traversal, devices and the report; methods own the math.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .. import _validate, patterns
from .stats import LayerStats


@dataclass
class LayerResult:
    weight: torch.Tensor          # pruned weight, same dtype/device/shape as the input weight
    mask: torch.Tensor            # bool, True where a weight is kept
    pattern: patterns.Pattern
    damping: float | None = None  # SparseGPT: the damping that made H positive definite
    loss_estimate: float | None = None  # SparseGPT: the OBS loss sum the sweep accumulated
    notes: list[str] = field(default_factory=list)  # recoveries a user should know of; each names the layer
    refine: list = field(default_factory=list)      # RefineRecord of each refinement step (pruning/refine.py)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()


class PruningMethod:
    """Base class. Subclasses set `needs_hessian` / `needs_act_norm` and implement `prune_layer`."""

    name = "method"
    needs_hessian = False
    needs_act_norm = False

    def __init__(self, sparsity="0.5"):
        self.pattern = patterns.parse(sparsity)

    def new_stats(self, in_features: int, device=None, name: str = "layer") -> LayerStats | None:
        if not (self.needs_hessian or self.needs_act_norm):
            return None
        return LayerStats(in_features, hessian=self.needs_hessian, act_norm=self.needs_act_norm,
                          device=device, name=name)

    def check_weight(self, weight: torch.Tensor, name: str) -> None:
        _validate.float_tensor(weight, f"{name}.weight", ndim=2)
        _validate.finite(weight, f"{name}.weight")
        self.pattern.check_width(weight.shape[1], f"{name}.weight")

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats | None, name: str = "layer") -> LayerResult:
        raise NotImplementedError

    def with_pattern(self, sparsity) -> PruningMethod:
        """A copy of this method that prunes to another pattern (per-layer sparsity allocation)."""
        clone = copy.copy(self)
        clone.pattern = patterns.parse(sparsity)
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pattern})"

"""Magnitude pruning: rank weights by their size alone (no calibration data).

granularity='element' prunes single weights ranked by score 'l1' |w| or 'l2' w², either N:M per
group, per output row (scope='row'), over the whole tensor (scope='layer', the Wanda paper's
magnitude baseline) or over all layers at once (scope='global', see `global_magnitude_masks`).
granularity='row' / 'column' zeroes whole output rows / input columns ranked by a group score
('l1', 'l2', 'mean_abs', 'variance'). Exactly int(count * sparsity) entries or groups are pruned;
among equal scores the lower index goes first.
"""
from __future__ import annotations

import torch

from .. import _validate, patterns
from ..ops import select_mask  # noqa: F401  (registers the torch.ops.prunekit selection ops)
from ..ref import magnitude as scores_ref
from ..ref import selection
from .base import LayerResult, PruningMethod
from .stats import LayerStats

GRANULARITIES = ("element", "row", "column")
SCOPES = ("row", "layer", "global")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what}: expected one of {choices}, got {value!r}")


def _tensor_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Whole-tensor selection; on CPU as one long row for the C++ linear-time select."""
    if scores.is_cuda:
        return selection.tensor_keep_mask(scores, sparsity)
    return torch.ops.prunekit.row_keep_mask(scores.reshape(1, -1), sparsity).reshape(scores.shape)


def magnitude_mask(W: torch.Tensor, sparsity="0.5", score: str = "l1", granularity: str = "element",
                   group_score: str = "l2", scope: str = "layer", *, name: str = "layer") -> torch.Tensor:
    """Keep mask (bool, True = kept) of W [out_features, in_features]; see the module docstring.
    `scope` applies to unstructured element pruning; N:M is always per group."""
    pattern = patterns.parse(sparsity)
    _check_choice(granularity, GRANULARITIES, "granularity")
    _check_choice(scope, SCOPES, "scope")
    _validate.float_tensor(W, f"{name}.weight", ndim=2)
    _validate.finite(W, f"{name}.weight")
    if granularity != "element":
        if pattern.is_nm:
            raise ValueError(f"{name}: an N:M pattern ({pattern}) prunes elements; "
                             f"granularity={granularity!r} needs a fraction")
        axis_scores = scores_ref.group_scores(W, granularity, group_score)
        keep = selection.tensor_keep_mask(axis_scores, pattern.sparsity)
        return (keep[:, None] if granularity == "row" else keep[None, :]).expand(W.shape).clone()
    element = scores_ref.element_scores(W, score)
    if pattern.is_nm:
        pattern.check_width(W.shape[1], f"{name}.weight")
        return torch.ops.prunekit.nm_keep_mask(element, pattern.n, pattern.m)
    if scope == "row":
        return torch.ops.prunekit.row_keep_mask(element, pattern.sparsity)
    if scope == "layer":
        return _tensor_keep(element, pattern.sparsity)
    raise ValueError(f"{name}: scope='global' ranks all layers together; call "
                     "global_magnitude_masks(weights, sparsity) (prunekit.prune does)")


def _global_keys(W: torch.Tensor, score: str) -> torch.Tensor:
    # Scores are >= 0, so the float32 bit pattern read as int32 orders like the score.
    return scores_ref.element_scores(W, score).float().reshape(-1).view(torch.int32)


def _kth_smallest_key(weights: list[torch.Tensor], score: str, k: int) -> int:
    """The k-th smallest (1-based) key over all layers, by 8-bit radix select: four histogram
    passes instead of concatenating (and sorting) every score of the model."""
    prefix = 0
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64)
        for W in weights:
            keys = _global_keys(W, score)
            if shift != 24:
                keys = keys[(keys >> (shift + 8)) == (prefix >> (shift + 8))]
            hist += torch.bincount(((keys >> shift) & 255).long(), minlength=256).cpu()
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, k))  # first bin whose cumulative count reaches k
        k -= int(cumulative[digit - 1]) if digit else 0
        prefix |= digit << shift
    return prefix


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity, score: str = "l1") -> dict[str, torch.Tensor]:
    """One threshold over all layers: prune the int(total * sparsity) lowest element scores of
    all weights together. Ties go in dict order, then row-major index order (lowest first).
    Scores are compared in float32."""
    pattern = patterns.parse(sparsity)
    if pattern.is_nm:
        raise ValueError(f"global magnitude pruning needs a fraction, got the N:M pattern {pattern}")
    _check_choice(score, scores_ref.ELEMENT_SCORES, "score")
    for name, W in weights.items():
        _validate.float_tensor(W, f"{name}.weight")
        _validate.finite(W, f"{name}.weight")
    tensors = list(weights.values())
    k = int(sum(W.numel() for W in tensors) * pattern.sparsity)
    if k == 0:
        return {name: torch.ones_like(W, dtype=torch.bool) for name, W in weights.items()}
    threshold = _kth_smallest_key(tensors, score, k)
    below = sum(int((_global_keys(W, score) < threshold).sum()) for W in tensors)
    ties_left = k - below  # entries equal to the threshold still to prune, first come first pruned
    masks = {}
    for name, W in weights.items():
        keys = _global_keys(W, score)
        tie = keys == threshold
        tie_rank = torch.cumsum(tie, 0) - tie.long()
        pruned = (keys < threshold) | (tie & (tie_rank < ties_left))
        ties_left -= int(tie.sum())
        masks[name] = (~pruned).reshape(W.shape)
    return masks


class Magnitude(PruningMethod):
    """Magnitude pruning; needs no calibration statistics. Arguments as in `magnitude_mask`."""

    name = "magnitude"

    def __init__(self, sparsity="0.5", score: str = "l1", granularity: str = "element",
                 group_score: str = "l2", scope: str = "layer"):
        super().__init__(sparsity)
        _check_choice(score, scores_ref.ELEMENT_SCORES, "score")
        _check_choice(granularity, GRANULARITIES, "granularity")
        _check_choice(group_score, scores_ref.GROUP_REDUCTIONS, "group_score")
        _check_choice(scope, SCOPES, "scope")
        if granularity != "element" and self.pattern.is_nm:
            raise ValueError(f"Magnitude: an N:M pattern ({self.pattern}) needs granularity='element'")
        if scope == "global" and (self.pattern.is_nm or granularity != "element"):
            raise ValueError("Magnitude: scope='global' is for unstructured element pruning")
        self.score, self.granularity, self.group_score, self.scope = score, granularity, group_score, scope

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats | None = None, name: str = "layer") -> LayerResult:
        keep = magnitude_mask(weight, self.pattern, self.score, self.granularity, self.group_score, self.scope,
                              name=name)
        return LayerResult(weight=weight.masked_fill(~keep, 0), mask=keep, pattern=self.pattern)

    def __repr__(self) -> str:
        return (f"Magnitude({self.pattern}, score={self.score!r}, granularity={self.granularity!r}, "
                f"group_score={self.group_score!r}, scope={self.scope!r})")

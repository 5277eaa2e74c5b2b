"""Reference magnitude scores. Element scores rank single weights; group scores rank whole output
rows, input columns or blocks of consecutive inputs (for structured pruning). Scores are computed in
float32 (float64 stays float64) so that half-precision weights neither overflow nor tie spuriously."""
from __future__ import annotations

import torch

ELEMENT_SCORES = ("l1", "l2")
GROUP_REDUCTIONS = ("l1", "l2", "mean_abs", "variance")
GROUP_AXES = ("row", "column")


def _wide(W: torch.Tensor) -> torch.Tensor:
    return W if W.dtype == torch.float64 else W.float()


def element_scores(W: torch.Tensor, score: str = "l1") -> torch.Tensor:
    """'l1': |w|, 'l2': w²; same shape as W."""
    if score == "l1":
        return _wide(W).abs()
    if score == "l2":
        return _wide(W).square()
    raise ValueError(f"score: expected one of {ELEMENT_SCORES}, got {score!r}")


def reduce_groups(values: torch.Tensor, reduction: str, dim: int) -> torch.Tensor:
    """Reduces `values` along `dim`: 'l1' Σ|w|, 'l2' sqrt(Σw²), 'mean_abs' mean |w|,
    'variance' population variance (correction 0)."""
    if reduction == "l1":
        return values.abs().sum(dim)
    if reduction == "l2":
        return values.square().sum(dim).sqrt()
    if reduction == "mean_abs":
        return values.abs().mean(dim)
    if reduction == "variance":
        return values.var(dim, correction=0)
    raise ValueError(f"group_score: expected one of {GROUP_REDUCTIONS}, got {reduction!r}")


def group_scores(W: torch.Tensor, axis: str = "row", reduction: str = "l2") -> torch.Tensor:
    """One score per output row (axis='row', shape [out]) or input column (axis='column', [in])."""
    if axis not in GROUP_AXES:
        raise ValueError(f"axis: expected one of {GROUP_AXES}, got {axis!r}")
    return reduce_groups(_wide(W), reduction, dim=1 if axis == "row" else 0)


def block_scores(W: torch.Tensor, m: int, reduction: str = "l1") -> torch.Tensor:
    """One score per block of m consecutive inputs of a row: shape [out, in // m]."""
    rows, width = W.shape
    if m < 1 or width % m:
        raise ValueError(f"block size {m} must divide the input width {width}")
    return reduce_groups(_wide(W).reshape(rows, width // m, m), reduction, dim=2)

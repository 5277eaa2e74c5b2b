"""Data-parallel calibration statistics: every rank accumulated its shard of the calibration batches;
the all-reduce leaves on every rank what one process would have accumulated over all of them.

LayerStats keeps running means (Wanda's per-feature squared norm, SparseGPT's H = 2/n·ΣXᵀX), so each
rank turns its mean back into a sum (mean · its sample count), the sums and the counts are all-reduced,
and the total is divided by the total count: the same statistic up to fp32 summation order.
"""
from __future__ import annotations

import torch

from ..pruning.stats import LayerStats
from .session import Session

STAT_TENSORS = ("act_norm_sq", "hessian")


def reduce_stats(session: Session, stats: dict[str, LayerStats | None]) -> dict[str, LayerStats | None]:
    """All-reduces `stats` (by layer name; layers that share one LayerStats share it on every rank) in
    place and returns it."""
    unique: list[LayerStats] = []
    index: dict[int, int] = {}
    layout = []
    for name, s in stats.items():
        if s is None:
            layout.append(f"{name}:-")
            continue
        if type(s) is not LayerStats:
            raise TypeError(f"{name}: distributed calibration reduces prunekit LayerStats, got "
                            f"{type(s).__name__} (its fields would not be summed across ranks)")
        if id(s) not in index:
            index[id(s)] = len(unique)
            unique.append(s)
        layout.append(f"{name}:{index[id(s)]}")
    # The same layers, sharing statistics the same way, on every rank; then the sums.
    session.agree("statistics layout", ",".join(layout))
    if not unique:
        return stats
    counts = torch.tensor([float(s.nsamples) for s in unique], dtype=torch.float64)
    session.all_reduce_(counts)
    for s, total in zip(unique, counts.tolist()):
        for attr in STAT_TENSORS:
            t = getattr(s, attr)
            if t is None:
                continue
            t.mul_(float(s.nsamples))  # running mean -> sum over this rank's samples
            session.all_reduce_(t)
            if total > 0:
                t.div_(total)
        s.nsamples = int(total)
        s.derived.clear()
    return stats


def sum_errors(session: Session, errors: dict[str, torch.Tensor]) -> None:
    """Each layer's reconstruction error summed over every rank's batches, in place (float64)."""
    session.sync("errors")
    if not errors:
        return
    names = list(errors)
    stacked = torch.stack([errors[n].detach().to("cpu", torch.float64).reshape(()) for n in names])
    session.all_reduce_(stacked)
    for n, value in zip(names, stacked.unbind()):
        errors[n] = value

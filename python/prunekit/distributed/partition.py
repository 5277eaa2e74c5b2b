"""Work-parallel pruning: which rank prunes which layer of a block.

The unit of work is a group of layers that share one LayerStats (q/k/v, gate/up read the same input):
SparseGPT factors their Hessian once, so the group stays on one rank. Its cost, in multiply-adds:
  with a Hessian (SparseGPT, refinement): cols³ for the factorization + Σ rows·cols² for the sweeps
  without (Wanda, magnitude):              Σ rows·cols (a score and a selection per weight)
Groups go to ranks greedily, largest first, each to the least loaded rank (LPT: within 4/3 of the
best makespan). Every rank computes the same assignment from the same shapes.
"""
from __future__ import annotations

from torch import nn

from .. import calibrate


def group_cost(shapes: list[tuple[int, int]], hessian: bool) -> float:
    """Multiply-adds to prune layers of shapes [(rows, cols), ...] that share one input."""
    cols = shapes[0][1]
    if not hessian:
        return float(sum(rows * c for rows, c in shapes))
    return float(cols) ** 3 + float(sum(rows * c * c for rows, c in shapes))


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each job (LPT); ties go to the lower rank, so every rank computes the same."""
    loads = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[j] = rank
        loads[rank] += costs[j]
    return owner


def makespan(costs: list[float], world: int) -> float:
    """The largest per-rank load of `assign(costs, world)`."""
    loads = [0.0] * world
    for job, rank in enumerate(assign(costs, world)):
        loads[rank] += costs[job]
    return max(loads) if costs else 0.0


def owners(layers: dict[str, nn.Module], stats: dict, hessian: bool, world: int) -> dict[str, int]:
    """Layer name -> the rank that prunes it."""
    groups: list[list[str]] = []
    by_stats: dict[int, int] = {}
    for name in layers:
        s = stats.get(name)
        if s is not None and id(s) in by_stats:
            groups[by_stats[id(s)]].append(name)
            continue
        if s is not None:
            by_stats[id(s)] = len(groups)
        groups.append([name])
    costs = [group_cost([tuple(calibrate.layer_weight(layers[n]).shape) for n in g], hessian) for g in groups]
    ranks = assign(costs, world)
    return {name: rank for g, rank in zip(groups, ranks) for name in g}

"""The search space: groups of layers that share one sparsity, a ladder of sparsities around the target,
and the repair that makes every trial meet the target exactly.

A trial picks one rung k (an integer) per group; the group's sparsity is `target + k * step`. The
parameter-weighted mean sparsity Σ nᵢ·(target + kᵢ·step) / Σ nᵢ equals the target exactly when
Σ nᵢ·kᵢ = 0 — an integer condition, so exactness does not depend on floating-point luck. `balance`
shifts all rungs by their weighted mean, then moves rungs one at a time (always the move that shrinks
the imbalance most) until Σ nᵢ·kᵢ = 0. With
equal-sized groups (the blocks of a transformer) it always succeeds; with unequal ones (granularity
"layer") it can fail, and the trial is then discarded.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .. import calibrate

GRANULARITIES = ("block", "layer")
MAX_SPARSITY = 0.99  # the highest rung: a layer pruned further is all but gone


@dataclass(frozen=True)
class Group:
    """Layers that always get the same sparsity; `numel` is their total weight count."""

    name: str
    layers: tuple[str, ...]
    numel: int


def make_groups(layers: dict[str, nn.Module], blocks: tuple[str, nn.Module] | None,
                granularity: str = "block") -> list[Group]:
    """One group per block ("block"; layers outside the block list get a group each) or per layer."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    numel = {name: calibrate.layer_weight(m).numel() for name, m in layers.items()}
    if granularity == "layer" or blocks is None:
        return [Group(name, (name,), numel[name]) for name in layers]
    path, block_list = blocks
    groups, placed = [], set()
    for child, _ in block_list.named_children():
        prefix = f"{path}.{child}."
        members = tuple(name for name in layers if name.startswith(prefix))
        if members:
            groups.append(Group(f"{path}.{child}", members, sum(numel[n] for n in members)))
            placed.update(members)
    groups += [Group(name, (name,), numel[name]) for name in layers if name not in placed]
    return groups


@dataclass(frozen=True)
class Ladder:
    """Rungs k_min..k_max around the target: rung k is sparsity target + k·step, within [0, MAX_SPARSITY]."""

    target: float
    step: float
    k_min: int
    k_max: int

    def level(self, k: int) -> float:
        if not self.k_min <= k <= self.k_max:
            raise ValueError(f"rung {k} is outside the ladder [{self.k_min}, {self.k_max}]")
        return max(self.target + k * self.step, 0.0)  # max: float noise at the bottom rung only

    @property
    def rungs(self) -> range:
        return range(self.k_min, self.k_max + 1)


def make_ladder(target: float, step: float = 0.05, spread: float = 0.15) -> Ladder:
    """Rungs every `step` up to `spread` either side of the target (fewer near 0 and MAX_SPARSITY)."""
    if not (isinstance(step, (int, float)) and 0 < step < 1):
        raise ValueError(f"step: expected a fraction in (0, 1) between rungs, got {step!r}")
    if not (isinstance(spread, (int, float)) and 0 <= spread < 1):
        raise ValueError(f"spread: expected the largest deviation from the target, a fraction in [0, 1), got {spread!r}")
    reach = int(math.floor(spread / step + 1e-9))
    k_min = -min(reach, int(math.floor(target / step + 1e-9)))
    k_max = min(reach, max(0, int(math.floor((MAX_SPARSITY - target) / step + 1e-9))))
    return Ladder(float(target), float(step), k_min, k_max)


def balance(rungs: Sequence[int], sizes: Sequence[int], ladder: Ladder) -> list[int] | None:
    """The rungs repaired until Σ sizes·rungs = 0 (the target met exactly); None when that fails.

    First every rung shifts by the weighted mean rung (rounded; clamped to the ladder), which keeps the
    order the sampler proposed; then rungs move one step at a time, each move the one leaving the
    smallest imbalance (ties: the group furthest in the direction of the imbalance, then the first),
    while the imbalance shrinks. Balanced rungs are returned unchanged."""
    ks = list(rungs)
    shift = round(sum(n * k for n, k in zip(sizes, ks)) / sum(sizes))  # first: all down (up) by the mean
    ks = [min(max(k - shift, ladder.k_min), ladder.k_max) for k in ks]
    excess = sum(n * k for n, k in zip(sizes, ks))
    while excess != 0:
        move = -1 if excess > 0 else 1
        best, best_key = None, None
        for i, (n, k) in enumerate(zip(sizes, ks)):
            if not ladder.k_min <= k + move <= ladder.k_max:
                continue
            left = abs(excess + move * n)
            if left >= abs(excess):
                continue
            key = (left, k * move, i)  # smallest imbalance, then the most extreme rung
            if best_key is None or key < best_key:
                best, best_key = i, key
        if best is None:
            return None
        ks[best] += move
        excess += move * sizes[best]
    return ks


def weighted_sparsity(sparsity: dict[str, float], numel: dict[str, int]) -> float:
    """Σ nᵢ·sᵢ / Σ nᵢ over the layers."""
    total = sum(numel.values())
    return sum(sparsity[name] * n for name, n in numel.items()) / total

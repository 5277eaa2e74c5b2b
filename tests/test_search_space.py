"""The search space: groups, the sparsity ladder and the repair that meets the target exactly."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from prunekit.search.space import MAX_SPARSITY, balance, make_groups, make_ladder, weighted_sparsity


def test_ladder_rungs_stay_in_range():
    ladder = make_ladder(0.6, step=0.05, spread=0.15)
    assert (ladder.k_min, ladder.k_max) == (-3, 3)
    assert ladder.level(-3) == pytest.approx(0.45) and ladder.level(3) == pytest.approx(0.75)
    low = make_ladder(0.07, step=0.05, spread=0.15)  # no rung below 0
    assert low.k_min == -1 and low.level(low.k_min) >= 0
    high = make_ladder(0.95, step=0.05, spread=0.15)  # none above MAX_SPARSITY
    assert high.k_max == 0 and high.level(0) == 0.95
    top = make_ladder(0.995)  # a target above the top rung still gets itself
    assert top.level(0) == 0.995 and top.k_max == 0
    with pytest.raises(ValueError, match="outside the ladder"):
        ladder.level(4)
    with pytest.raises(ValueError, match="step"):
        make_ladder(0.5, step=0)
    with pytest.raises(ValueError, match="spread"):
        make_ladder(0.5, spread=-0.1)


def test_balance_equal_sizes_always_reaches_zero():
    ladder = make_ladder(0.5, step=0.05, spread=0.15)
    for raw in itertools.product(range(-3, 4), repeat=4):
        ks = balance(raw, [10] * 4, ladder)
        assert ks is not None and sum(ks) == 0
        assert all(ladder.k_min <= k <= ladder.k_max for k in ks)
        if sum(raw) == 0:
            assert ks == list(raw)  # already balanced: untouched


def test_balance_unequal_sizes_and_infeasible():
    ladder = make_ladder(0.5, step=0.05, spread=0.15)
    ks = balance([3, 0, 0], [4, 1, 1], ladder)  # needs -12: the big group gives, small ones can't alone
    assert ks is not None and sum(n * k for n, k in zip([4, 1, 1], ks)) == 0
    assert balance([1, 0], [3, 2], ladder) == [0, 0]
    assert balance([1], [7], ladder) == [0]
    # Stuck: every single move leaves the imbalance (1) as large or larger; the trial is then discarded.
    assert balance([1, -1], [3, 2], make_ladder(0.5, 0.05, 0.05)) is None


def test_balance_moves_the_most_extreme_rung_first():
    ladder = make_ladder(0.5, step=0.05, spread=0.15)
    assert balance([3, 1, 0], [1, 1, 1], ladder) == [1, 0, -1]


def test_groups_by_block_and_by_layer():
    blocks = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(4, 8), "b": nn.Linear(8, 4)}) for _ in range(2)])
    model = nn.ModuleDict({"blocks": blocks, "head": nn.Linear(4, 3)})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups = make_groups(layers, ("blocks", blocks), "block")
    assert [g.name for g in groups] == ["blocks.0", "blocks.1", "head"]
    assert groups[0].layers == ("blocks.0.a", "blocks.0.b") and groups[0].numel == 64
    assert [g.name for g in make_groups(layers, ("blocks", blocks), "layer")] == list(layers)
    with pytest.raises(ValueError, match="granularity"):
        make_groups(layers, None, "row")
    numel = {n: m.weight.numel() for n, m in layers.items()}
    assert weighted_sparsity({n: 0.5 for n in layers}, numel) == pytest.approx(0.5)
    assert MAX_SPARSITY < 1

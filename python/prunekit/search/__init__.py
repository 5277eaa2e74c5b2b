"""Automatic pruning-policy search: `prunekit.search_allocation` finds a per-layer sparsity allocation
that meets an overall target exactly and keeps the pruned model's outputs closest to the dense model's.

Modules: space (groups, ladder, exact-budget repair), cache (layers pruned once per rung), score (the
fidelity reward), run (the optuna study), result (the allocation and its history), plot, cli.
"""
from __future__ import annotations

from .result import SearchedAllocation
from .run import search_allocation

__all__ = ["SearchedAllocation", "search_allocation"]

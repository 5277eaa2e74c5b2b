"""The search's answer: an allocation prunekit.prune accepts, carrying the search history.

`SearchedAllocation` is a `LayerSparsity` (one exact layer name per rule), so
`prunekit.prune(model, method, calibration, allocation=result)` uses it as it is; `save(path)` writes
the rules as the JSON object that `prunekit prune --allocation FILE` reads, `save_history(path)` the
whole history (every trial's allocation and score), `plot(path)` a PNG of both.
"""
from __future__ import annotations

import json
import os
import re

from ..pruning.allocation import LayerSparsity
from ..report import private_name


def rule_for(name: str) -> str:
    """A layer-name pattern that matches exactly this name (escaped when it holds glob characters)."""
    return name if not re.search(r"[*?\[\]]", name) else "re:" + re.escape(name)


class SearchedAllocation(LayerSparsity):
    """Per-layer sparsities found by prunekit.search_allocation, with the search's record in `history`."""

    name = "searched"

    def __init__(self, sparsity: dict[str, float], history: dict):
        super().__init__({rule_for(name): s for name, s in sparsity.items()})
        self.sparsity = dict(sparsity)  # by layer name
        self.history = history

    @property
    def target(self) -> float:
        return self.history["target"]

    def save(self, path: str | os.PathLike) -> None:
        """The allocation file: a JSON object {layer-name pattern: sparsity} (prunekit prune --allocation)."""
        _write_json(path, self.rules)

    def save_history(self, path: str | os.PathLike) -> None:
        _write_json(path, self.history)

    def plot(self, path: str | os.PathLike) -> None:
        from .plot import plot_history

        plot_history(self.history, path)

    def __repr__(self) -> str:
        h = self.history
        return (f"SearchedAllocation({len(self.sparsity)} layers, target {h['target']:.4f}, "
                f"{h['quality_name']} {h['best']['quality']:.4f} vs uniform {h['uniform']['quality']:.4f})")


def _write_json(path, payload) -> None:
    """Written to a temporary sibling, then renamed: the file appears whole or not at all."""
    path = os.path.abspath(os.fspath(path))
    tmp = private_name(os.path.dirname(path), f".{os.path.basename(path)}.tmp-")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

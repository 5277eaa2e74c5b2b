"""Training with sparsity: gradual pruning schedules, masked training, distillation for recovery,
masks as values, rewinding and iterative magnitude pruning (prunekit.train.iterative_magnitude)."""
from __future__ import annotations

import importlib

# public name -> submodule; imported on first use (as in prunekit/__init__.py)
_EXPORTS = {
    "MaskedTraining": "masked", "Masks": "masks", "Snapshot": "rewinding", "rewind": "rewinding",
    "reinitialize": "rewinding", "iterative_magnitude": "imp", "prune_remaining": "imp", "plot_rounds": "imp",
    "IMPResult": "imp", "RoundContext": "imp",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"prunekit.train.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunekit.train' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))

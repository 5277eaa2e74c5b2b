"""Accumulating each targeted layer's calibration statistics with forward pre-hooks while a block (or
the whole model) runs over the calibration batches. Shared by prunekit.prune and the allocations
(OWL), so both see exactly the same statistics.

Every call of a layer counts: a layer called twice per forward contributes both inputs of every batch.
Layers that read the very same input tensors (q/k/v, gate/up) share one statistics object, so it is
accumulated once.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import calibrate
from .distributed import session as dist_session
from .distributed.reduce import reduce_stats
from .pruning.base import PruningMethod
from .pruning.stats import LayerStats


def collect_stats(layers: dict[str, nn.Module], run: Callable[[int], object], n_batches: int,
                  method: PruningMethod, device: torch.device,
                  tokens_of: Callable[[int], int | None] = lambda j: None) -> dict[str, LayerStats | None]:
    """Statistics by layer name after running `run(j)` for every batch j. `tokens_of(j)`: the sequence
    length of batch j, so that inputs flattened to tokens count samples as 3-D inputs do. In a
    distributed run (prunekit.distributed) the batches are this rank's share and the statistics are
    summed over every rank's, so each rank returns what one process would over all batches."""
    stats = _accumulate(layers, run, n_batches, method, device, tokens_of)
    session = dist_session.active()
    return stats if session is None else reduce_stats(session, stats)


def _accumulate(layers, run, n_batches, method, device, tokens_of) -> dict[str, LayerStats | None]:
    stats = {name: method.new_stats(calibrate.in_features(m), device=device, name=name)
             for name, m in layers.items()}
    wanted = {name: layers[name] for name, s in stats.items() if s is not None}
    if not wanted or n_batches == 0:
        return stats

    # Batch 0: record every call's input, then decide which layers share inputs.
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}

    def probe(name):
        def hook(module, args):
            seen[name].append(args[0])
        return hook

    handles = [m.register_forward_pre_hook(probe(name)) for name, m in wanted.items()]
    try:
        run(0)
    finally:
        for h in handles:
            h.remove()
    leaders: list[str] = []
    for name in wanted:
        ids = [id(x) for x in seen[name]]
        same = next((lead for lead in leaders if ids and [id(x) for x in seen[lead]] == ids), None)
        if same is None:
            leaders.append(name)
            for x in seen[name]:
                stats[name].add_batch(x, tokens_of(0))
        else:
            stats[name] = stats[same]
    seen.clear()

    current = [None]

    def accumulate(name):
        def hook(module, args):
            stats[name].add_batch(args[0], current[0])
        return hook

    handles = [wanted[name].register_forward_pre_hook(accumulate(name)) for name in leaders]
    try:
        for j in range(1, n_batches):
            current[0] = tokens_of(j)
            run(j)
    finally:
        for h in handles:
            h.remove()
    return stats

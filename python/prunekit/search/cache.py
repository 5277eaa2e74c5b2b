"""Cheap trials: every layer pruned once at every rung of the ladder, from statistics captured once.

`VariantCache` runs the calibration batches through the dense model once, with hooks that accumulate
each targeted layer's statistics (Wanda's activation norms, SparseGPT's Hessian: the method's own
`new_stats`, via prunekit.collect). It then prunes every layer at every rung and keeps the pruned
weights. A trial only copies the chosen variants into the model (`assemble`) and scores it; nothing is
re-pruned. SparseGPT factors each Hessian once for all rungs (its factor is cached on the statistics).

The statistics come from the dense model (every layer sees dense inputs), as OWL measures its outlier
ratios; `prunekit.prune` with the chosen allocation then prunes block by block on the outputs of the
already pruned blocks, so the search scores a close proxy of the final model, not the model itself.

Memory: the cache holds (rungs + 1) copies of the targeted weights, in their dtype, on `device`;
for the 22M-parameter MiniLM with 7 rungs that is about 340 MB. Larger models need fewer rungs.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate
from ..collect import collect_stats
from ..pruning.base import PruningMethod
from .space import Ladder

log = logging.getLogger("prunekit")


def whole_model_run(model: nn.Module, batches: list[dict], device: torch.device):
    """run(j): one forward of calibration batch j through the model."""
    extra = calibrate.forward_kwargs(model)

    def run(j: int):
        return model(**calibrate.to_device(batches[j], device), **extra)
    return run


def _sequence_length(batch: dict) -> int | None:
    ids = batch.get("input_ids")
    return ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


class VariantCache:
    """Each layer's dense weight and its pruned weight at every rung; see the module docstring."""

    def __init__(self, model: nn.Module, method: PruningMethod, layers: dict[str, nn.Module],
                 batches: list[dict], device: torch.device, ladder: Ladder, progress: bool = False):
        self.layers, self.ladder = layers, ladder
        began = time.perf_counter()
        run = whole_model_run(model, batches, device)
        stats = collect_stats(layers, run, len(batches), method, device,
                              lambda j: _sequence_length(batches[j]))
        self.stats_seconds = time.perf_counter() - began
        for name, s in stats.items():
            if s is not None and s.nsamples == 0:
                raise ValueError(f"{name} received no calibration input (never called on these batches); "
                                 "exclude it from the search")
        self.dense = {name: calibrate.layer_weight(m).detach().clone() for name, m in layers.items()}
        self.variants: dict[str, dict[int, torch.Tensor]] = {}
        bar = tqdm(layers, desc=f"prunekit search: pruning {len(ladder.rungs)} rungs", unit="layer",
                   disable=not progress)
        for name in bar:
            self.variants[name] = {}
            for k in ladder.rungs:
                level = ladder.level(k)
                chosen = method.with_pattern(level)
                result = chosen.prune_layer(self.dense[name].clone(), stats[name], name)
                self.variants[name][k] = result.weight.detach()
        del stats
        self.seconds = time.perf_counter() - began
        log.info("search cache: statistics in %.2f s, %d layers x %d rungs pruned in %.2f s",
                 self.stats_seconds, len(layers), len(ladder.rungs), self.seconds - self.stats_seconds)

    def assemble(self, rungs: dict[str, int]) -> None:
        """Writes each layer's variant at its rung into the model (layers left out: their dense weight)."""
        for name, module in self.layers.items():
            k = rungs.get(name)
            calibrate.set_layer_weight(module, self.dense[name] if k is None else self.variants[name][k])

    def restore(self) -> None:
        """Puts the dense weights back."""
        self.assemble({})

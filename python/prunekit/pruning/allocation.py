"""Per-layer sparsity allocation: each layer gets its own fraction instead of the method's one.

`prunekit.prune(model, method, calib, allocation=...)` takes either

- a dict `{layer-name pattern: sparsity}` (or `LayerSparsity(dict)`): patterns are shell globs (a
  regular expression only with a `re:` prefix), as for `include` (prunekit.patterns); the first pattern that matches a layer sets its sparsity,
  layers no pattern matches keep the method's; or
- `OWL()` (Yin et al. 2024, "Outlier Weighed Layerwise sparsity", luuyin/OWL): blocks whose Wanda
  scores |W|·||x|| hold more outliers are pruned less. Per block, the outlier ratio D is the fraction
  of the scores of all its targeted layers that exceed M × their mean (M = `threshold`, 5 by default).
  As in the reference code, the ratios are scaled to D̃ in [0, 2λ] and block i gets sparsity
  target − (D̃_i − mean D̃): the sparsities span 2λ (λ = `lam`, 0.08 by default; target ± λ when the
  ratios are symmetric, as the paper states) and their mean over blocks is exactly the target. Blocks
  are equal-sized in a transformer, so the model's overall sparsity is the target too.

Cost of OWL: as in the reference, the outlier ratios come from a first pass over the *dense* model
before anything is pruned, block by block (the inputs of block i+1 are the dense outputs of block i).
That pass is one forward of every calibration batch through each block plus one Wanda statistics
accumulation — about half of what pruning itself spends on forwards (which runs each block twice) —
and it holds one block's inputs, as the pruning pass does. Layers outside the block list get the target.

Only unstructured fractions are allocated: an N:M pattern is fixed by the hardware format, so combining
one with an allocation is an error.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _validate, calibrate, patterns
from ..collect import collect_stats
from .base import LayerResult, PruningMethod
from .stats import LayerStats

log = logging.getLogger("prunekit")


@dataclass
class Context:
    """What an allocation may use to look at the model before pruning (filled by prunekit.prune)."""

    model: nn.Module
    batches: list[dict]
    device: torch.device
    blocks: tuple[str, nn.ModuleList] | None   # (dotted path, block list), as calibrate.find_blocks
    offload_home: torch.device | None = None   # set when blocks live there and visit `device` one at a time
    progress: bool = True


class Allocation:
    """Chooses each targeted layer's sparsity before pruning starts. Subclasses implement `sparsities`."""

    name = "allocation"

    def __init__(self):
        self.layer_sparsity: dict[str, float] = {}  # the last allocation made, by layer name

    def check(self, method: PruningMethod, layers: dict[str, nn.Module]) -> None:
        """Fails before any forward when the method cannot be allocated."""
        if method.pattern.is_nm:
            raise ValueError(f"allocation={self!r}: the N:M pattern {method.pattern} keeps N of every M "
                             "weights in every layer and cannot be re-allocated; use a fraction like 0.5")
        if getattr(method, "scope", None) == "global":
            raise ValueError(f"allocation={self!r}: Magnitude(scope='global') already picks one threshold "
                             "for all layers; use scope='layer' or 'row' with an allocation")

    def sparsities(self, target: float, layers: dict[str, nn.Module], context: Context) -> dict[str, float]:
        """Sparsity by layer name; layers left out keep the target."""
        raise NotImplementedError

    def apply(self, method: PruningMethod, layers: dict[str, nn.Module], context: Context) -> PruningMethod:
        """The method, wrapped so that each layer is pruned to its allocated sparsity."""
        chosen = {name: _validate.sparsity(s, f"{self!r}: sparsity of {name}")
                  for name, s in self.sparsities(method.pattern.sparsity, layers, context).items()}
        self.layer_sparsity = {name: chosen.get(name, method.pattern.sparsity) for name in layers}
        log.info("%r: per-layer sparsity from %.4f to %.4f (target %s)", self,
                 min(self.layer_sparsity.values()), max(self.layer_sparsity.values()), method.pattern)
        return AllocatedMethod(method, chosen)


class AllocatedMethod(PruningMethod):
    """A method that prunes each layer named in `sparsities` to its own fraction."""

    def __init__(self, method: PruningMethod, sparsities: dict[str, float]):
        self.method, self.pattern, self.sparsities = method, method.pattern, dict(sparsities)
        self.name = method.name
        self.needs_hessian, self.needs_act_norm = method.needs_hessian, method.needs_act_norm

    def new_stats(self, in_features: int, device=None, name: str = "layer") -> LayerStats | None:
        return self.method.new_stats(in_features, device=device, name=name)

    def check_weight(self, weight: torch.Tensor, name: str) -> None:
        self.method.check_weight(weight, name)

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats | None, name: str = "layer") -> LayerResult:
        sparsity = self.sparsities.get(name)
        chosen = self.method if sparsity is None else self.method.with_pattern(sparsity)
        return chosen.prune_layer(weight, stats, name)

    def __repr__(self) -> str:
        return repr(self.method)


def as_allocation(value) -> Allocation | None:
    """None, an Allocation, or a dict of layer-name pattern -> sparsity."""
    if value is None or isinstance(value, Allocation):
        return value
    if isinstance(value, Mapping):
        return LayerSparsity(value)
    raise TypeError(f"allocation: expected prunekit.OWL(...), an Allocation or a dict of layer-name "
                    f"pattern -> sparsity, got {type(value).__name__}")


# ------------------------------------------------------------------------------------ by name
class LayerSparsity(Allocation):
    """Sparsity by layer-name pattern (glob, or `re:` regular expression); the first match wins."""

    name = "layers"

    def __init__(self, rules: Mapping[str, object]):
        super().__init__()
        if not isinstance(rules, Mapping) or not rules:
            raise ValueError(f"allocation: expected a non-empty dict of layer-name pattern -> sparsity, got {rules!r}")
        self.rules: dict[str, float] = {}
        for key, value in rules.items():
            if not isinstance(key, str):
                raise TypeError(f"allocation: layer-name patterns must be strings, got {key!r}")
            patterns.as_name_patterns(key, f"allocation[{key!r}]")
            pattern = patterns.parse(value)
            if pattern.is_nm:
                raise ValueError(f"allocation[{key!r}]: expected a fraction in [0, 1), got the N:M pattern {value!r}")
            self.rules[key] = pattern.sparsity

    def check(self, method: PruningMethod, layers: dict[str, nn.Module]) -> None:
        super().check(method, layers)
        for key in self.rules:
            if not any(patterns.name_matches(name, key) for name in layers):
                shown = ", ".join(list(layers)[:6]) + (", ..." if len(layers) > 6 else "")
                raise ValueError(f"allocation[{key!r}] matches none of the layers being pruned ({shown})")

    def sparsities(self, target: float, layers: dict[str, nn.Module],
                   context: Context | None = None) -> dict[str, float]:
        chosen = {}
        for name in layers:
            rule = next((key for key in self.rules if patterns.name_matches(name, key)), None)
            if rule is not None:
                chosen[name] = self.rules[rule]
        return chosen

    def __repr__(self) -> str:
        return f"LayerSparsity({self.rules})"


# ---------------------------------------------------------------------------------------- OWL
def block_outlier_ratio(scores: Callable[[], Iterable[torch.Tensor]], threshold: float) -> float:
    """Fraction of a block's scores above `threshold` × their mean over the whole block. `scores()`
    yields the block's score tensors one layer at a time; it is called twice (for the mean, then the
    count) so that only one layer's scores are alive at once."""
    total, summed = 0, 0.0
    for s in scores():
        total += s.numel()
        summed += float(s.double().sum())
    bound = threshold * summed / total
    return sum(int((s > bound).sum()) for s in scores()) / total


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """Block sparsities from outlier ratios: spread over 2·lam, mean exactly the target, the most
    outlier-rich block pruned least. Equal ratios give every block the target."""
    target = _validate.sparsity(target, "target sparsity")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0 or float(r.max() - r.min()) == 0.0:
        return [target] * r.numel()
    scaled = (r - r.min()) / (r.max() - r.min()) * (2 * lam)
    sparsity = target - (scaled - scaled.mean())
    clamped = sparsity.clamp(0.0, 1.0 - 1e-6)
    if not torch.equal(clamped, sparsity):
        warnings.warn(f"OWL: sparsities {[round(float(s), 4) for s in sparsity]} leave [0, 1) and are "
                      f"clamped, so their mean {float(clamped.mean()):.4f} is no longer the target "
                      f"{target:.4f}; use a smaller lam", stacklevel=2)
    return clamped.tolist()


def _wanda_scores(module: nn.Module, stats: LayerStats) -> torch.Tensor:
    weight = calibrate.layer_weight(module).detach()
    return weight.abs().float() * stats.act_norm_sq.to(weight.device).sqrt()


class OWL(Allocation):
    """Outlier Weighed Layerwise sparsity; see the module docstring. `threshold` is the paper's M,
    `lam` its λ (half the spread between the most and the least pruned block)."""

    name = "owl"

    def __init__(self, threshold: float = 5.0, lam: float = 0.08):
        super().__init__()
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"OWL: threshold (M) must be a positive number, got {threshold!r}")
        if not (isinstance(lam, (int, float)) and 0 <= lam < 1):
            raise ValueError(f"OWL: lam must be a fraction in [0, 1), got {lam!r}")
        self.threshold, self.lam = float(threshold), float(lam)
        self.outlier_ratios: dict[int, float] = {}  # block index -> ratio, from the last allocation
        self.block_sparsity: dict[int, float] = {}

    def sparsities(self, target: float, layers: dict[str, nn.Module], context: Context) -> dict[str, float]:
        if context.blocks is None:
            log.warning("OWL allocates per block and the model has no block list; every layer gets %.4f", target)
            return {}
        path, block_list = context.blocks
        groups = {i: {n: m for n, m in layers.items() if n.startswith(f"{path}.{child}.")}
                  for i, (child, _) in enumerate(block_list.named_children())}
        self.outlier_ratios = self.measure(groups, block_list, context)
        indices = sorted(self.outlier_ratios)
        sparsity = owl_sparsities([self.outlier_ratios[i] for i in indices], target, self.lam)
        self.block_sparsity = dict(zip(indices, sparsity))
        for i in indices:
            log.info("OWL block %d: outlier ratio %.4f%%, sparsity %.4f", i, 100 * self.outlier_ratios[i],
                     self.block_sparsity[i])
        return {name: self.block_sparsity[i] for i, group in groups.items() for name in group}

    @torch.no_grad()
    def measure(self, groups: dict[int, dict[str, nn.Module]], block_list: nn.ModuleList,
                context: Context) -> dict[int, float]:
        """Outlier ratio of each block holding targeted layers, from Wanda statistics gathered while
        the calibration batches flow through the dense blocks."""
        from .wanda import Wanda

        last = max((i for i, g in groups.items() if g), default=-1)
        if last < 0:
            return {}
        inputs = calibrate.capture_block_inputs(context.model, block_list, context.batches, context.device,
                                                last=last)
        ratios: dict[int, float] = {}
        for i in tqdm(range(last + 1), desc="prunekit OWL outliers", unit="block", disable=not context.progress):
            block = block_list[i]
            if context.offload_home is not None:
                block.to(context.device)
            outputs: dict[int, torch.Tensor] = {}

            def run(j: int, block=block, outputs=outputs, i=i) -> torch.Tensor:
                outputs[j] = inputs[j].call(block, i)
                return outputs[j]

            if groups[i]:
                stats = collect_stats(groups[i], run, len(inputs), Wanda(), context.device,
                                      lambda j: inputs[j].tokens_per_sample)
                ratios[i] = block_outlier_ratio(
                    lambda g=groups[i], st=stats: (_wanda_scores(m, st[n]) for n, m in g.items()), self.threshold)
            if i < last:
                for j, inp in enumerate(inputs):
                    inp.hidden = outputs[j] if j in outputs else run(j)
            if context.offload_home is not None:
                block.to(context.offload_home)
        return ratios

    def __repr__(self) -> str:
        return f"OWL(threshold={self.threshold:g}, lam={self.lam:g})"

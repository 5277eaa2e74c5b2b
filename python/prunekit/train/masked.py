"""Training under sparsity masks: gradual pruning during training, or fine-tuning a pruned model.

    mt = MaskedTraining(model, "0.8", cubic_schedule(0.8, begin=0, end=1000, every=100))
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        opt.step(); opt.zero_grad()
        mt.step()            # counts the step, recomputes masks at schedule steps, re-zeroes pruned weights
    mt.finalize()            # hard zeros, hooks removed

Pruned weights stay exactly zero: their gradients are zeroed by a hook (so fresh optimizer moments
stay zero) and the weights are zeroed again after every optimizer step (moments gathered before a
weight was pruned, and weight decay variants, would otherwise move it). Masks are chosen by a
calibration-free method (Magnitude: by |w| per layer by default, or per row, per N:M group, or over
all layers with scope='global'); since pruned weights are zero, each update keeps pruning them and
the sparsity grows exactly as scheduled. `MaskedTraining.from_pruned(model)` instead freezes the zero
pattern a one-shot method left, for recovery fine-tuning; `MaskedTraining.from_masks(model, masks)`
holds any given masks (prunekit.train.masks), e.g. after rewinding the weights (prunekit.train.rewinding).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .. import calibrate, patterns
from ..pruning.base import PruningMethod
from ..pruning.magnitude import Magnitude, global_magnitude_masks
from .masks import Masks
from .schedule import Schedule, constant_schedule

log = logging.getLogger("prunekit")


def _as_method(pattern_or_method, schedule: Schedule | None) -> PruningMethod:
    if pattern_or_method is None:
        if schedule is None:
            raise ValueError("MaskedTraining: give a pattern (e.g. 0.5, '2:4'), a method or a schedule")
        return Magnitude(schedule.final)
    if isinstance(pattern_or_method, PruningMethod):
        if pattern_or_method.needs_hessian or pattern_or_method.needs_act_norm:
            raise ValueError(f"MaskedTraining: {pattern_or_method!r} needs calibration statistics; masks "
                             "during training are chosen without them (use prunekit.Magnitude)")
        return pattern_or_method
    return Magnitude(patterns.parse(pattern_or_method))


def _check_schedule(schedule: Schedule | None, pattern: patterns.Pattern) -> Schedule:
    if schedule is None:
        return constant_schedule(pattern.sparsity)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a prunekit Schedule (cubic_schedule(...), ...), got "
                        f"{type(schedule).__name__}")
    if abs(schedule.final - pattern.sparsity) > 1e-9:
        raise ValueError(f"schedule {schedule!r} ends at sparsity {schedule.final:g} but the pattern is "
                         f"{pattern} (sparsity {pattern.sparsity:g}); make them agree")
    if pattern.is_nm and not schedule.is_constant:
        raise ValueError(f"the N:M pattern {pattern} has one sparsity; use constant_schedule("
                         f"{pattern.sparsity:g}, begin=...) rather than {schedule!r}")
    return schedule


class MaskedTraining:
    """Keeps the selected linear layers of `model` sparse while it trains; see the module docstring.

    pattern_or_method: a pattern (0.5, '50%', '2:4'), a calibration-free PruningMethod (Magnitude with
        its options), or None to take the schedule's final sparsity.
    schedule: when and how far to prune (prunekit.train.schedule); default: the pattern at once.
    include / exclude / blocks: which layers, as for prunekit.prune (default: every linear layer in
        the model's blocks, LM head excluded).
    """

    def __init__(self, model: nn.Module, pattern_or_method=None, schedule: Schedule | None = None, *,
                 include=None, exclude=None, blocks: str | None = None):
        method = _as_method(pattern_or_method, schedule)
        self.schedule = _check_schedule(schedule, method.pattern)
        self.method = method
        layers = _select(model, include, exclude, blocks)
        for name, module in layers.items():
            method.pattern.check_width(calibrate.in_features(module), f"{name}.weight")
        self._attach(layers)
        if self.schedule.is_update(0):
            self.update_masks()
        self.apply()

    @classmethod
    def from_pruned(cls, model: nn.Module, *, include=None, exclude=None, blocks: str | None = None
                    ) -> MaskedTraining:
        """Fine-tuning after one-shot pruning: every selected layer's current zeros stay zero. Layers
        without zeros are left alone."""
        return cls.from_masks(model, Masks.from_model(model, include=include, exclude=exclude, blocks=blocks))

    @classmethod
    def from_masks(cls, model: nn.Module, masks) -> MaskedTraining:
        """Training with given keep masks held fixed (a Masks or a dict of layer name -> bool tensor
        [out_features, in_features], True = kept; any pattern). The pruned weights are zeroed now."""
        masks = Masks(masks)
        if not masks:
            raise ValueError("MaskedTraining.from_masks: no masks given")
        self = cls.__new__(cls)
        self.method, self.schedule = None, None
        self._attach(masks.check(model))
        for name, keep in masks.items():
            self._set_mask(name, None if bool(keep.all()) else keep)
        self.apply()
        self.sparsity = masks.sparsity
        return self

    # ------------------------------------------------------------------------------- public
    def step(self) -> None:
        """Call after each optimizer step: counts it, updates masks on schedule, re-zeroes pruned weights."""
        self._check_open()
        self.step_count += 1
        if self.schedule is not None and self.schedule.is_update(self.step_count):
            self.update_masks()
        self.apply()

    @torch.no_grad()
    def update_masks(self) -> None:
        """Recomputes every mask at the schedule's sparsity for the current step, from the current weights."""
        self._check_open()
        if self.method is None:
            raise RuntimeError("MaskedTraining.from_pruned/from_masks keeps its masks fixed; they are not recomputed")
        sparsity = self.schedule(self.step_count)
        pattern = self.method.pattern if self.method.pattern.is_nm else patterns.Pattern(sparsity)
        weights = {name: calibrate.layer_weight(m).detach() for name, m in self.layers.items()}
        if pattern.sparsity == 0.0:
            keep = {name: None for name in weights}
        elif getattr(self.method, "scope", None) == "global":
            keep = global_magnitude_masks(weights, pattern, score=self.method.score)
        else:
            method = self.method.with_pattern(pattern)
            keep = {name: method.prune_layer(w.contiguous(), None, name).mask for name, w in weights.items()}
        for name, mask in keep.items():
            self._set_mask(name, mask)
        self.sparsity = pattern.sparsity
        log.info("MaskedTraining step %d: masks at %s over %d layers", self.step_count, pattern, len(keep))

    @torch.no_grad()
    def apply(self) -> None:
        """Sets every pruned weight to exactly zero."""
        for name, module in self.layers.items():
            pruned = self._pruned_on(name, module.weight.device)
            if pruned is not None:
                module.weight.data.masked_fill_(pruned, 0)

    @property
    def masks(self) -> Masks:
        """Keep masks (True = kept) in nn.Linear layout [out_features, in_features], by layer name."""
        out = Masks()
        for name, module in self.layers.items():
            pruned = self._pruned[name]
            weight = calibrate.layer_weight(module)
            keep = torch.ones_like(weight, dtype=torch.bool) if pruned is None else ~pruned
            out[name] = keep.t() if pruned is not None and calibrate.is_conv1d(module) else keep
        return out

    def finalize(self) -> Masks:
        """Hard zeros in place, gradient hooks removed; returns the final keep masks."""
        self._check_open()
        self.apply()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._closed = True
        return self.masks

    # ------------------------------------------------------------------------------ internals
    def _attach(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self._pruned: dict[str, torch.Tensor | None] = {name: None for name in layers}
        self.step_count, self._closed = 0, False
        self.sparsity = 0.0  # the scheduled sparsity in force (from_pruned: the measured one)
        self._handles = [module.weight.register_hook(self._grad_hook(name)) for name, module in layers.items()]

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            pruned = self._pruned_on(name, grad.device)
            return grad if pruned is None else grad.masked_fill(pruned, 0)
        return hook

    def _pruned_on(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The pruned-mask on `device`: masks follow the model when it moves (model.to(...))."""
        pruned = self._pruned[name]
        if pruned is not None and pruned.device != device:
            pruned = self._pruned[name] = pruned.to(device)
        return pruned

    def _set_mask(self, name: str, keep: torch.Tensor | None) -> None:
        """Stores ~keep in the parameter's own layout (transposed back for Conv1D)."""
        if keep is None:
            self._pruned[name] = None
            return
        module = self.layers[name]
        pruned = ~keep.to(module.weight.device)
        self._pruned[name] = (pruned.t() if calibrate.is_conv1d(module) else pruned).contiguous()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MaskedTraining.finalize() was called; create a new MaskedTraining to train again")

    def __repr__(self) -> str:
        source = "fixed masks" if self.method is None else f"{self.method!r}, {self.schedule!r}"
        return f"MaskedTraining({source}, {len(self.layers)} layers, step {self.step_count})"


def _select(model: nn.Module, include, exclude, blocks) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    found = calibrate.find_blocks(model, blocks)
    layers = calibrate.select_layers(model, include, exclude, found[0] if found is not None else None)
    if not layers:
        raise calibrate.no_layers_error(model, include, exclude)
    return layers

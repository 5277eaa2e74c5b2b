"""Rewinding: put a pruned network's surviving weights back to an earlier state, keeping its mask.

    early = Snapshot(model)                    # at initialization (or Snapshot(model, step=k) during training)
    ... train, prune ...
    masks = Masks.from_model(model)
    rewind(model, early, masks)                # every parameter and buffer back to the snapshot, pruned ones 0
    reinitialize(model, masks, seed=0)         # or: fresh weights from the model's own initializer

Rewinding to initialization is the lottery-ticket experiment (Frankle & Carbin 2019); rewinding to an
early step k of training ("late rewinding", Frankle et al. 2020) is what makes it hold for larger
networks. Re-initializing with fresh random weights under the same mask is the usual control.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .masks import Masks

log = logging.getLogger("prunekit")


class Snapshot:
    """A copy of a model's state (parameters and buffers, by state_dict name) at one training step.

    device: where the copy is kept (default "cpu", so a GPU model's snapshot costs no GPU memory;
        None keeps each tensor on its own device).
    """

    def __init__(self, model: nn.Module, step: int = 0, *, device="cpu"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(step, int) and step >= 0):
            raise ValueError(f"step: expected a non-negative integer, got {step!r}")
        self.step = step
        self.state = {name: t.detach().to(t.device if device is None else device, copy=True)
                      for name, t in model.state_dict().items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Copies the snapshot back into `model` (the same architecture), in place."""
        state = model.state_dict()
        missing, extra = sorted(set(state) - set(self.state)), sorted(set(self.state) - set(state))
        if missing or extra:
            raise ValueError(f"the snapshot does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, target in state.items():
            saved = self.state[name]
            if saved.shape != target.shape:
                raise ValueError(f"snapshot tensor {name!r} is {tuple(saved.shape)} but the model's is "
                                 f"{tuple(target.shape)}")
            target.copy_(saved)

    def __repr__(self) -> str:
        return f"Snapshot(step {self.step}, {len(self.state)} tensors)"


def rewind(model: nn.Module, snapshot: Snapshot, masks=None) -> None:
    """Restores `snapshot` into `model`, then zeroes the weights `masks` prunes: the survivors get their
    snapshot values exactly, the pruned weights are exactly zero."""
    if not isinstance(snapshot, Snapshot):
        raise TypeError(f"snapshot: expected a prunekit Snapshot, got {type(snapshot).__name__}")
    if masks is not None:
        masks = Masks(masks)
        masks.check(model)  # before touching the weights
    snapshot.restore(model)
    if masks is not None:
        masks.apply(model)
    log.info("rewound to step %d%s", snapshot.step, "" if masks is None else f" under {masks!r}")


def _own_parameters(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False)]


@torch.no_grad()
def reinitialize(model: nn.Module, masks=None, *, seed: int | None = None) -> None:
    """Fresh weights from the model's own initializer, then `masks` applied.

    A Hugging Face model (one with `_init_weights`) is re-initialized module by module by it, as
    `from_config` would; otherwise every module by its own `reset_parameters()`, and parameters of
    modules without one are left as they are, with a warning naming them. seed: seeds torch's RNG for the draw
    (the caller's RNG state is restored afterwards); None draws from the current RNG.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if masks is not None:
        masks = Masks(masks)
        masks.check(model)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        hf_init = getattr(model, "_init_weights", None)
        hf = callable(hf_init) and hasattr(model, "config")
        missed = []
        for name, module in model.named_modules():
            if hf:
                own = list(module.parameters(recurse=False))
                flags = [getattr(p, "_is_hf_initialized", None) for p in own]
                for p in own:
                    p._is_hf_initialized = False  # transformers 5 skips parameters flagged as loaded
                hf_init(module)
                for p, flag in zip(own, flags):
                    if flag is None:
                        del p._is_hf_initialized
                    else:
                        p._is_hf_initialized = flag
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            elif _own_parameters(module):
                missed += [f"{name}.{p}" if name else p for p in _own_parameters(module)]
        if hf and callable(getattr(model, "tie_weights", None)):
            model.tie_weights()
    if missed:
        warnings.warn(f"reinitialize: {type(model).__name__} has no initializer for {len(missed)} parameter(s) "
                      f"(their module has no reset_parameters()); left as they were: "
                      f"{', '.join(missed[:8])}{', ...' if len(missed) > 8 else ''}", stacklevel=2)
    if masks is not None:
        masks.apply(model)
    log.info("re-initialized %s%s", type(model).__name__, "" if masks is None else f" under {masks!r}")

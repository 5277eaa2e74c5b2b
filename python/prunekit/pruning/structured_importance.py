"""Importance of structured groups (see structured_groups): one score per KV group / MLP channel of
each block, and the choice of the groups to keep.

- "l1": Σ|w| and "l2": sqrt(Σw²) over every weight a group owns;
- "taylor": Σ|w·∂L/∂w| with the gradient of the LM loss summed over the calibration batches;
- "activation": mean |input| of the group's o_proj / down_proj input columns over the calibration
  tokens, summed over the group.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate, data
from .._progress import show_progress
from .structured_groups import GroupKind

IMPORTANCES = ("l1", "l2", "taylor", "activation")


def _reshaped(weight: torch.Tensor, s, count: int) -> torch.Tensor:
    """The weight as [count, everything a group owns] (a view when possible)."""
    if s.dim == "out":
        return weight.reshape(count, -1)
    return weight.reshape(weight.shape[0], count, s.size).transpose(0, 1).reshape(count, -1)


def group_scores(weights: list[torch.Tensor], kind: GroupKind, importance: str,
                 grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Importance of each group of one block, from its slices' weights (nn.Linear layout):
    l1 = Σ|w|, l2 = sqrt(Σw²), taylor = Σ|w·∂L/∂w| over all weights the group owns."""
    total = torch.zeros(kind.count, dtype=torch.float64, device=weights[0].device)
    for j, (w, s) in enumerate(zip(weights, kind.slices)):
        w = w.detach().double()
        if importance == "l1":
            term = w.abs()
        elif importance == "l2":
            term = w.square()
        else:
            term = (w * grads[j].double()).abs()
        total += _reshaped(term, s, kind.count).sum(1)
    return total.sqrt() if importance == "l2" else total


def select_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` most important groups, ascending; ties prune the lowest index first."""
    order = torch.sort(scores, stable=True).indices
    return order[scores.numel() - keep:].sort().values


def importances(model, block_list, kinds: list[list[GroupKind]], importance: str, calibration, batch_size,
                progress=None) -> list[dict[str, torch.Tensor]]:
    """Per block {kind name: score per group}; `kinds[i]` are block i's group kinds."""
    grads = activations = None
    if importance in ("taylor", "activation"):
        if calibration is None:
            raise ValueError(f"importance={importance!r} needs calibration data (token ids or batches)")
        batches = data.as_batches(calibration, batch_size=batch_size, max_len=data.max_positions(model),
                                  vocab=data.vocab_size(model))
        batches = tqdm(batches, desc=f"prunekit {importance} importance", unit="batch",
                       disable=not show_progress(progress))
        if importance == "taylor":
            grads = loss_gradients(model, block_list, kinds, batches)
        else:
            activations = input_activations(model, block_list, kinds, batches)
    scores = []
    for index, block in enumerate(block_list):
        per_kind = {}
        for kind in kinds[index]:
            if activations is not None:
                mean_abs = activations[(index, kind.probe.path)]
                per_kind[kind.name] = mean_abs.reshape(kind.count, kind.probe.size).sum(1)
            else:
                weights = [calibrate.layer_weight(block.get_submodule(s.path)) for s in kind.slices]
                g = [grads[(index, s.path)] for s in kind.slices] if grads is not None else None
                per_kind[kind.name] = group_scores(weights, kind, importance, g)
        scores.append(per_kind)
    return scores


def _layers(block_list, kinds, probes_only: bool = False) -> dict[tuple[int, str], nn.Module]:
    out = {}
    for index, block in enumerate(block_list):
        for kind in kinds[index]:
            for s in ((kind.probe,) if probes_only else kind.slices):
                out[(index, s.path)] = block.get_submodule(s.path)
    return out


def loss_gradients(model, block_list, kinds, batches) -> dict[tuple[int, str], torch.Tensor]:
    """∂(LM loss)/∂W in nn.Linear layout, summed over the calibration batches, for every group layer.
    The caller's gradients, requires_grad flags and submodule training flags come back untouched."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"importance='taylor' needs the gradient of a language-modelling loss, and "
                         f"{type(model).__name__} has no LM head; use 'l1', 'l2' or 'activation'")
    layers = _layers(block_list, kinds)
    device = calibrate.model_device(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    sums = {key: torch.zeros(calibrate.layer_weight(m).shape, dtype=torch.float32, device=device)
            for key, m in layers.items()}
    with calibrate.kept_modes(model, train=False):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for m in layers.values():
                m.weight.requires_grad_(True)
                m.weight.grad = None
            with torch.enable_grad():
                for batch in batches:
                    batch = calibrate.to_device(batch, device)
                    if "labels" not in batch:
                        if "input_ids" not in batch:
                            raise ValueError("importance='taylor': a calibration batch has neither labels "
                                             "nor input_ids to use as labels")
                        batch["labels"] = batch["input_ids"]
                    out = model(**batch, **calibrate.forward_kwargs(model))
                    loss = out.loss if hasattr(out, "loss") else out[0]
                    loss.backward()
                    for key, m in layers.items():
                        if m.weight.grad is not None:
                            g = m.weight.grad.t() if calibrate.is_conv1d(m) else m.weight.grad
                            sums[key] += g.float()
                            m.weight.grad = None
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = grads[p]
    return sums


def input_activations(model, block_list, kinds, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Mean |x| per input feature of each probe layer (o_proj, down_proj) over calibration tokens."""
    probes = _layers(block_list, kinds, probes_only=True)
    device = calibrate.model_device(model)
    sums = {key: torch.zeros(calibrate.in_features(m), dtype=torch.float64, device=device)
            for key, m in probes.items()}
    tokens = {key: 0 for key in probes}

    def hook(key):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, sums[key].numel())
            sums[key] += x.abs().sum(0, dtype=torch.float64)
            tokens[key] += x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(key)) for key, m in probes.items()]
    try:
        with torch.no_grad(), calibrate.kept_modes(model, train=False):
            for batch in batches:
                model(**calibrate.to_device(batch, device), **calibrate.forward_kwargs(model))
    finally:
        for h in handles:
            h.remove()
    return {key: sums[key] / max(tokens[key], 1) for key in probes}

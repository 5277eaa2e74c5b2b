"""Checks prunekit.prune makes before it changes anything: a run that cannot finish must fail while the
model is still untouched, naming the layer and what was expected.

- every targeted weight: a floating-point, finite tensor whose width fits the method (N:M divisibility,
  the quantization group size, ...); all problems are reported together;
- empty layers (a zero in the weight's shape) are left out, with a warning;
- a weight shared with another parameter (an LM head tied to the input embeddings) is refused: pruning
  it would silently prune the other one too;
- a layer whose weight its parent uses without calling the layer (nn.MultiheadAttention reads
  out_proj.weight directly) is refused for methods that need calibration statistics: its hooks would
  see no input, and a method would prune it blind;
- weights inside the blocks that are not linear layers (MoE models' fused 3-D expert tensors, routers
  stored as bare parameters) are listed as not pruned, with a warning.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import calibrate
from .pruning.base import PruningMethod


def split_empty(targets: dict[str, nn.Module]) -> tuple[dict[str, nn.Module], list[dict]]:
    """(the layers with weights to prune, the empty ones as skipped entries)."""
    kept, skipped = {}, []
    for name, module in targets.items():
        shape = tuple(calibrate.layer_weight(module).shape)
        if 0 in shape:
            skipped.append({"name": name, "shape": list(shape),
                            "reason": f"empty weight {list(shape)} [out_features, in_features]: nothing to prune"})
        else:
            kept[name] = module
    if skipped:
        warnings.warn("prunekit.prune: skipped empty layer(s) " + ", ".join(
            f"{s['name']} {s['shape']}" for s in skipped), stacklevel=3)
    if not kept:
        raise ValueError("every selected layer is empty (a zero in its weight's shape): "
                         + ", ".join(f"{s['name']} {s['shape']}" for s in skipped))
    return kept, skipped


def check_weights(method: PruningMethod, targets: dict[str, nn.Module]) -> None:
    """Runs the method's per-weight checks on every targeted layer; raises one error listing all failures."""
    problems = []
    for name, module in targets.items():
        try:
            method.check_weight(calibrate.layer_weight(module).detach(), name)
        except (TypeError, ValueError) as error:
            problems.append(str(error))
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ValueError(f"{method!r}: {len(problems)} targeted layer(s) cannot be pruned; nothing was "
                         "changed:\n  " + "\n  ".join(shown))


def _storage(t: torch.Tensor):
    """What identifies the exact memory a tensor views (None on the meta device)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride()) if ptr else None


def check_tied(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Refuses a targeted weight that is also another parameter (tied LM head and input embeddings)."""
    by_tensor: dict[int, list[str]] = {}
    by_storage: dict[tuple, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(pname)
        key = _storage(p)
        if key is not None:
            by_storage.setdefault(key, []).append(pname)
    for name, module in targets.items():
        weight = module.weight
        own = f"{name}.weight"
        others = set(by_tensor.get(id(weight), []))
        key = _storage(weight)
        if key is not None:
            others.update(by_storage.get(key, []))
        others.discard(own)
        if others:
            shown = ", ".join(sorted(others))
            raise ValueError(
                f"{own} is tied to {shown} (they share one tensor): pruning it would also prune "
                f"{shown}. Untie it first (e.g. module.weight = torch.nn.Parameter(module.weight.detach()"
                ".clone()), and set config.tie_word_embeddings = False for a Hugging Face model) or leave "
                f"{name} out of include")


def check_called(model: nn.Module, targets: dict[str, nn.Module], run_first: Callable[[], object]) -> None:
    """Runs the first calibration batch through the model and refuses every targeted layer whose parent
    ran without calling it: its weight is used functionally and its hooks can see no input."""
    modules = dict(model.named_modules())
    parents = {}
    for name in targets:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent and parent in modules:
            parents[name] = parent
    called: set[str] = set()

    def mark(name):
        def hook(module, args):
            called.add(name)
        return hook

    handles = [m.register_forward_pre_hook(mark(name)) for name, m in targets.items()]
    handles += [modules[p].register_forward_pre_hook(mark("parent:" + p)) for p in set(parents.values())]
    try:
        run_first()
    finally:
        for h in handles:
            h.remove()
    blind = [name for name, parent in parents.items() if name not in called and "parent:" + parent in called]
    if blind:
        kinds = sorted({type(modules[parents[n]]).__name__ for n in blind})
        raise ValueError(
            f"{len(blind)} targeted layer(s) are never called by their parent module ({', '.join(kinds)}), "
            f"which uses their weight directly: {', '.join(blind[:6])}{', ...' if len(blind) > 6 else ''}. "
            "No calibration input reaches them, so Wanda/SparseGPT cannot prune them (e.g. "
            "nn.MultiheadAttention reads out_proj.weight without calling out_proj). Nothing was changed; "
            "leave them out (exclude=['*.out_proj']) or prune them with prunekit.Magnitude")


def unpruned_block_weights(block_path: str | None, block_list: nn.Module | None,
                           targets: dict[str, nn.Module]) -> list[dict]:
    """Weights (2-D or more) inside the blocks that no linear layer owns, so prunekit does not prune
    them: MoE models' fused expert tensors [experts, out, in], routers stored as bare parameters."""
    if block_list is None:
        return []
    skipped = []
    for mname, module in block_list.named_modules():
        if calibrate.is_prunable(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p is None or p.dim() < 2:
                continue
            full = ".".join(x for x in (block_path, mname, pname) if x)
            if p.dim() == 3:
                reason = (f"fused per-expert weights {list(p.shape)} of {type(module).__name__} (MoE): "
                          "not an nn.Linear, not pruned")
            else:
                reason = f"{p.dim()}-D parameter of {type(module).__name__} (not an nn.Linear/Conv1D): not pruned"
            skipped.append({"name": full, "shape": list(p.shape), "reason": reason})
    if skipped:
        kinds = sorted({re.sub(r"\.\d+\.", ".*.", s["name"], count=1) for s in skipped})
        numel = sum(math.prod(s["shape"]) for s in skipped)
        warnings.warn(f"prunekit.prune: {len(skipped)} weight tensor(s) inside the blocks are not linear "
                      f"layers and stay dense ({numel} weights: {', '.join(kinds[:6])}"
                      f"{', ...' if len(kinds) > 6 else ''}); see report.skipped", stacklevel=3)
    return skipped

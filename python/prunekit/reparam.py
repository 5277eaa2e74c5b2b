"""Weights that are not plain parameters: torch.nn.utils.prune's reparametrization and parametrize.

torch.nn.utils.prune keeps `weight_orig` and `weight_mask` and recomputes `.weight` (their product) in
a forward pre-hook, so anything written into `.weight` is overwritten at the next forward. prunekit
prunes the effective weight: before it changes anything it folds the reparametrization into a plain
`weight` parameter (torch's own `prune.remove`, which keeps torch's zeros), with a warning naming the
layers. A `torch.nn.utils.parametrize` parametrization cannot be folded without changing what the
model computes, so such a layer is refused.
"""
from __future__ import annotations

import logging
import warnings

from torch import nn
from torch.nn.utils import parametrize, prune as torch_prune

log = logging.getLogger("prunekit")


def torch_pruned(module: nn.Module, attr: str = "weight") -> bool:
    """Whether `module.<attr>` is derived by a torch.nn.utils.prune forward pre-hook."""
    return any(isinstance(hook, torch_prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == attr
               for hook in module._forward_pre_hooks.values())


_ADAPTER_PARTS = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def check_plain_weights(modules: dict[str, nn.Module], caller: str) -> None:
    """Refuses a layer whose weight is a torch.nn.utils.parametrize parametrization, or that belongs to a
    peft LoRA adapter (its owner computes W + s·B·A, so neither W nor an adapter matrix is the weight the
    model uses), before any change."""
    adapter = [name for name in modules if set(name.split(".")) & set(_ADAPTER_PARTS)]
    if adapter:
        owner = next(part for part in adapter[0].split(".") if part in _ADAPTER_PARTS)
        raise ValueError(f"{caller}: {adapter[0]} (and {len(adapter) - 1} more layers) belong to peft LoRA "
                         f"adapters: the layer {adapter[0].partition('.' + owner)[0]} computes W + s·B·A, so "
                         f"pruning its base weight or the adapter matrices would not prune what the model "
                         f"computes. Merge first (peft_model.merge_and_unload()) and prune the merged model, or "
                         f"prune before adding adapters (prunekit.recover_lora adds them to a pruned model and "
                         f"merges keeping the zeros)")
    for name, module in modules.items():
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{caller}: {name}.weight is a torch.nn.utils.parametrize parametrization; "
                             f"prunekit would write into a derived tensor. Remove it first: "
                             f"torch.nn.utils.parametrize.remove_parametrizations({name}, 'weight')")


def fold_torch_prune(modules: dict[str, nn.Module], caller: str) -> list[str]:
    """Makes torch.nn.utils.prune's masks permanent (`prune.remove`) on these layers (weight and bias),
    so that `.weight` is a plain parameter equal to the effective weight; warns naming them. Returns the
    folded layer names. The model computes exactly what it did before."""
    folded = []
    for name, module in modules.items():
        done = False
        for attr in ("weight", "bias"):
            if torch_pruned(module, attr):
                torch_prune.remove(module, attr)
                done = True
        if done:
            folded.append(name)
    if folded:
        shown = ", ".join(folded[:6]) + (f", ... ({len(folded)} layers)" if len(folded) > 6 else "")
        message = (f"{caller}: folded torch.nn.utils.prune's reparametrization (weight_orig * weight_mask) "
                   f"into a plain weight on {shown}; prunekit prunes that effective weight (torch's zeros "
                   f"stay zero) and torch's masks no longer apply")
        warnings.warn(message, stacklevel=3)
        log.info(message)
    return folded


def plain_weights(modules: dict[str, nn.Module], caller: str) -> list[str]:
    """Refuses parametrize'd weights, then folds torch.nn.utils.prune's reparametrization (see above).
    Call it after every other check and before the first change to the model."""
    check_plain_weights(modules, caller)
    return fold_torch_prune(modules, caller)

"""Finding what to prune in a model, and feeding it calibration data one block at a time.

The references (SparseGPT, Wanda) run the model up to its first transformer block, keep the block's
inputs, and from then on drive the blocks themselves: block i sees the outputs of the already pruned
blocks before it. Here the first block's inputs are captured with a forward pre-hook (with kwargs, so
attention masks, position ids and rotary embeddings come along) that stops the forward with a sentinel
exception; the block list is found in the model rather than named per architecture.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import patterns as _patterns

log = logging.getLogger("prunekit")


# ----------------------------------------------------------------------------------------- layers
def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear layout [out_features, in_features] (a view, transposed for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_layer_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Writes a weight given in [out_features, in_features] layout into the module, in place."""
    layer_weight(module).data.copy_(weight)


def in_features(module: nn.Module) -> int:
    return layer_weight(module).shape[1]


# ----------------------------------------------------------------------------------------- blocks
def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children()) if isinstance(module, (nn.ModuleList, nn.Sequential)) else []
    if not children or len({type(c) for c in children}) != 1:
        return False
    return any(is_prunable(m) for m in children[0].modules())


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList] | None:
    """The model's list of repeated blocks, as (dotted path, module list), or None when it has none.

    With `blocks` given (e.g. "model.layers") that list is used; otherwise the largest ModuleList whose
    children are all of one type and contain linear layers (model.layers, transformer.h,
    encoder.layer, ...).
    """
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks={blocks!r}: the model has no submodule of that name; candidates: "
                             f"{_block_candidates(model) or 'none'}") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(f"blocks={blocks!r}: expected a non-empty nn.ModuleList of blocks, "
                             f"got {type(found).__name__}")
        return blocks, found
    candidates = [(name, m) for name, m in model.named_modules() if name and _is_block_list(m)]
    if not candidates:
        return None
    return max(candidates, key=lambda c: _n_params(c[1]))


def _block_candidates(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and _is_block_list(m)]


def _matches(name: str, patterns) -> bool:
    return any(_patterns.name_matches(name, p) for p in patterns)


def _as_patterns(value, what: str) -> list[str]:
    return _patterns.as_name_patterns(value, what)


def select_layers(model: nn.Module, include=None, exclude=None, block_path: str | None = None
                  ) -> dict[str, nn.Module]:
    """The linear layers to prune, by qualified name.

    By default: every nn.Linear / Conv1D inside the block list (or anywhere, for a model without
    blocks) except the output embeddings (LM head). `include` / `exclude` are layer-name patterns
    (shell globs; a regular expression only with a `re:` prefix — see prunekit.patterns); `include` replaces the default
    selection, `exclude` removes from it.
    """
    include_p, exclude_p = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = block_path + "." if block_path else ""
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_prunable(module):
            continue
        if include_p:
            take = _matches(name, include_p)
        else:
            take = name.startswith(prefix) and module is not head
        if take and not _matches(name, exclude_p):
            chosen[name] = module
    return chosen


def no_layers_error(model: nn.Module, include, exclude) -> ValueError:
    names = [n for n, m in model.named_modules() if is_prunable(m)]
    if not names:
        return ValueError(f"{type(model).__name__} has no nn.Linear (or Conv1D) layers to prune")
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return ValueError(f"no linear layer matched include={include!r} exclude={exclude!r}; "
                      f"the model's linear layers are: {shown}")


# ------------------------------------------------------------------------------------ devices
def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def move_outside_blocks(model: nn.Module, block_list: nn.Module, device: torch.device) -> None:
    """Moves every parameter and buffer that does not belong to a block (embeddings, final norm,
    rotary tables, head) to `device`, leaving the blocks where they are."""
    inside = {id(m) for m in block_list.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module._parameters.values():
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)


class OffloadHooks:
    """While active, each block is moved to `device` just before it runs and back to `home` after:
    a whole-model forward with only one block on the accelerator at a time."""

    def __init__(self, block_list: nn.Module, device: torch.device, home: torch.device):
        self.block_list, self.device, self.home = block_list, device, home
        self.handles = []

    def __enter__(self):
        def arrive(module, args):
            module.to(self.device)

        def leave(module, args, output):
            module.to(self.home)

        for block in self.block_list:
            self.handles.append(block.register_forward_pre_hook(arrive))
            self.handles.append(block.register_forward_hook(leave))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ------------------------------------------------------------------------------------- inputs
class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


@dataclass
class BlockInput:
    """What one calibration batch hands a block: hidden states plus every other argument."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    hidden_key: str | None = None  # set when the model passes the hidden states by keyword

    def call(self, block: nn.Module) -> torch.Tensor:
        if self.hidden_key is None:
            out = block(self.hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, **{**self.kwargs, self.hidden_key: self.hidden})
        return out if isinstance(out, torch.Tensor) else out[0]


def forward_kwargs(model: nn.Module) -> dict:
    """Extra arguments for calibration forwards: no KV cache, no extra outputs."""
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict],
                         device: torch.device) -> list[BlockInput]:
    """Runs each batch through the model until `first_block` is called and keeps its arguments."""
    captured: list[BlockInput] = []

    def grab(module, args, kwargs):
        if args:
            captured.append(BlockInput(args[0], tuple(args[1:]), dict(kwargs)))
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states")
            captured.append(BlockInput(hidden, (), kwargs, hidden_key="hidden_states"))
        else:
            raise RuntimeError(f"{type(module).__name__} was called without hidden states "
                               f"(no positional argument, kwargs {sorted(kwargs)})")
        raise _StopForward

    extra = forward_kwargs(model)
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**to_device(batch, device), **extra)
            except _StopForward:
                continue
            raise RuntimeError(f"the model's forward never called its first block "
                               f"({type(first_block).__name__}); name the block list with blocks=...")
    finally:
        handle.remove()
    return captured


def warn_if_layer_types_differ(model: nn.Module) -> None:
    """The first block's arguments are reused for every block, as in the references; models that
    give blocks different masks (sliding-window layers mixed with full attention) need a warning."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if types and len(set(types)) > 1:
        log.warning("the model mixes block types %s; calibration reuses the first block's attention "
                    "mask for every block, so statistics of the other type are approximate",
                    sorted(set(types)))

"""Finding what to prune in a model, and feeding it calibration data one block at a time.

The references (SparseGPT, Wanda) run the model up to its first transformer block, keep the block's
inputs, and from then on drive the blocks themselves: block i sees the outputs of the already pruned
blocks before it. Here the first block's inputs are captured with a forward pre-hook (with kwargs, so
attention masks, position ids and rotary embeddings come along) that stops the forward with a sentinel
exception; the block list is found in the model rather than named per architecture.
"""
from __future__ import annotations

import contextlib
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


def select_layers(model: nn.Module, include=None, exclude=None, block_path: str | None = None
                  ) -> dict[str, nn.Module]:
    """The linear layers to prune, by qualified name.

    By default: every nn.Linear / Conv1D inside the block list (or anywhere, for a model without
    blocks) except the output embeddings (LM head). `include` / `exclude` are layer-name patterns
    (shell globs; a regular expression only with a `re:` prefix — see prunekit.patterns); `include` replaces the default
    selection, `exclude` removes from it.
    """
    include_p = _patterns.as_name_patterns(include, "include")
    exclude_p = _patterns.as_name_patterns(exclude, "exclude")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = block_path + "." if block_path else ""
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_prunable(module):
            continue
        if _patterns.selected(name, include_p, exclude_p, name.startswith(prefix) and module is not head):
            chosen[name] = module
    return chosen


def no_layers_error(model: nn.Module, include, exclude) -> ValueError:
    names = [n for n, m in model.named_modules() if is_prunable(m)]
    if not names:
        return ValueError(f"{type(model).__name__} has no nn.Linear (or Conv1D) layers to prune")
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return ValueError(f"no linear layer matched include={include!r} exclude={exclude!r}; "
                      f"the model's linear layers are: {shown}")


# ------------------------------------------------------------------------------------- modes
@contextlib.contextmanager
def kept_modes(model: nn.Module, train: bool = False):
    """model.train(train) inside; on exit every submodule gets back its own training flag (a submodule
    kept in eval mode by its owner stays in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


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
    """Raised by the capture hook to end the model's forward once the blocks' inputs are caught."""


# Block arguments that carry a KV cache: never kept (a live cache grows on every call of the block, so a
# re-run would attend to stale keys/values, and it would hold every batch's keys and values).
CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past", "cache_params")


def _is_cache(value) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(value).__mro__)


def _without_cache(kwargs: dict) -> dict:
    kwargs = {k: (None if (k in CACHE_KWARGS or _is_cache(v)) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


@dataclass
class BlockInput:
    """What one calibration batch hands a block: hidden states plus every other argument. Models whose
    blocks get different arguments (sliding-window and full-attention layers) carry them per block
    index in `per_block`."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    hidden_key: str | None = None  # set when the model passes the hidden states by keyword
    per_block: dict[int, tuple[tuple, dict]] | None = None

    def call(self, block: nn.Module, index: int = 0) -> torch.Tensor:
        args, kwargs = self.args, self.kwargs
        if self.per_block is not None:
            args, kwargs = self.per_block[index]
        if self.hidden_key is None:
            out = block(self.hidden, *args, **kwargs)
        else:
            out = block(*args, **{**kwargs, self.hidden_key: self.hidden})
        return out if isinstance(out, torch.Tensor) else out[0]

    @property
    def tokens_per_sample(self) -> int | None:
        """The sequence length of this batch (hidden [batch, seq, features]), or None."""
        return self.hidden.shape[1] if self.hidden.dim() == 3 else None


def _has_hf_config(model: nn.Module) -> bool:
    return any(hasattr(getattr(m, "config", None), "use_cache") for m in model.modules())


def forward_kwargs(model: nn.Module) -> dict:
    """Extra arguments for calibration forwards: no KV cache. Passed when the forward names `use_cache`,
    or takes **kwargs and wraps a Hugging Face model (a PEFT model, a LoRA wrapper)."""
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        return {"use_cache": False}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and _has_hf_config(model):
        return {"use_cache": False}
    return {}


@contextlib.contextmanager
def calibration_mode(model: nn.Module):
    """While calibrating: every config inside the model says use_cache=False (however the model is
    wrapped), and PyTorch's fused nn.MultiheadAttention / TransformerEncoderLayer fast path is off, so
    the layers' own forwards run and their hooks see inputs."""
    saved = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "use_cache") and config.use_cache:
            saved.append(config)
            config.use_cache = False
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None and hasattr(mha, "get_fastpath_enabled") else None
    if fast:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        for config in saved:
            config.use_cache = True
        if fast:
            mha.set_fastpath_enabled(True)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def layer_types(model: nn.Module, block_list: nn.Module | None = None) -> list[str]:
    """The distinct block types of a model that mixes them (Gemma2/3 and ModernBERT sliding-window and
    full-attention layers), from `layer_types` of any config inside it (a multimodal model's text
    config too) or the blocks' `attention_type`; empty when every block is alike."""
    found: set[str] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        configs = [config]
        for attr in ("text_config", "decoder"):
            configs.append(getattr(config, attr, None))
        if config is not None and hasattr(config, "get_text_config"):
            try:
                configs.append(config.get_text_config())
            except Exception:  # noqa: BLE001 - a config without a text part
                pass
        for c in configs:
            types = getattr(c, "layer_types", None)
            if isinstance(types, (list, tuple)) and len(set(types)) > 1:
                found.update(map(str, types))
    if block_list is not None:
        kinds = {getattr(b, "attention_type", None) for b in block_list}
        if len(kinds) > 1:
            found.update(str(k) for k in kinds)
    return sorted(found)


def capture_block_inputs(model: nn.Module, block_list: nn.Module, batches: list[dict],
                         device: torch.device, last: int | None = None) -> list[BlockInput]:
    """Runs each batch through the model until the first block is called and keeps its arguments.

    For a model whose blocks are of several types (see `layer_types`) the arguments of every block up
    to `last` (default: all) are kept too, from a forward that runs up to block `last`: a
    sliding-window block and a full-attention block get different masks and rotary tables.
    """
    blocks = list(block_list)
    last = len(blocks) - 1 if last is None else last
    per_block = bool(layer_types(model, block_list)) and last > 0
    captured: list[BlockInput] = []

    def grab(index):
        def hook(module, args, kwargs):
            if args:
                hidden, rest, key = args[0], tuple(args[1:]), None
                kwargs = _without_cache(kwargs)
            elif "hidden_states" in kwargs:
                kwargs = _without_cache(kwargs)
                hidden, rest, key = kwargs.pop("hidden_states"), (), "hidden_states"
            else:
                raise RuntimeError(f"{type(module).__name__} was called without hidden states "
                                   f"(no positional argument, kwargs {sorted(kwargs)})")
            if index == 0:
                captured.append(BlockInput(hidden, rest, kwargs, hidden_key=key,
                                           per_block={} if per_block else None))
            if per_block:
                captured[-1].per_block[index] = (rest, kwargs)
            if index == last or not per_block:
                raise _StopForward
        return hook

    extra = forward_kwargs(model)
    watched = blocks[:last + 1] if per_block else blocks[:1]
    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(watched)]
    try:
        for batch in batches:
            try:
                model(**to_device(batch, device), **extra)
            except _StopForward:
                continue
            raise RuntimeError(f"the model's forward never called its first block "
                               f"({type(blocks[0]).__name__}); name the block list with blocks=...")
    finally:
        for h in handles:
            h.remove()
    return captured

"""sparsify(model): swap every exactly-2:4 nn.Linear for SparseLinear, in place, and say why the others stayed."""
from __future__ import annotations

import functools
import logging
import warnings
from collections import Counter
from types import SimpleNamespace
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import patterns as name_patterns
from .sparse_linear import SparseLinear
from .unstructured_linear import UnstructuredSparseLinear

log = logging.getLogger("prunekit")
_PACKABLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class SwapReport:
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason

    def __str__(self) -> str:
        lines = [f"sparsify: {len(self.swapped)} layer(s) swapped to SparseLinear / UnstructuredSparseLinear, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  swapped  {name}" for name in self.swapped]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _matches(name: str, patterns) -> bool:
    return name_patterns.matches_any(name, patterns)


def _is_conv1d(module: nn.Module) -> bool:
    from ..calibrate import is_conv1d

    return is_conv1d(module)


def _linear_view(module: nn.Module):
    """The layer as nn.Linear sees it: transformers' Conv1D (GPT-2) stores its weight [in, out] and
    computes x @ W + b, which is nn.Linear with the transposed weight."""
    if _is_conv1d(module):
        return SimpleNamespace(weight=module.weight.t(), bias=module.bias, in_features=module.weight.shape[0])
    return module


def _skip_reason(name: str, module: nn.Module, include, exclude, shared: Counter) -> str | None:
    if include is not None and not _matches(name, include):
        return "not matched by include"
    if exclude is not None and _matches(name, exclude):
        return "matched by exclude"
    if parametrize.is_parametrized(module, "weight"):
        return ("weight is a torch.nn.utils.parametrize parametrization; remove it first "
                "(parametrize.remove_parametrizations) to swap the layer")
    if type(module) is not nn.Linear and not _is_conv1d(module):
        return (f"{type(module).__name__} is a subclass of nn.Linear; only plain nn.Linear and "
                f"transformers' Conv1D are swapped")
    weight = module.weight
    if weight.dtype not in _PACKABLE:
        return f"dtype {weight.dtype} (2:4 format supports float32/float16/bfloat16)"
    if weight.device.type == "meta":
        return "weight is on the meta device"
    in_features = _linear_view(module).in_features
    if in_features % 8 != 0:
        return f"in_features {in_features} is not divisible by 8"
    if shared[id(weight)] > 1:
        return "weight is shared with another module (tied); swapping would untie it"
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _unstructured(module: nn.Module, name: str, min_sparsity: float) -> tuple[nn.Module | None, str]:
    if type(module) is not nn.Linear:
        return None, "the unstructured format takes plain nn.Linear only"
    weight = module.weight.detach()
    sparsity = 1.0 - float((weight != 0).sum()) / max(1, weight.numel())
    if sparsity < min_sparsity:
        return None, f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
    return UnstructuredSparseLinear.from_dense(module, name=name), ""


def sparsify(model: nn.Module, *, include=None, exclude=None, unstructured: bool = False,
             min_sparsity: float = 0.6, serve_m: int | None = None) -> SwapReport:
    """Swap each nn.Linear whose weight is exactly 2:4 (per row, at most 2 nonzeros in every 4 consecutive
    inputs) for SparseLinear; transformers' Conv1D layers (GPT-2) too, their [in, out] weight read as
    nn.Linear's [out, in]. A layer carrying torch.nn.utils.prune's reparametrization is packed from its
    effective weight (weight_orig * weight_mask) and its hook goes with the replaced module.
    include/exclude: layer-name patterns (a string or a list; shell globs, `re:` for a regular
    expression — see prunekit.patterns).
    unstructured=True: a plain nn.Linear that is not 2:4 but has at least `min_sparsity` zeros becomes an
    UnstructuredSparseLinear (bitmask format, for 70-90% Wanda/SparseGPT models; on CPU it runs its sparse
    kernel where that beats dense and otherwise turns dense, nn/cpu_route.py).
    serve_m: on the CPU, the tokens per call this model mostly runs (an encoder's batch x sequence length, the
    batch of decoding): each swapped layer keeps the form (packed or dense) that wins at that M. Default: the
    decode bucket, PRUNEKIT_SPARSE_CPU_DECODE_M or 1."""
    if serve_m is not None and (isinstance(serve_m, bool) or not isinstance(serve_m, int) or serve_m < 1):
        raise ValueError(f"sparsify: serve_m must be a positive integer (tokens per call), got {serve_m!r}")
    report = SwapReport()
    shared = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
    for name, module in linears:
        why = _skip_reason(name, module, include, exclude, shared)
        if why is None:
            try:
                sparse = SparseLinear.from_dense(_linear_view(module), name=name)
                sparse.stored_transposed = _is_conv1d(module)
            except ValueError as exc:
                why = "not 2:4: " + str(exc).split("is not 2:4 sparse: ", 1)[-1]
                if unstructured:
                    sparse, low = _unstructured(module, name, min_sparsity)
                    why = None if sparse is not None else f"{why}; {low}"
        if why is not None:
            report.skipped[name] = why
            continue
        if serve_m is not None:
            sparse.serve_m = serve_m
        _set_submodule(model, name, sparse)
        report.swapped.append(name)
    if report.swapped:
        _guard_save_pretrained(model)
    log.info("sparsify: swapped %d layer(s), skipped %d", len(report.swapped), len(report.skipped))
    return report


# ------------------------------------------------------------------------- save_pretrained
def dense_state_dict(model: nn.Module) -> dict:
    """The model's state_dict with each SparseLinear written as a dense `weight` (+ `bias`), the layout
    transformers' from_pretrained reads into nn.Linear (or Conv1D: [in, out], for layers swapped from one)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, UnstructuredSparseLinear)):
            prefix = f"{name}." if name else ""
            for key in module.state_dict():
                if key != "bias":
                    state.pop(prefix + key, None)
            dense = module.weight
            state[prefix + "weight"] = dense.t().contiguous() if getattr(module, "stored_transposed", False) else dense
    return state


def _save_pretrained_dense(model: nn.Module, *args, **kwargs):
    if kwargs.get("state_dict") is None and any(isinstance(m, (SparseLinear, UnstructuredSparseLinear))
                                                for m in model.modules()):
        kwargs["state_dict"] = dense_state_dict(model)
        warnings.warn("save_pretrained on a sparsified model: its SparseLinear layers are written as dense "
                      "weights (the 2:4 zeros kept) so that from_pretrained reloads the same model as "
                      "nn.Linear; call prunekit.sparsify again after loading, or keep them packed with "
                      "prunekit.save / prunekit.load", stacklevel=2)
    return type(model).save_pretrained(model, *args, **kwargs)


def _guard_save_pretrained(model: nn.Module) -> None:
    """transformers' save_pretrained would write SparseLinear's packed tensors, which from_pretrained
    ignores (it then initializes those weights at random); this instance's save_pretrained writes them
    dense instead."""
    if getattr(type(model), "save_pretrained", None) is None or "save_pretrained" in model.__dict__:
        return
    model.save_pretrained = functools.partial(_save_pretrained_dense, model)

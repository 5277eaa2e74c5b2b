"""Copies derived from a packed 2:4 weight (the sm90 compressed form, the unpacked dense form), kept next to
the weight so that a forward does not rebuild them.

An entry is keyed weakly by the `values` tensor object (a SparseLinear's parameter), so it is freed with the
weight. It is stale, and rebuilt on the next use, once values or meta change in place (version counters),
move (device, dtype, shape, data pointer), or meta is replaced by another tensor (held by a weak reference:
a replaced meta that was freed makes the entry stale even if the allocator gives its memory to the new one).
Inference tensors (weights made under `torch.inference_mode()`) have no version counter: they are keyed
on their storage (device, dtype, shape, data pointer) plus a version this module owns, which the weight's
owner bumps with `mark_changed(values)` after changing it in place (an in-place change inside
inference_mode is invisible to torch). They are cached like any other weight, not rebuilt per call.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class _Entry:
    derived: Any
    source: tuple
    meta: weakref.ref


_owned_versions = WeakIdKeyDictionary()  # tensor -> version bumped by mark_changed (inference tensors)


def mark_changed(*tensors: torch.Tensor) -> None:
    """Tells every cache that these tensors were changed in place (needed for inference tensors, whose
    in-place changes torch does not count; harmless for others)."""
    for t in tensors:
        _owned_versions[t] = _owned_versions.get(t, 0) + 1


def _version(t: torch.Tensor) -> tuple:
    owned = _owned_versions.get(t, 0)
    return (owned,) if t.is_inference() else (owned, t._version)


def _source(values: torch.Tensor, meta: torch.Tensor) -> tuple:
    return (values.device, values.dtype, tuple(values.shape), values.data_ptr(), _version(values),
            tuple(meta.shape), meta.data_ptr(), _version(meta))


def cacheable(values: torch.Tensor, meta: torch.Tensor) -> bool:
    """Every weight is: inference tensors are keyed on storage + the version mark_changed bumps."""
    return True


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (nothing may be built then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class DerivedWeights:
    """{values tensor: a copy derived from (values, meta)}, valid while the weight is unchanged."""

    def __init__(self) -> None:
        self._entries = WeakIdKeyDictionary()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, values: torch.Tensor, meta: torch.Tensor) -> Any | None:
        """The cached copy when it is still valid for (values, meta), else None."""
        entry = self._entries.get(values)
        if entry is None or entry.meta() is not meta or entry.source != _source(values, meta):
            return None
        return entry.derived

    def get_or_build(self, values: torch.Tensor, meta: torch.Tensor,
                     build: Callable[[torch.Tensor, torch.Tensor], Any]) -> Any:
        found = self.lookup(values, meta) if cacheable(values, meta) else None
        if found is not None:
            return found
        # a plain tensor even under inference_mode, and no autograd history that would keep values alive
        with torch.inference_mode(False), torch.no_grad():
            derived = build(values, meta)
        if cacheable(values, meta):
            self._entries[values] = _Entry(derived, _source(values, meta), weakref.ref(meta))
        return derived

    def forget(self, values: torch.Tensor) -> None:
        self._entries.pop(values, None)

    def clear(self) -> None:
        self._entries.clear()

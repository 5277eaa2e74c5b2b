"""Shared plumbing for the custom ops: which fast path serves a tensor, and what to say when none does."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from .. import _native


def reference_allowed() -> bool:
    """PRUNEKIT_ALLOW_REFERENCE=1 lets CUDA tensors run the plain PyTorch reference when no CUDA
    build is present. Off by default: a silently slow path is a bug report waiting to happen."""
    return os.environ.get("PRUNEKIT_ALLOW_REFERENCE", "") == "1"


def cuda_module_or_none(op: str):
    """The CUDA module for `op`, None when the user opted into the reference, else a diagnosis."""
    mod = _native.cuda_module()
    if mod is not None:
        return mod
    if reference_allowed():
        return None
    raise RuntimeError(f"prunekit::{op} got CUDA tensors but prunekit._C_cuda is not available "
                       f"({_native._errors.get('_C_cuda', 'not loaded')}). Rebuild with nvcc present "
                       "(PRUNEKIT_CUDA=ON pip install .) or set PRUNEKIT_ALLOW_REFERENCE=1 to run the "
                       "PyTorch reference.")


def triton_runs_on(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "") == "1"


def contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


@functools.lru_cache(maxsize=None)
def device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_guard(device: torch.device):
    """Makes `device` current for a launch (kernels launch on the current device), entered only when it is
    not current already (torch.cuda.device costs a few microseconds on the eager path)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


_workspaces: dict[tuple, torch.Tensor] = {}


def workspace(device: torch.device, stream: int, nbytes: int) -> torch.Tensor:
    """Kernel scratch (uint8) kept per (device, stream) and grown on demand, so an eager call allocates no
    workspace: calls on one stream run in order, so reusing it is safe. A CUDA graph capture gets its own
    (from the graph's memory pool), since a graph replays long after this buffer may have moved on."""
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(max(nbytes, 16), dtype=torch.uint8, device=device)
    key = (device, stream)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = _workspaces[key] = torch.empty(max(nbytes, 1 << 18), dtype=torch.uint8, device=device)
    return buf


def clear_workspaces() -> None:
    _workspaces.clear()

"""Device guard for Triton launches: a Triton kernel launches on the *current* CUDA device and its current
stream, not on its arguments' device. Every launcher in this package wraps its launch in `on_device(t)`
so that a layer on cuda:1 called while cuda:0 is current runs on cuda:1 (and on cuda:1's current stream).
CPU tensors (the interpreter, TRITON_INTERPRET=1) need no guard."""
from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)

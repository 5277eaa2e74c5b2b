"""What the `prunekit` command does under torchrun (`torchrun --nproc_per_node=N -m prunekit prune ...`):
one process group for the whole command, this rank's device, and rank 0 alone writing the output
while every rank learns whether the write succeeded (and exits accordingly)."""
from __future__ import annotations

import contextlib

import torch

from . import group


def world_size() -> int:
    return torch.distributed.get_world_size() if group.is_active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if group.is_active() else 0


@contextlib.contextmanager
def process_group(device):
    """Initializes the process group from torchrun's environment for the block (when WORLD_SIZE > 1
    and none is initialized) and destroys it after."""
    owns = group.init(device)
    try:
        yield
    finally:
        if owns and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def on_rank0(write) -> None:
    """Runs write() on rank 0 only; the other ranks wait for its outcome and raise RuntimeError when
    it failed (bounded by the process group's timeout, PRUNEKIT_DIST_TIMEOUT when prunekit made it)."""
    if not group.is_active():
        write()
        return
    outcome = [None]
    failure = None
    if torch.distributed.get_rank() == 0:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised here
            failure = exc
            outcome[0] = f"{type(exc).__name__}: {exc}"
    torch.distributed.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 failed to write the output: {outcome[0]}")

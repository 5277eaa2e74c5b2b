"""The process group a distributed run uses: found (initialized by the user) or initialized by prunekit
from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Backend: NCCL when the computation runs on CUDA, gloo otherwise. The timeout (PRUNEKIT_DIST_TIMEOUT,
seconds, default 1800) bounds how long a rank waits for the others at a sync point and in a collective.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch

log = logging.getLogger("prunekit")

TIMEOUT_ENV = "PRUNEKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


def available() -> bool:
    return torch.distributed.is_available()


def timeout_seconds(timeout: float | None = None) -> float:
    """`timeout` if given, else PRUNEKIT_DIST_TIMEOUT, else 1800 s."""
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds") from None
    if not timeout > 0:
        raise ValueError(f"distributed timeout: expected a positive number of seconds, got {timeout!r}")
    return float(timeout)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={text!r}: expected an integer (torchrun sets it)") from None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_active() -> bool:
    """Whether a process group of more than one rank is initialized."""
    dist = torch.distributed
    return available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_device(device: torch.device | str | None) -> torch.device | None:
    """cuda without an index means this process's GPU (cuda:LOCAL_RANK) in a distributed run."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def init(device: torch.device | str | None = None, backend: str | None = None,
         timeout: float | None = None) -> bool:
    """Initializes torch.distributed's default process group from torchrun's environment variables,
    unless it already is or WORLD_SIZE is 1. Returns True when this call initialized it (then the caller
    may `torch.distributed.destroy_process_group()` when done).

    device: where this rank computes (cuda -> cuda:LOCAL_RANK, made the current CUDA device);
    backend: default NCCL for CUDA, gloo otherwise; timeout: seconds (default PRUNEKIT_DIST_TIMEOUT)."""
    if not available():
        if env_world_size() > 1:
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch is built without torch.distributed")
        return False
    dist = torch.distributed
    if dist.is_initialized() or env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: launch with "
                           "torchrun, or initialize torch.distributed yourself before prunekit.prune")
    device = rank_device(device)
    if backend is None:
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    seconds = timeout_seconds(timeout)
    kwargs = {"device_id": device} if backend == "nccl" and device is not None else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds), **kwargs)
    log.info("prunekit initialized torch.distributed: rank %d of %d, backend %s, timeout %g s",
             dist.get_rank(), dist.get_world_size(), backend, seconds)
    return True

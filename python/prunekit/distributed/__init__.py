"""prunekit across processes, on torch.distributed (NCCL on GPUs, gloo on CPU).

prunekit.prune is distributed when it runs in a process group of several ranks (torchrun, or a group
the user initialized; prunekit initializes one from torchrun's environment when none is): calibration
is data-parallel (each rank runs its shard of the batches, statistics are all-reduced as sums with
sample counts), pruning is work-parallel (a block's layers are split across ranks by cost and the
pruned weights broadcast). Every rank ends with the whole pruned model; rank 0 writes it.

  group.py      the process group: found, or initialized from torchrun's environment; the timeout knob
  session.py    one run: rank, collectives, sync points and the failure protocol
  reduce.py     statistics and reconstruction errors summed across ranks
  partition.py  which rank prunes which layer (cost model, greedy balance)
  share.py      pruned weights and report rows from their owners to every rank
"""
from __future__ import annotations

from .errors import DistributedError
from .group import DEFAULT_TIMEOUT, TIMEOUT_ENV, init, is_active

__all__ = ["DistributedError", "init", "is_active", "TIMEOUT_ENV", "DEFAULT_TIMEOUT"]

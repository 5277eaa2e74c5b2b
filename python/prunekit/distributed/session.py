"""One distributed pruning run as every rank sees it: rank, world size, the collectives it uses
(torch.distributed: NCCL on GPUs, gloo on CPU) and the sync points that make a failure clear everywhere.

Failures. A rank whose code raises records "rank r failed: <error>" in the process group's key-value
store (torch.distributed's own TCPStore) before its exception leaves prunekit.prune. Every data
collective is preceded by a sync point where each rank announces itself in the store and waits for the
others; a rank waiting there sees the failure record and raises DistributedError naming the failing
rank and its error, and no rank enters a collective a peer will never join (so the process group stays
usable after a failure). A rank that hangs never announces itself: the others give up after the timeout
(PRUNEKIT_DIST_TIMEOUT, default 1800 s) with a DistributedError naming it and where it was last seen,
and record that, so the late rank stops too at its next sync point if it ever gets there.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time

import torch

from .errors import DistributedError
from . import group
from .group import timeout_seconds

log = logging.getLogger("prunekit")

MAX_POLL_PAUSE = 0.005  # s between two looks at the store while waiting at a sync point
_RUNS = [0]  # sessions started in this process; every rank starts them in the same order
_ACTIVE: list[Session] = []


def active() -> Session | None:
    """The session of the distributed run in progress in this process, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


class Session:
    def __init__(self, device: torch.device, timeout: float | None = None, owns_group: bool = False):
        dist = torch.distributed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = str(dist.get_backend())
        self.timeout = timeout_seconds(timeout)
        self.device = device
        self.owns_group = owns_group
        if self.backend == "nccl":
            if device.type != "cuda":
                raise ValueError(f"the process group uses NCCL, which moves CUDA tensors only, but this rank "
                                 f"computes on {device}; pass device='cuda' (or use a gloo process group)")
            torch.cuda.set_device(device)  # NCCL object collectives use the current device
            torch.cuda.reset_peak_memory_stats(device)
        _RUNS[0] += 1
        # The process group's own key-value store (whatever init method made it): a sync point is a key
        # per rank in it, so a failed or hung rank is seen without entering a collective.
        base = dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"prunekit/run{_RUNS[0]}/", base)
        self.syncs = 0
        self.where = "start"
        self.batches = 0
        self.layers_pruned = 0
        self.prune_seconds = 0.0
        self.wait_seconds = 0.0  # at sync points, for the slower ranks (or a store round trip)
        self.comm_seconds = 0.0  # in collectives (host time; NCCL's may still run on the GPU after)
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------ sync points
    def sync(self, what: str, payload: str = "") -> list[str]:
        """Waits until every rank reached this sync point; returns each rank's payload (by rank).
        Raises DistributedError when a rank failed, or did not arrive within the timeout."""
        self.syncs += 1
        phase = f"{self.where}: {what}"
        keys = [f"sync/{self.syncs}/{r}" for r in range(self.world)]
        self.store.set(f"at/{self.rank}", phase)
        self.store.set(keys[self.rank], payload)
        arrived = time.monotonic()
        deadline = arrived + self.timeout
        pause = 0.0002
        while True:
            self._raise_if_failed(phase)
            if self.store.check(keys):
                break
            if time.monotonic() > deadline:
                late = [r for r in range(self.world) if not self.store.check([keys[r]])]
                seen = "; ".join(f"rank {r} last reached {self._last_seen(r)!r}" for r in late)
                message = (f"rank(s) {', '.join(map(str, late))} of {self.world} did not reach {phase!r} "
                           f"within {self.timeout:g} s ({seen}): hung, or far slower than rank {self.rank}; "
                           f"PRUNEKIT_DIST_TIMEOUT sets the wait in seconds")
                self._record(f"rank {self.rank} gave up waiting: {message}")
                raise _reported(message)
            time.sleep(pause)
            pause = min(pause * 2, MAX_POLL_PAUSE)
        self.wait_seconds += time.monotonic() - arrived
        return [self.store.get(k).decode() for k in keys]

    def agree(self, what: str, value: str) -> None:
        """A sync point whose payload must be the same on every rank (the same model, data, method)."""
        values = self.sync(what, value)
        differ = [r for r, v in enumerate(values) if v != value]
        if differ:
            raise _reported(f"{self.where}: {what} differs between ranks (rank {self.rank}: {value!r}; "
                            + "; ".join(f"rank {r}: {values[r]!r}" for r in differ)
                            + "); every rank must call prunekit.prune with the same model, method and data")

    def fail(self, exc: BaseException) -> None:
        """Records this rank's failure so the others stop at their next sync point."""
        if getattr(exc, "prunekit_reported", False):
            return
        text = " ".join(str(exc).split())
        self._record(f"{type(exc).__name__}{': ' + text if text else ''} (at {self.where!r})")

    def _record(self, message: str) -> None:
        try:
            self.store.set(f"error/{self.rank}", message)
            self.store.set("failed", "1")
        except Exception as exc:  # noqa: BLE001 - the store itself is gone: the others time out instead
            log.warning("rank %d could not record its failure in the store: %s", self.rank, exc)

    def _raise_if_failed(self, phase: str) -> None:
        if not self.store.check(["failed"]):
            return
        for r in range(self.world):
            if r != self.rank and self.store.check([f"error/{r}"]):
                message = self.store.get(f"error/{r}").decode()
                raise _reported(f"rank {r} of {self.world} failed: {message}; rank {self.rank} stopped at {phase!r}")

    def _last_seen(self, rank: int) -> str:
        key = f"at/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else "none (never started this run)"

    # ------------------------------------------------------------------------------ collectives
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        want = self.device if self.backend == "nccl" else torch.device("cpu")
        return t if t.device == want and t.is_contiguous() else t.to(want).contiguous()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sums t over the ranks, in place."""
        began = time.perf_counter()
        comm = self._comm(t)
        torch.distributed.all_reduce(comm)
        if comm is not t:
            t.copy_(comm)
        self.comm_seconds += time.perf_counter() - began
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """t from rank `src` on every rank, in place."""
        began = time.perf_counter()
        comm = self._comm(t)
        torch.distributed.broadcast(comm, src)
        if comm is not t:
            t.copy_(comm)
        self.comm_seconds += time.perf_counter() - began
        return t

    def all_gather_object(self, obj) -> list:
        began = time.perf_counter()
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        self.comm_seconds += time.perf_counter() - began
        return out

    # ------------------------------------------------------------------------------ data, report
    def shard(self, batches: list) -> list:
        """This rank's calibration batches: every world-th one, starting at its rank."""
        if len(batches) < self.world:
            raise ValueError(f"calibration: {len(batches)} batch(es) for {self.world} processes; every process "
                             "needs at least one (more samples, or a smaller batch_size)")
        mine = batches[self.rank::self.world]
        self.batches = len(mine)
        return mine

    def summary(self) -> dict:
        """Per-rank figures for the report (gathered from every rank: a collective)."""
        self.sync("report")
        peak_device = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None)
        mine = {"rank": self.rank, "batches": self.batches, "layers_pruned": self.layers_pruned,
                "prune_seconds": self.prune_seconds,
                "wait_seconds": self.wait_seconds, "syncs": self.syncs, "comm_seconds": self.comm_seconds, "seconds": time.perf_counter() - self.started,
                "peak_device_bytes": peak_device,
                "peak_host_bytes": _peak_host_bytes()}
        return {"world_size": self.world, "backend": self.backend, "timeout_s": self.timeout,
                "ranks": self.all_gather_object(mine)}

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _peak_host_bytes() -> int | None:
    """This process's peak resident memory over its lifetime (Linux: ru_maxrss is in KiB)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start(mode: bool | None, device) -> Session | None:
    """The session for a prunekit.prune call, or None for a single-process run.

    mode None (default): distributed when a process group of several ranks is initialized, or when
    torchrun's environment says WORLD_SIZE > 1 (then prunekit initializes the group for this call and
    destroys it after); True: the same, but a single process is an error; False: never."""
    if mode is False:
        return None
    if mode is not None and mode is not True:
        raise TypeError(f"distributed: expected None, True or False, got {mode!r}")
    owns = False
    if not group.is_active() and group.available() and not torch.distributed.is_initialized():
        owns = group.init(device)
    if not group.is_active():
        if mode is True:
            raise ValueError("distributed=True but this is a single process: launch with torchrun "
                             "--nproc_per_node=N, or initialize torch.distributed with several ranks")
        return None
    device = group.rank_device(device) if device is not None else torch.device("cpu")
    try:
        return Session(device, owns_group=owns)
    except BaseException:
        if owns:
            torch.distributed.destroy_process_group()
        raise


def fingerprint(model, method, batches, *extra) -> str:
    """What every rank must agree on before a run: the method, the calibration data (a digest of every
    batch), the model's parameter names and shapes with a probe of each one's first values, and the
    other arguments (include, exclude, allocation)."""
    h = hashlib.sha256()
    h.update(repr((repr(method), [repr(e) for e in extra])).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        if p.device.type != "meta" and p.numel():
            h.update(p.detach().reshape(-1)[:8].to("cpu", torch.float64).numpy().tobytes())
    for batch in batches or ():
        for key in sorted(batch) if isinstance(batch, dict) else ():
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{len(batches or ())} batches, digest {h.hexdigest()[:16]}"


def _reported(message: str) -> DistributedError:
    exc = DistributedError(message)
    exc.prunekit_reported = True  # already in the store: running() does not record it again
    return exc


@contextlib.contextmanager
def running(session: Session | None):
    """Makes `session` the active one; an exception leaving the block is recorded for the other ranks."""
    if session is None:
        yield None
        return
    _ACTIVE.append(session)
    try:
        yield session
    except BaseException as exc:
        session.fail(exc)
        raise
    finally:
        _ACTIVE.pop()
        session.close()

"""`prunekit::obs_sweep`: SparseGPT's in-block sweep as a custom op.

CPU runs the C++ kernel (_C.obs_sweep). CUDA runs _C_cuda.obs_sweep when the build has it, else the
Triton kernel (prunekit.kernels.obs_sweep); PRUNEKIT_SWEEP_BACKEND=triton|cuda forces one of them. Each is
self-checked on first use (ops/selfcheck.py) and falls back to the next, then to the reference.
The default body, used on any other device, is the reference (prunekit.ref.obs_sweep).
"""
from __future__ import annotations

import os

import torch

from .. import _native
from ..ref import obs_sweep as _ref
from . import _dispatch, selfcheck

_BACKEND_ENV = "PRUNEKIT_SWEEP_BACKEND"


def check_args(W1: torch.Tensor, Hinv1: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> None:
    """What every backend needs before it is handed pointers."""
    if W1.dtype != torch.float32 or W1.dim() != 2:
        raise ValueError(f"obs_sweep: W1 must be a 2-D float32 tensor, got {W1.dtype} {tuple(W1.shape)}")
    rows, B = W1.shape
    if B < 1:
        raise ValueError("obs_sweep: the block needs at least one column (W1 has width 0)")
    if Hinv1.dtype != torch.float32 or tuple(Hinv1.shape) != (B, B):
        raise ValueError(f"obs_sweep: Hinv1 must be float32 of shape {(B, B)}, got {Hinv1.dtype} "
                         f"{tuple(Hinv1.shape)}")
    if keep.dtype != torch.bool or tuple(keep.shape) != (rows, B):
        raise ValueError(f"obs_sweep: keep must be bool of shape {(rows, B)}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    for name, t in (("Hinv1", Hinv1), ("keep", keep)):
        if t.device != W1.device:
            raise ValueError(f"obs_sweep: {name} is on {t.device} but W1 is on {W1.device}")
    if m < 0 or (m > 0 and (B % m != 0 or not 1 <= n < m)):
        raise ValueError(f"obs_sweep: N:M needs 1 <= n < m and the block width {B} divisible by m, "
                         f"got n={n}, m={m} (m=0 means unstructured)")


def _outputs(W1: torch.Tensor):
    rows, B = W1.shape
    return (torch.empty_like(W1), torch.empty_like(W1), W1.new_empty(rows),
            torch.empty((rows, B), dtype=torch.bool, device=W1.device))


def _pointers(W1, Hinv1, keep, outs):
    return [W1.data_ptr(), Hinv1.data_ptr(), keep.data_ptr(), *(t.data_ptr() for t in outs)]


def _native_sweep(mod, W1, Hinv1, keep, n, m, stream=None):
    W1, Hinv1, keep = (_dispatch.contiguous(t) for t in (W1, Hinv1, keep))
    outs = _outputs(W1)
    rows, B = W1.shape
    args = [*_pointers(W1, Hinv1, keep, outs), rows, B, n, m]
    if stream is not None:
        args.append(stream)
    mod.obs_sweep(*args)
    return outs


def _triton_launcher():
    """The Triton launcher, or (None, why it did not load)."""
    try:
        from ..kernels.obs_sweep import obs_sweep_triton
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return obs_sweep_triton, ""


def _triton_sweep(W1, Hinv1, keep, n, m):
    launch, why = _triton_launcher()
    if launch is None:
        raise RuntimeError(f"prunekit::obs_sweep: the Triton sweep (prunekit.kernels.obs_sweep) did not "
                           f"load: {why}")
    W1, Hinv1, keep = (_dispatch.contiguous(t) for t in (W1, Hinv1, keep))
    return tuple(launch(W1, Hinv1, keep, n, m))


@torch.library.custom_op("prunekit::obs_sweep", mutates_args=())
def obs_sweep(W1: torch.Tensor, Hinv1: torch.Tensor, keep: torch.Tensor, n: int,
              m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune one block: returns (Q1, Err1, losses, keep_out). See prunekit.ref.obs_sweep."""
    check_args(W1, Hinv1, keep, n, m)
    return _ref.obs_sweep(W1, Hinv1, keep, n, m)


@obs_sweep.register_fake
def _(W1, Hinv1, keep, n, m):
    check_args(W1, Hinv1, keep, n, m)
    return _outputs(W1)


@obs_sweep.register_kernel("cpu")
def _(W1, Hinv1, keep, n, m):
    check_args(W1, Hinv1, keep, n, m)
    return _native_sweep(_native.require_cpu_module(), W1, Hinv1, keep, n, m)


def check_diag(Hinv1: torch.Tensor) -> None:
    """diag(Hinv1) positive and finite, as the reference and the C++ kernel require (the GPU kernels would
    silently produce NaN or a wrong mask). One host sync per block."""
    diag = torch.diagonal(Hinv1)
    if not bool((torch.isfinite(diag) & (diag > 0)).all()):
        raise ValueError("obs_sweep: Hinv1 has a non-positive or non-finite diagonal entry "
                         "(it is not an upper Cholesky factor of a positive definite H^-1)")


def _cuda_sweep(mod, W1, Hinv1, keep, n, m):
    with _dispatch.device_guard(W1.device):
        return _native_sweep(mod, W1, Hinv1, keep, n, m, stream=_native.stream_of(W1))


def _routes(backend: str) -> tuple[list[selfcheck.Route], str]:
    """The GPU routes in order (CUDA, then Triton) that this build and PRUNEKIT_SWEEP_BACKEND allow, and
    why Triton is missing when it is."""
    routes = []
    mod = _native.cuda_module()
    if backend in ("", "auto", "cuda") and mod is not None and hasattr(mod, "obs_sweep"):
        routes.append(selfcheck.Route("cuda", lambda *a: _cuda_sweep(mod, *a)))
    why_not_triton = f"not tried: {_BACKEND_ENV}=cuda"
    if backend != "cuda":
        launch, why_not_triton = _triton_launcher()
        if launch is not None:
            routes.append(selfcheck.Route("triton", _triton_sweep))
    return routes, why_not_triton


# Masks must be identical; values, errors and losses to fp32 rounding (the kernels follow the reference's
# operation order, so in practice they are identical too).
COMPARE = selfcheck.rows_within(1e-4, exact_outputs=(3,))
PROBE_ROWS = 8


def _cuda_kernel(W1, Hinv1, keep, n, m):
    check_args(W1, Hinv1, keep, n, m)
    backend = os.environ.get(_BACKEND_ENV, "").strip().lower()
    if backend not in ("", "auto", "cuda", "triton"):
        raise ValueError(f"{_BACKEND_ENV}={backend!r}: expected 'cuda', 'triton' or 'auto'")
    check_diag(Hinv1)
    routes, why_not_triton = _routes(backend)
    if not routes and not _dispatch.reference_allowed():
        if _native.cuda_module() is None and backend != "triton":
            _dispatch.cuda_module_or_none("obs_sweep")  # raises the diagnosis of the missing CUDA build
        if backend == "triton":
            raise RuntimeError("prunekit::obs_sweep: PRUNEKIT_SWEEP_BACKEND=triton but the Triton sweep "
                               f"(prunekit.kernels.obs_sweep) did not load: {why_not_triton}")
        raise RuntimeError("prunekit::obs_sweep: no GPU sweep is available (prunekit._C_cuda has no obs_sweep "
                           f"kernel or {_BACKEND_ENV}={backend!r} excludes it; Triton: {why_not_triton}). "
                           "Rebuild prunekit (pip install .), install triton, or set PRUNEKIT_ALLOW_REFERENCE=1.")
    args = (W1, Hinv1, keep, n, m)
    return selfcheck.run(
        "obs_sweep", routes, _ref.obs_sweep, args,
        probe=lambda: (selfcheck.head_rows(W1, PROBE_ROWS), Hinv1, selfcheck.head_rows(keep, PROBE_ROWS), n, m),
        compare=COMPARE, device=W1.device, dtype=W1.dtype, shape_class=(W1.shape[1], n, m))


obs_sweep.register_kernel("cuda")(_cuda_kernel)

"""First-use self-checks of the GPU routes (DESIGN.md "Trust in code that could not be run").

A kernel that has never run on its hardware must not corrupt a result. `run(...)` serves a call from an
ordered list of routes (CUDA -> Triton -> the torch reference on the same device): the first time a route
serves a given (op, route, device, dtype, shape class) it is first run on a bounded probe (a few rows of
the real input, or a seeded small case) and compared with the reference on that probe; only then is its
result used. A route that raises or disagrees (exact ops: any difference; arithmetic: the per-row relative
error above the op's tolerance) is disabled for the whole process on that device, an error naming the op,
device, shape and the difference is logged, and the call falls back to the next route. The check
synchronizes inside its `try`, so an asynchronous fault is attributed to the route that caused it.

Never inside a CUDA-graph capture: a capture uses a route already checked for that key, else falls back
(the reference is capture-safe where the op's reference is). PRUNEKIT_SELFCHECK=0 turns the checks off
(benchmarks); disabled routes stay disabled. `verdicts()` lists what was checked; `reset()` forgets it.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("prunekit")

ENV = "PRUNEKIT_SELFCHECK"

_lock = threading.Lock()
_passed: set[tuple] = set()                 # (op, route, device, dtype, shape class)
_disabled: dict[tuple, str] = {}            # (op, route, device) -> why
_log: list[dict] = []                       # one entry per check, for `prunekit selftest` / bug reports


def enabled() -> bool:
    flag = os.environ.get(ENV, "1")
    if flag not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {flag!r}")
    return flag == "1"


def reset() -> None:
    """Forgets every verdict (tests, and `prunekit selftest`, which checks from scratch)."""
    with _lock:
        _passed.clear()
        _disabled.clear()
        _log.clear()


def verdicts() -> list[dict]:
    with _lock:
        return [dict(v) for v in _log]


def disabled() -> dict[tuple, str]:
    with _lock:
        return dict(_disabled)


def is_disabled(op: str, route: str, device) -> bool:
    return (op, route, str(device)) in _disabled


def disable(op: str, route: str, device, why: str) -> None:
    with _lock:
        _disabled[(op, route, str(device))] = why


def capturing(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- comparisons: each returns (max error, description); error 0.0 = identical ----

def exact(got, expected) -> tuple[float, str]:
    """Exact ops (masks, packing): the number of differing elements over all outputs."""
    got, expected = _as_tuple(got), _as_tuple(expected)
    if len(got) != len(expected):
        return float("inf"), f"{len(got)} outputs, expected {len(expected)}"
    bad = 0
    for i, (g, e) in enumerate(zip(got, expected)):
        if tuple(g.shape) != tuple(e.shape) or g.dtype != e.dtype:
            return float("inf"), f"output {i}: {g.dtype} {tuple(g.shape)}, expected {e.dtype} {tuple(e.shape)}"
        bad += int((g.reshape(-1) != e.reshape(-1)).sum()) if g.numel() else 0
    return float(bad), f"{bad} element(s) differ"


def row_relative_error(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max over rows of ||got_r - expected_r|| / (||expected_r|| + scale_r) in float64; NaN/inf -> inf.
    Per row, so a few wrong rows of a large output are not averaged away. `scale` ([rows], optional) is the
    size of the row's terms (e.g. the norm of x*w for a dot product), so rows that cancel to ~0 are judged
    against their rounding, not against 0."""
    g = got.detach().double().reshape(got.shape[0] if got.dim() else 1, -1)
    e = expected.detach().double().reshape(g.shape)
    if g.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(g).all()):
        return float("inf")
    denom = e.norm(dim=1)
    if scale is not None:
        denom = denom + scale.detach().double().reshape(-1)
    denom = denom.clamp_min(torch.finfo(torch.float32).tiny)
    return float(((g - e).norm(dim=1) / denom).max())


def rows_within(tol: float, exact_outputs: Sequence[int] = ()) -> Callable:
    """Arithmetic ops: every output's per-row relative error <= tol, outputs listed in `exact_outputs`
    (e.g. a mask next to the values) equal."""
    def compare(got, expected) -> tuple[float, str]:
        got, expected = _as_tuple(got), _as_tuple(expected)
        worst, parts = 0.0, []
        for i, (g, e) in enumerate(zip(got, expected)):
            if tuple(g.shape) != tuple(e.shape):
                return float("inf"), f"output {i}: shape {tuple(g.shape)}, expected {tuple(e.shape)}"
            if i in exact_outputs:
                n = int((g != e).sum())
                if n:
                    return float("inf"), f"output {i}: {n} element(s) differ (must be exact)"
                continue
            err = row_relative_error(g, e)
            parts.append(f"output {i}: max row rel err {err:.3g}")
            worst = max(worst, err) if err == err else float("inf")
        return worst, "; ".join(parts) + f" (tolerance {tol:g})"
    compare.tolerance = tol  # type: ignore[attr-defined]
    return compare


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _tolerance(compare) -> float:
    return getattr(compare, "tolerance", 0.0)


# ---- the mechanism ----

@dataclass
class Route:
    """One way to serve the op: `fn(*args)`; `available()` says whether it can run here at all."""

    name: str
    fn: Callable[..., Any]
    available: Callable[[], bool] = lambda: True


def check(op: str, route: Route, reference: Callable[..., Any], probe: Sequence[Any], compare: Callable,
          *, device, dtype, shape_class) -> bool:
    """Runs `route` and `reference` on the probe arguments and compares; disables the route on failure."""
    shape = _describe(probe)
    try:
        got = route.fn(*probe)
        synchronize(device)  # an asynchronous fault surfaces here, inside the try
    except Exception as exc:  # any failure of an unproven kernel: report it and use the next route
        if isinstance(exc, (ValueError, TypeError)) and _rejects(reference, probe):
            return True  # bad input (e.g. a weight that is not 2:4): the reference rejects it too; the
            # real call raises the same way, and the route is checked on the next good input
        _fail(op, route.name, device, dtype, shape_class, shape, f"raised {type(exc).__name__}: {exc}")
        return False
    expected = reference(*probe)
    err, what = compare(got, expected)
    tol = _tolerance(compare)
    if not err <= tol:  # NaN fails too
        _fail(op, route.name, device, dtype, shape_class, shape, f"disagrees with the reference: {what}")
        return False
    with _lock:
        _passed.add((op, route.name, str(device), str(dtype), shape_class))
        _log.append({"op": op, "route": route.name, "device": str(device), "dtype": str(dtype),
                     "shape_class": repr(shape_class), "probe": shape, "ok": True, "max_error": err})
    return True


def _rejects(reference, probe) -> bool:
    try:
        reference(*probe)
    except (ValueError, TypeError):
        return True
    return False


def _fail(op, route, device, dtype, shape_class, shape, why) -> None:
    message = (f"prunekit self-check: {op} route '{route}' on {device} ({dtype}, shape class {shape_class!r}, "
               f"probe {shape}) {why}; disabled for this process, falling back. Please report this "
               "with the output of `prunekit selftest --json FILE`.")
    log.error(message)
    disable(op, route, device, why)
    with _lock:
        _log.append({"op": op, "route": route, "device": str(device), "dtype": str(dtype),
                     "shape_class": repr(shape_class), "probe": shape, "ok": False, "error": why})


def _describe(args: Sequence[Any]) -> str:
    return ", ".join(f"{tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a) for a in args)


def ready(op: str, route: Route, reference: Callable[..., Any], probe: Callable[[], Sequence[Any]],
          compare: Callable, *, device, dtype, shape_class) -> bool:
    """Whether `route` may serve this call: available, not disabled, and checked for this key (checked
    now on first use, unless the checks are off). False inside a graph capture for an unchecked key."""
    if is_disabled(op, route.name, device) or not route.available():
        return False
    if not enabled():
        return True
    key = (op, route.name, str(device), str(dtype), shape_class)
    if key in _passed:
        return True
    if capturing(device):
        return False
    return check(op, route, reference, probe(), compare, device=device, dtype=dtype, shape_class=shape_class)


def run(op: str, routes: Sequence[Route], reference: Callable[..., Any], args: Sequence[Any], *,
        probe: Callable[[], Sequence[Any]], compare: Callable, device, dtype, shape_class):
    """Serve op(*args) from the first route that is ready (see `ready`), else from `reference`."""
    for route in routes:
        if ready(op, route, reference, probe, compare, device=device, dtype=dtype, shape_class=shape_class):
            return route.fn(*args)
    return reference(*args)


def head_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A bounded probe: the first `rows` rows of a tensor (contiguous), all of it when smaller."""
    return t[: min(rows, t.shape[0])].contiguous() if t.dim() else t

"""`prunekit selftest [--device cuda|cpu] [--json FILE] [--strict]`: every kernel route on a grid of shapes
(odd sizes, tails, ties, all-zero groups) against its PyTorch reference.

The routes are called directly, not through the first-use self-checks of ops/selfcheck.py (whose fallback
would hide a broken kernel). CPU: the C++ kernels (the sparse linear kernels on every ISA path this CPU
runs: scalar, AVX2, AVX-512, AVX-512 BF16) and the Triton kernels under the interpreter (TRITON_INTERPRET=1,
set here before Triton is imported). CUDA: the CUDA kernels (OBS sweep, 2:4 decode,
sm90 GEMM), the Triton kernels, the tensor-core Hessian and the dense 2:4 route. Prints a table (op,
route, shape, dtype, pass/fail/skip, max error, time vs the reference) and optionally writes it as JSON
with prunekit.backends(): the first thing to run on a new GPU, and what a bug report attaches. Exit status
1 when a route fails (with --strict also when one is skipped), 2 when the device is not there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

EXIT_FAIL, EXIT_NO_DEVICE = 1, 2


@dataclass
class Case:
    op: str
    route: str
    shape: str
    dtype: str
    run: Callable[[], Any] | None          # the route on the case's inputs (None: skipped, see why)
    reference: Callable[[], Any]
    compare: Callable[[Any, Any], tuple[float, str]]
    why: str = ""
    result: dict = field(default_factory=dict)


def add_parser(commands) -> None:
    """Registers the `selftest` subcommand on the CLI's subparsers (cli.py)."""
    p = commands.add_parser("selftest", help="check every kernel against its reference (run first on a new GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run the kernels (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON (attach to bug reports)")
    p.add_argument("--strict", action="store_true", help="a skipped route (not built, not supported) fails too")
    p.set_defaults(run=lambda args: main(args.device, args.json, args.strict))


def main(device: str | None = None, json_path: str | None = None, strict: bool = False) -> int:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # Triton's kernels run on CPU tensors under its interpreter (before triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"prunekit selftest: --device cuda, but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return EXIT_NO_DEVICE
    from . import _native

    cases = build_cases(torch.device(device))
    for case in cases:
        execute(case, torch.device(device))
    rows = [c.result for c in cases]
    print(render(rows))
    failed = [r for r in rows if r["status"] == "fail" or (strict and r["status"] == "skip")]
    summary = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skip")}
    print(f"\nselftest on {device}: {summary['pass']} passed, {summary['fail']} failed, {summary['skip']} skipped"
          + (" (--strict: skips fail)" if strict and summary["skip"] else ""))
    if json_path:
        report = {"device": _device_name(torch.device(device)), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "triton": _triton_version(), "backends": _native.backends(),
                  "environment": {k: v for k, v in os.environ.items() if k.startswith(("PRUNEKIT_", "TRITON_"))},
                  "summary": summary, "results": rows}
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {json_path}")
    return EXIT_FAIL if failed else 0


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# ---- running one case ----

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device) -> float:
    """Best of a few runs after one untimed warm-up (first calls pay for dispatch setup and compilation)."""
    fn()
    times = []
    for _ in range(3 if device.type == "cuda" else 2):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def execute(case: Case, device) -> None:
    r = {"op": case.op, "route": case.route, "shape": case.shape, "dtype": case.dtype}
    if case.run is None:
        case.result = {**r, "status": "skip", "max_error": None, "speedup_vs_ref": None, "detail": case.why}
        return
    try:
        got = case.run()
        _sync(device)
    except Exception as exc:  # report every failure of a kernel, never stop the run
        case.result = {**r, "status": "fail", "max_error": None, "speedup_vs_ref": None,
                       "detail": f"raised {type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=4)}
        return
    expected = case.reference()
    err, what = case.compare(got, expected)
    tol = getattr(case.compare, "tolerance", 0.0)
    ok = err <= tol
    speed = None
    if ok:
        t_route, t_ref = _seconds(case.run, device), _seconds(case.reference, device)
        speed = t_ref / t_route if t_route > 0 else None
    case.result = {**r, "status": "pass" if ok else "fail", "max_error": err if math.isfinite(err) else str(err),
                   "tolerance": tol, "speedup_vs_ref": speed, "detail": what}


def render(rows: list[dict]) -> str:
    head = ["op", "route", "shape", "dtype", "result", "max error", "time vs ref"]
    lines = []
    for r in rows:
        err = r.get("max_error")
        err = "-" if err is None else (f"{err:.3g}" if isinstance(err, float) else str(err))
        speed = r.get("speedup_vs_ref")
        speed = "-" if speed is None else f"{speed:.2f}x"
        status = r["status"].upper() if r["status"] != "pass" else "pass"
        detail = f"  {r['detail']}" if r["status"] != "pass" and r.get("detail") else ""
        lines.append([r["op"], r["route"], r["shape"], r["dtype"], status + detail, err, speed])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*map(str, line)) for line in lines]
    return "\n".join(out)


# ---- the grid ----

def build_cases(device) -> list[Case]:
    from . import selftest_cases

    return selftest_cases.all_cases(device)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["selftest", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(cli())

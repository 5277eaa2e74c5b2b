"""Benchmark plumbing: CUDA-event timing (eager or CUDA graph), median and spread, JSON rows.

Rows: op, provider, shape, dtype, M, mode, time_us (median), p10_us, p90_us, tflops, gbps, device,
commit (plus free-form extras). Only GPU numbers are meaningful; every entry point calls
`require_cuda()` first and exits with a clear message without one.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch


def require_cuda(script: str) -> torch.device:
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU, but torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}). Run it on a GPU machine.")
    return torch.device("cuda")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def _capture(calls: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph (lazy init, autotuning, dispatch timing)
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def time_calls(calls: Sequence[Callable[[], object]], *, graph: bool = True, samples: int = 30,
               min_sample_us: float = 300.0) -> dict[str, float]:
    """Per-call time of running `calls` in sequence (rotate weight buffers by passing one call per buffer).
    Returns median/p10/p90 in microseconds over `samples` samples of several back-to-back repetitions."""
    if graph:
        g = _capture(calls)
        run = g.replay
    else:
        def run():
            for call in calls:
                call()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    once_us = max(start.elapsed_time(end) * 1000.0, 1.0)
    reps = max(1, math.ceil(min_sample_us / once_us))
    per_call = []
    for _ in range(samples):
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1000.0 / (reps * len(calls)))
    per_call.sort()
    return {"time_us": statistics.median(per_call), "p10_us": per_call[len(per_call) // 10],
            "p90_us": per_call[(len(per_call) * 9) // 10]}


def row(op: str, provider: str, shape: str, dtype: torch.dtype, M: int, timing: dict[str, float], *, flops: float,
        bytes_moved: float, mode: str, device: torch.device, **extra) -> dict:
    t = timing["time_us"]
    return {"op": op, "provider": provider, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "M": M,
            "mode": mode, **{k: round(v, 3) for k, v in timing.items()},
            "tflops": round(flops / (t * 1e-6) / 1e12, 3), "gbps": round(bytes_moved / (t * 1e-6) / 1e9, 2),
            "device": device_name(device), "commit": commit(), **extra}


def write_json(rows: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def print_table(rows: list[dict]) -> None:
    """Human summary on stdout (a CLI, so printing is the point)."""
    header = f"{'shape':>12} {'M':>6} {'mode':>6} {'provider':>14} {'time_us':>10} {'TFLOP/s':>8} {'GB/s':>8} {'vs dense':>8}"
    print(header)
    dense = {(r["shape"], r["M"], r["mode"]): r["time_us"] for r in rows if r["provider"] == "dense"}
    for r in rows:
        base = dense.get((r["shape"], r["M"], r["mode"]))
        speed = f"{base / r['time_us']:.2f}x" if base else "-"
        print(f"{r['shape']:>12} {r['M']:>6} {r['mode']:>6} {r['provider']:>14} {r['time_us']:>10.1f} "
              f"{r['tflops']:>8.1f} {r['gbps']:>8.0f} {speed:>8}")

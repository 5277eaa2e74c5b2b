"""Benchmark plumbing shared by every bench/ script: GPU check, timing, run metadata, JSON rows, outputs.

Timing: `time_calls` for fast kernels (CUDA events around many back-to-back calls, optionally a CUDA
graph, weight buffers rotated by passing one call per buffer), `time_once_ms` for slow one-shot work
(one CUDA-event pair per call). Both return the same summary: the median and the 10th/90th percentile
of the samples (`time_us`/`p10_us`/`p90_us` or `time_ms`/`p10_ms`/`p90_ms`) and the sample count.

Every row has the same keys, in this order (None where a key does not apply):
    op, provider, shape, dtype, M, mode, time_us | time_ms, p10_*, p90_*, samples, tflops, gbps,
    device, commit, extras (a dict of the bench's own measurements: errors, speedups, ...)
Each script writes DIR/<script>.json = {"run": run_info(...), "rows": [...]} and DIR/<script>.md (the
tables of bench/results_table.py), rewritten after every case so that an interrupted run keeps what it
finished. Only GPU numbers are meaningful: every entry point calls `require_cuda()` first.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results"
NO_GPU_EXIT = 2

sys.path.insert(0, str(BENCH_DIR))
import results_table  # noqa: E402


# ---- environment ---------------------------------------------------------------------------------

def require_cuda(script: str) -> torch.device:
    """The CUDA device, or exit with status 2 and a message saying why nothing can be measured."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU, and torch {torch.__version__} sees none "
              f"(torch.version.cuda={torch.version.cuda}). Run it on a GPU machine, e.g. bench/run_gpu.sh.",
              file=sys.stderr)
        raise SystemExit(NO_GPU_EXIT)
    return torch.device("cuda")


def commit() -> str:
    """$PRUNEKIT_COMMIT (a copied tree without .git, e.g. the device machine), else git's short hash with
    "+dirty" when tracked files differ from it, else "unknown"."""
    if os.environ.get("PRUNEKIT_COMMIT"):
        return os.environ["PRUNEKIT_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=BENCH_DIR).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_run_info(threads: int) -> dict:
    """What a CPU-only quality bench records about its run: CPU, threads, torch, commit, date."""
    return {"cpu": cpu_name(), "threads": threads, "torch": torch.__version__, "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def run_info(script: str, device, argv: Sequence[str] | None = None, **extra) -> dict:
    """What a result file says about the run as a whole (device, date, commit, versions, arguments)."""
    info = {"script": script, "device": device_name(device), "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "argv": list(sys.argv[1:] if argv is None else argv)}
    try:
        import prunekit
        info["backends"] = prunekit.backends()
    except Exception as exc:  # the numbers still mean something; say why the backends are unknown
        info["backends"] = f"unavailable: {type(exc).__name__}: {exc}"
    return {**info, **extra}


# ---- timing --------------------------------------------------------------------------------------

def summarize(samples: Sequence[float], unit: str) -> dict:
    """Median and 10th/90th percentiles (nearest rank) of timing samples in `unit` ("us" or "ms")."""
    s = sorted(samples)
    if not s:
        raise ValueError("summarize: no timing samples")
    return {f"time_{unit}": statistics.median(s), f"p10_{unit}": s[len(s) // 10],
            f"p90_{unit}": s[(len(s) * 9) // 10], "samples": len(s)}


def _capture(calls: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    from prunekit.ops._timing import capture_graph  # the library's own capture (warm-up on a side stream)
    return capture_graph(calls)


def time_calls(calls: Sequence[Callable[[], object]], *, graph: bool = True, samples: int = 30,
               min_sample_us: float = 300.0) -> dict:
    """Per-call microseconds of running `calls` in sequence (one call per rotated weight buffer): each
    sample times enough back-to-back repetitions to last `min_sample_us`, so launch noise averages out."""
    if graph:
        run = _capture(calls).replay
    else:
        def run():
            for call in calls:
                call()
    from prunekit.ops._timing import replay_times_us  # the dispatcher's own timer: benches time as it does
    per_call = replay_times_us(run, len(calls), samples, min_sample_us, warmup=3)
    return summarize(per_call, "us")


def time_once_ms(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> dict:
    """Milliseconds of one fn() between CUDA events, `repeats` times after `warmup` untimed calls; for
    slow work (a whole layer's pruning) where one call is already far above launch noise."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return summarize(times, "ms")


def wall_time_ms(fn: Callable[[], object]) -> dict:
    """One run of fn() on the host clock with the device synchronized on both sides (whole pipelines that
    mix host and device work and cannot be repeated on the same state)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return summarize([(time.perf_counter() - start) * 1e3], "ms")


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the yardstick of bytes floors."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_once_ms(lambda: dst.copy_(src), warmup=2, repeats=10)
    del src, dst
    return 2 * nbytes / (t["time_ms"] * 1e-3) / 1e9


# ---- rows and outputs ----------------------------------------------------------------------------

def _seconds(timing: dict) -> float:
    return timing["time_us"] * 1e-6 if "time_us" in timing else timing["time_ms"] * 1e-3


def _rounded(value, digits: int = 6):
    """Floats to `digits` significant digits (JSON stays readable; tiny values keep their precision)."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def row(run: dict, op: str, provider: str, *, shape: str, dtype, timing: dict, M: int | None = None,
        mode: str = "eager", flops: float | None = None, bytes_moved: float | None = None, **extras) -> dict:
    """One result row in the shared schema (module docstring); `run` supplies device and commit."""
    seconds = _seconds(timing)
    return {"op": op, "provider": provider, "shape": shape,
            "dtype": str(dtype).removeprefix("torch."), "M": M, "mode": mode,
            **{k: _rounded(v) for k, v in timing.items()},
            "tflops": None if flops is None else _rounded(flops / seconds / 1e12, 4),
            "gbps": None if bytes_moved is None else _rounded(bytes_moved / seconds / 1e9, 4),
            "device": run["device"], "commit": run["commit"],
            "extras": {k: _rounded(v) for k, v in extras.items()}}


def write_results(out_dir: str | Path, name: str, run: dict, rows: list[dict]) -> Path:
    """DIR/name.json ({"run", "rows"}) and DIR/name.md (its tables); returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"run": run, "rows": rows}, indent=1) + "\n")
    (out / f"{name}.md").write_text(results_table.render(run, rows))
    return path


def add_out_arg(parser) -> None:
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"directory for <script>.json and <script>.md (default {DEFAULT_OUT})")

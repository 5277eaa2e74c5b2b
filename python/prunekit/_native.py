"""Loads the native modules and remembers why one did not load.

`_C` (C++ CPU kernels) and `_C_cuda` (CUDA kernels) take raw pointers, sizes and a CUDA stream; they
never link libtorch (DESIGN.md §3). Everything here is about handing them tensors safely.
"""
from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger("prunekit")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_modules: dict[str, object] = {}
_errors: dict[str, str] = {}


def _load(name: str):
    if name in _modules:
        return _modules[name]
    if name in _errors:
        return None
    try:
        mod = importlib.import_module(f"prunekit.{name}")
    except ImportError as exc:  # not built, or built for another ABI
        _errors[name] = f"{type(exc).__name__}: {exc}"
        log.debug("prunekit.%s did not load: %s", name, exc)
        return None
    _modules[name] = mod
    return mod


def cpu_module():
    """The C++ CPU module, or None (see `backends()` for why)."""
    return _load("_C")


def cuda_module():
    """The CUDA module, or None (see `backends()` for why)."""
    return _load("_C_cuda")


def require_cpu_module():
    mod = cpu_module()
    if mod is None:
        raise RuntimeError(f"prunekit._C (C++ CPU kernels) is not available: {_errors.get('_C')}. "
                           "Reinstall prunekit from source (pip install .) to build it.")
    return mod


def require_cuda_module():
    mod = cuda_module()
    if mod is None:
        raise RuntimeError(
            "prunekit._C_cuda (CUDA kernels) is not available: "
            f"{_errors.get('_C_cuda')}. Build prunekit where nvcc is present (PRUNEKIT_CUDA=ON "
            "pip install .), or pass the tensors on CPU.")
    return mod


def triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"ImportError: {exc}"
    return True, ""


def backends() -> dict[str, dict[str, object]]:
    """Which execution paths are live, and why the others are not."""
    report: dict[str, dict[str, object]] = {}
    cpu = cpu_module()
    report["cpu"] = {"available": cpu is not None, "reason": _errors.get("_C", "")}
    cuda = cuda_module()
    cuda_info: dict[str, object] = {"available": False, "compiled": cuda is not None,
                                    "reason": _errors.get("_C_cuda", "")}
    if cuda is not None:  # built with CUDA; available only where a device answers
        cuda_info["runtime_version"] = cuda.CUDA_RUNTIME_VERSION
        try:
            cuda_info["devices"] = cuda.device_count()
        except RuntimeError as exc:
            cuda_info["devices"] = 0
            cuda_info["reason"] = f"no usable CUDA device (no GPU or NVIDIA driver here?): {exc}"
        else:
            cuda_info["available"] = cuda_info["devices"] > 0
            if not cuda_info["available"]:
                cuda_info["reason"] = "built with CUDA, but no CUDA device is visible"
        if hasattr(cuda, "SPARSE24_MMA_SP_FORM"):  # the decode kernel's instruction (CUDA < 12.5: plain mma.sp)
            form = cuda.SPARSE24_MMA_SP_FORM
            cuda_info["sparse24_mma_sp"] = {
                "form": form,
                "reason": "" if form.endswith("ordered_metadata") else
                "built with CUDA < 12.5 (no PTX ISA 8.5): plain mma.sp, same results with prunekit's ascending "
                "metadata; rebuild with CUDA >= 12.5 for the ordered form"}
        if hasattr(cuda, "sparse24_sm90_compiled"):  # the Hopper 2:4 prefill GEMM needs CUTLASS at build time
            cuda_info["sparse24_sm90"] = {"available": bool(cuda.sparse24_sm90_compiled()),
                                          "reason": cuda.sparse24_sm90_reason()}
    report["cuda"] = cuda_info
    ok, why = triton_available()
    report["triton"] = {"available": ok, "reason": why}
    report["torch"] = {"version": torch.__version__, "cuda_available": torch.cuda.is_available()}
    return report


def dtype_code(t: torch.Tensor, name: str) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: dtype {t.dtype} has no native kernel; expected one of "
                        f"{sorted(str(d) for d in DTYPE_CODES)}") from None


def stream_of(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device (0 on CPU)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream

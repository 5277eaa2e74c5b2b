"""Python side of the CPU sparse linear kernels (csrc/cpu/sparse_linear_cpu.cpp, csrc/cpu/isa/): checks the
tensors, hands pointers to `_C.sparse_linear_cpu`, returns y. Two weight formats:

- 2:4: `values` [N, K/2] + `meta` uint8 [N, K/8], the logical format (ref/pack24.py) read as is.
- bitmask (unstructured): `values` [nnz + 16] (the kept weights row after row, then 16 padding elements the
  SIMD loads may read), `mask` uint8 [N, K/8] (bit j of byte b: input 8b + j kept), `row_offsets` int64
  [N + 1]. Reference and packing: ref/bitmask.py.

ISA: the best this CPU runs unless `isa` (or PRUNEKIT_CPU_ISA) says auto|scalar|avx2|avx512|avx512bf16 (the
last: AVX-512 plus AVX512-BF16 and VBMI2, e.g. Zen 4 / Sapphire Rapids: vdpbf16ps for bf16 2:4 at M > 1 and
the kept-values-only bitmask kernel at M = 1); asking for one the CPU lacks raises. Threads: torch.get_num_threads() unless given (the kernels run their own OpenMP
pool, sized per call).
"""
from __future__ import annotations

import os

import torch

from .. import _native

ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx512bf16": 4}
ISA_NAMES = {code: name for name, code in ISA_CODES.items()}
ENV_ISA = "PRUNEKIT_CPU_ISA"
FORMAT_24, FORMAT_BITMASK = 0, 1
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PADDING = 16  # elements after the last bitmask value that the SIMD loads may touch


def available() -> bool:
    mod = _native.cpu_module()
    return mod is not None and hasattr(mod, "sparse_linear_cpu")


def best_isa() -> str:
    return ISA_NAMES[_native.require_cpu_module().cpu_best_isa()]


def isa_supported(isa: str) -> bool:
    return bool(_native.require_cpu_module().cpu_isa_supported(ISA_CODES[isa]))


_isa_codes: dict[str, int] = {}  # validated ISA name -> code (the CPU does not change within a process)


def _isa_code(isa: str | None) -> int:
    isa = isa or os.environ.get(ENV_ISA, "auto")
    code = _isa_codes.get(isa)
    if code is None:
        if isa not in ISA_CODES:
            raise ValueError(f"{ENV_ISA} / isa must be one of {sorted(ISA_CODES)}, got {isa!r}")
        if not isa_supported(isa):
            raise RuntimeError(f"sparse CPU kernels: this CPU cannot run the {isa} path (best: {best_isa()})")
        code = _isa_codes[isa] = ISA_CODES[isa]
    return code


def _check_common(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, N: int, K: int) -> None:
    if values.dtype not in DTYPES:
        raise TypeError(f"values: expected float32/bfloat16/float16, got {values.dtype}")
    if x.dtype != values.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the sparse weight has {values.dtype}; cast one of them")
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dimension {K} (in_features), got shape {tuple(x.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != values.dtype):
        raise ValueError(f"bias: expected shape ({N},) and dtype {values.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("x", x), ("values", values), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name}: the sparse CPU kernels need CPU tensors, got {t.device}")


def _run(x, values, meta, row_offsets, bias, N, K, fmt, isa, threads) -> torch.Tensor:
    x2d = x if x.dim() == 2 else x.reshape(-1, K)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # held here: the kernel reads it through a raw pointer
    y = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype)
    _native.require_cpu_module().sparse_linear_cpu(
        x2d.data_ptr(), values.data_ptr(), meta.data_ptr(), 0 if row_offsets is None else row_offsets.data_ptr(),
        0 if bias is None else bias.data_ptr(), y.data_ptr(), x2d.shape[0], N, K,
        _native.dtype_code(values, "values"), fmt, _isa_code(isa), threads or torch.get_num_threads())
    return y


def run_validated(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, row_offsets: torch.Tensor | None,
                  bias: torch.Tensor | None, N: int, K: int, fmt: int) -> torch.Tensor:
    """The kernel without the per-call checks, for a caller that validated its tensors once: a sparse layer's
    own packed weight (checked when packed or loaded; contiguous) and an x of the weight's dtype, on the CPU,
    with K inputs (nn/cpu_route.py checks those per call). ~1 us of Python instead of ~10 us: on a 384-wide
    layer the checks cost as much as the kernel."""
    return _run(x, values, meta, row_offsets, bias, N, K, fmt, None, None)


def s24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None, *,
               isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T + bias, W in the logical 2:4 format. The metadata is trusted (validated when packed/loaded)."""
    N, K = values.shape[0], 2 * values.shape[1]
    _check_common(x, values, bias, N, K)
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (N, K // 8) or K % 8:
        raise ValueError(f"values {tuple(values.shape)} and meta {tuple(meta.shape)} {meta.dtype} do not describe "
                         "one 2:4 weight (values [N, K/2], meta uint8 [N, K/8], K % 8 == 0)")
    return _run(x, values.contiguous(), meta.contiguous(), None, bias, N, K, FORMAT_24, isa, threads)


def bitmask_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor,
                   bias: torch.Tensor | None = None, *, isa: str | None = None,
                   threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T + bias, W in the bitmask format (module docstring). row_offsets is trusted to match
    the mask (it is derived from it when packed or loaded)."""
    N, K = mask.shape[0], 8 * mask.shape[1]
    _check_common(x, values, bias, N, K)
    if mask.dtype != torch.uint8 or mask.dim() != 2:
        raise ValueError(f"mask: expected uint8 [N, K/8], got {tuple(mask.shape)} {mask.dtype}")
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (N + 1,):
        raise ValueError(f"row_offsets: expected int64 [{N + 1}], got {tuple(row_offsets.shape)} {row_offsets.dtype}")
    if values.dim() != 1 or values.numel() < int(row_offsets[-1]) + PADDING:
        raise ValueError(f"values: expected 1-D with at least nnz + {PADDING} = {int(row_offsets[-1]) + PADDING} "
                         f"elements, got {tuple(values.shape)}")
    return _run(x, values.contiguous(), mask.contiguous(), row_offsets.contiguous(), bias, N, K, FORMAT_BITMASK,
                isa, threads)


def bitmask_unpack(values: torch.Tensor, mask: torch.Tensor, *, isa: str | None = None,
                   threads: int | None = None) -> torch.Tensor:
    """The dense [N, K] weight of a bitmask (values, mask), equal bit for bit to ref/bitmask.unpack (C++:
    csrc/cpu/bitmask_unpack.cpp; AVX-512 vpexpandd on the avx512 paths, a portable loop on avx2/scalar)."""
    if mask.dtype != torch.uint8 or mask.dim() != 2:
        raise ValueError(f"mask: expected uint8 [N, K/8], got {tuple(mask.shape)} {mask.dtype}")
    if values.dtype not in DTYPES or values.dim() != 1:
        raise ValueError(f"values: expected a 1-D float32/bfloat16/float16 tensor, got {tuple(values.shape)} "
                         f"{values.dtype}")
    for name, t in (("values", values), ("mask", mask)):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the CPU bitmask unpack needs CPU tensors, got {t.device}")
    values, mask = values.contiguous(), mask.contiguous()
    N, K = mask.shape[0], 8 * mask.shape[1]
    W = torch.empty(N, K, dtype=values.dtype)
    nnz = _native.require_cpu_module().bitmask_unpack(values.data_ptr(), values.numel(), mask.data_ptr(), W.data_ptr(),
                                                      N, K, values.element_size(), _isa_code(isa),
                                                      threads or torch.get_num_threads())
    if values.numel() != nnz + PADDING:
        raise ValueError(f"values: expected {nnz} kept values + {PADDING} padding for this mask, got "
                         f"{tuple(values.shape)}")
    return W

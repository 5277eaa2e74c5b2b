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


def _isa_code(isa: str | None) -> int:
    isa = isa or os.environ.get(ENV_ISA, "auto")
    if isa not in ISA_CODES:
        raise ValueError(f"{ENV_ISA} / isa must be one of {sorted(ISA_CODES)}, got {isa!r}")
    if not isa_supported(isa):
        raise RuntimeError(f"sparse CPU kernels: this CPU cannot run the {isa} path (best: {best_isa()})")
    return ISA_CODES[isa]


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
    mod = _native.require_cpu_module()
    x2d = x.reshape(-1, K).contiguous()
    M = x2d.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    bias = None if bias is None else bias.contiguous()
    mod.sparse_linear_cpu(x2d.data_ptr(), values.data_ptr(), meta.data_ptr(),
                          0 if row_offsets is None else row_offsets.data_ptr(),
                          0 if bias is None else bias.data_ptr(), y.data_ptr(), M, N, K,
                          _native.dtype_code(values, "values"), fmt, _isa_code(isa),
                          threads or torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)


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

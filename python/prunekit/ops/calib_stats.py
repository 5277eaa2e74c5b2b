"""Custom ops that fold one activation batch into the running calibration statistics.

`prunekit::act_norm_sq_update` (Wanda's per-feature squared norm) and `prunekit::hessian_update`
(SparseGPT's H = 2/n·ΣXᵀX) return the updated statistic; the reference in ref/calib_stats.py is the
default body and the CPU path. On CUDA each reads the activation once in its own dtype: the norm with a
Triton kernel that upcasts in registers, the Hessian — for bf16/fp16 activations — on tensor cores with
fp32 accumulation (a bf16 or fp16 product is exact in fp32, so only the summation order differs from
the fp32 reference; DESIGN.md §4 saving 3).
"""
from __future__ import annotations

import logging

import torch

from ..ref import calib_stats as ref
from . import _dispatch, selfcheck

# Statistics differ from the fp32 reference only in summation order (~1e-6); the loose bound leaves room
# for a reference run with TF32 allowed, and still catches a wrong kernel (errors of order 1).
COMPARE = selfcheck.rows_within(5e-3)
PROBE_ROWS = 64

log = logging.getLogger("prunekit")

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, stat: torch.Tensor, stat_name: str, nsamples: int, batch: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"{stat_name} update: activation must be 2-D [tokens, features], got {tuple(x.shape)}")
    if stat.dtype != torch.float32:
        raise TypeError(f"{stat_name} update: the statistic must be float32, got {stat.dtype}")
    if stat.shape[-1] != x.shape[1]:
        raise ValueError(f"{stat_name} update: statistic of shape {tuple(stat.shape)} does not match "
                         f"{x.shape[1]} input features")
    if x.device != stat.device:
        raise ValueError(f"{stat_name} update: activation on {x.device} but statistic on {stat.device}")
    if nsamples < 0 or batch < 1:
        raise ValueError(f"{stat_name} update: need nsamples >= 0 and batch >= 1, got {nsamples}, {batch}")


@torch.library.custom_op("prunekit::act_norm_sq_update", mutates_args=())
def act_norm_sq_update(x: torch.Tensor, norm_sq: torch.Tensor, nsamples: int, batch: int) -> torch.Tensor:
    """norm_sq * n/(n+b) + Σ_rows x² / (n+b): Wanda's running mean after `batch` more samples."""
    _check(x, norm_sq, "activation norm", nsamples, batch)
    return ref.act_norm_sq_update(x, norm_sq, nsamples, batch)


@act_norm_sq_update.register_fake
def _(x, norm_sq, nsamples, batch):
    return torch.empty_like(norm_sq)


@act_norm_sq_update.register_kernel("cuda")
def _(x, norm_sq, nsamples, batch):
    _check(x, norm_sq, "activation norm", nsamples, batch)
    return selfcheck.run("act_norm_sq_update", [selfcheck.Route("triton", _triton_norm_update)],
                         ref.act_norm_sq_update, (x, norm_sq, nsamples, batch),
                         probe=lambda: (selfcheck.head_rows(x, PROBE_ROWS), norm_sq, nsamples, batch),
                         compare=COMPARE, device=x.device, dtype=x.dtype, shape_class=(x.shape[1],))


def _triton_norm_update(x, norm_sq, nsamples, batch):
    from prunekit.kernels.calib_stats import sum_sq_triton

    total = nsamples + batch
    return norm_sq * (nsamples / total) + sum_sq_triton(_dispatch.contiguous(x)) / total


@torch.library.custom_op("prunekit::hessian_update", mutates_args=())
def hessian_update(x: torch.Tensor, hessian: torch.Tensor, nsamples: int, batch: int) -> torch.Tensor:
    """hessian * n/(n+b) + 2/(n+b) · XᵀX in fp32: SparseGPT's running Hessian after `batch` more samples."""
    _check(x, hessian, "Hessian", nsamples, batch)
    return ref.hessian_update(x, hessian, nsamples, batch)


@hessian_update.register_fake
def _(x, hessian, nsamples, batch):
    return torch.empty_like(hessian)


def tensor_core_hessian_available() -> bool:
    """torch >= 2.8 has addmm(..., out_dtype=float32) for fp16/bf16 inputs on CUDA."""
    return hasattr(torch.ops.aten.addmm, "dtype")


@hessian_update.register_kernel("cuda")
def _(x, hessian, nsamples, batch):
    _check(x, hessian, "Hessian", nsamples, batch)
    if x.dtype not in HALF_DTYPES or not tensor_core_hessian_available():
        if x.dtype in HALF_DTYPES:
            log.debug("torch %s has no addmm out_dtype: Hessian accumulates in fp32", torch.__version__)
        return ref.hessian_update(x, hessian, nsamples, batch)
    return selfcheck.run("hessian_update", [selfcheck.Route("tensor_core", _tensor_core_hessian)],
                         ref.hessian_update, (x, hessian, nsamples, batch),
                         probe=lambda: (selfcheck.head_rows(x, PROBE_ROWS), hessian, nsamples, batch),
                         compare=COMPARE, device=x.device, dtype=x.dtype, shape_class=(x.shape[1],))


def _tensor_core_hessian(x, hessian, nsamples, batch):
    total = nsamples + batch
    # One GEMM reads the bf16/fp16 activation directly; beta/alpha apply the running-mean rescaling
    # in the epilogue, so H is read and written once.
    return torch.addmm(hessian, x.t(), x, out_dtype=torch.float32, beta=nsamples / total, alpha=2.0 / total)

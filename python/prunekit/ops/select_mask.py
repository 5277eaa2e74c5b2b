"""Keep-mask selection ops (True = kept), exact to prunekit/ref/selection.py including ties.

- `prunekit::row_keep_mask(scores, sparsity)`: per row prune the int(width * sparsity) lowest.
- `prunekit::nm_keep_mask(scores, n, m)`: keep the n highest of every m consecutive scores.
- `prunekit::wanda_keep_mask(W, act_norm_sq, sparsity, n, m)`: Wanda in one pass over W, scoring
  |W| * sqrt(act_norm_sq) in float32 and selecting per row (m = 0) or per N:M group.
- `prunekit::tensor_keep_mask(scores, sparsity)`: over the whole tensor prune the int(numel * sparsity)
  lowest (SparseGPT's per-block selection) — a k-th value select, not a sort, on every device.

CPU runs the C++ kernels of `_C` (csrc/cpu/nm_select.cpp), CUDA runs Triton (kernels/select_mask.py).
Both work in float32, which orders float16/bfloat16 scores exactly; float64 inputs run the reference.
"""
from __future__ import annotations

import logging

import torch

from .. import _native, _validate
from ..ref import selection
from . import _dispatch, selfcheck

log = logging.getLogger("prunekit")

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    _validate.float_tensor(scores, name, ndim=2)


def _check_nm(n: int, m: int, width: int, name: str) -> None:
    _validate.n_m(n, m, width, name)


def _check_wanda(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity: float, n: int, m: int) -> None:
    _validate.float_tensor(W, "W", ndim=2)
    _validate.float_tensor(act_norm_sq, "act_norm_sq", ndim=1)
    _validate.shape(act_norm_sq, (W.shape[1],), "act_norm_sq")
    _validate.same_device("W", W, "act_norm_sq", act_norm_sq)
    if m:
        _check_nm(n, m, W.shape[1], "W")
    else:
        _validate.sparsity(sparsity)


def _wanda_reference(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    # As in locuslab/wanda: |W| * sqrt(scaler_row); float16/bfloat16 W promotes to float32.
    metric = W.abs() * act_norm_sq.float().sqrt()
    return selection.nm_keep_mask(metric, n, m) if m else selection.row_keep_mask(metric, sparsity)


def _cpu_module_or_none(op: str):
    mod = _native.cpu_module()
    if mod is None:
        log.warning("prunekit::%s runs the PyTorch reference: prunekit._C did not load (%s)", op,
                    _native._errors.get("_C", "not loaded"))
    return mod


def _triton_kernels_or_none(op: str):
    ok, why = _native.triton_available()
    if ok:
        from ..kernels import select_mask
        return select_mask
    if _dispatch.reference_allowed():
        return None
    raise RuntimeError(f"prunekit::{op} got CUDA tensors but Triton is not importable ({why}). Install "
                       "triton, or set PRUNEKIT_ALLOW_REFERENCE=1 to run the PyTorch reference.")


PROBE_ROWS = 4  # rows are selected independently, so a few rows of the real input are a fair probe


def _checked(op: str, kernel, reference, src: torch.Tensor, shape_class) -> torch.Tensor:
    """The Triton kernel, self-checked on first use against the reference (exact) on a few rows of src;
    the reference when the kernel is disabled (ops/selfcheck.py)."""
    return selfcheck.run(op, [selfcheck.Route("triton", kernel)], reference, (src,),
                         probe=lambda: (selfcheck.head_rows(src, PROBE_ROWS),), compare=selfcheck.exact,
                         device=src.device, dtype=src.dtype, shape_class=shape_class)


def _new_mask(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=torch.bool, device=like.device)


# ---- row_keep_mask ----

@torch.library.custom_op("prunekit::row_keep_mask", mutates_args=())
def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row of a 2-D score matrix, prune the int(width * sparsity) lowest scores."""
    _check_scores(scores)
    return selection.row_keep_mask(scores, _validate.sparsity(sparsity))


@row_keep_mask.register_fake
def _(scores, sparsity):
    _check_scores(scores)
    return _new_mask(scores)


@row_keep_mask.register_kernel("cpu")
def _(scores, sparsity):
    _check_scores(scores)
    n_prune = int(scores.shape[1] * _validate.sparsity(sparsity))
    mod = _cpu_module_or_none("row_keep_mask")
    if mod is None or scores.dtype not in _KERNEL_DTYPES:
        return selection.row_keep_mask(scores, sparsity)
    src = _dispatch.contiguous(scores.float())
    keep = _new_mask(src)
    mod.row_keep_mask(src.data_ptr(), keep.data_ptr(), src.shape[0], src.shape[1], n_prune)
    return keep


@row_keep_mask.register_kernel("cuda")
def _(scores, sparsity):
    _check_scores(scores)
    sparsity = _validate.sparsity(sparsity)
    kernels = _triton_kernels_or_none("row_keep_mask")
    if kernels is None or scores.dtype not in _KERNEL_DTYPES:
        return selection.row_keep_mask(scores, sparsity)
    return _checked("row_keep_mask", lambda s: kernels.row_keep_mask_triton(s, sparsity),
                    lambda s: selection.row_keep_mask(s, sparsity), _dispatch.contiguous(scores),
                    shape_class=(scores.shape[1], sparsity))


# ---- nm_keep_mask ----

@torch.library.custom_op("prunekit::nm_keep_mask", mutates_args=())
def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive scores of a row keep the n highest."""
    _check_scores(scores)
    _check_nm(n, m, scores.shape[1], "scores")
    return selection.nm_keep_mask(scores, n, m)


@nm_keep_mask.register_fake
def _(scores, n, m):
    _check_scores(scores)
    _check_nm(n, m, scores.shape[1], "scores")
    return _new_mask(scores)


@nm_keep_mask.register_kernel("cpu")
def _(scores, n, m):
    _check_scores(scores)
    _check_nm(n, m, scores.shape[1], "scores")
    mod = _cpu_module_or_none("nm_keep_mask")
    if mod is None or scores.dtype not in _KERNEL_DTYPES:
        return selection.nm_keep_mask(scores, n, m)
    src = _dispatch.contiguous(scores.float())
    keep = _new_mask(src)
    mod.nm_keep_mask(src.data_ptr(), keep.data_ptr(), src.shape[0], src.shape[1], n, m)
    return keep


@nm_keep_mask.register_kernel("cuda")
def _(scores, n, m):
    _check_scores(scores)
    _check_nm(n, m, scores.shape[1], "scores")
    kernels = _triton_kernels_or_none("nm_keep_mask")
    if kernels is None or scores.dtype not in _KERNEL_DTYPES:
        return selection.nm_keep_mask(scores, n, m)
    return _checked("nm_keep_mask", lambda s: kernels.nm_keep_mask_triton(s, n, m),
                    lambda s: selection.nm_keep_mask(s, n, m), _dispatch.contiguous(scores),
                    shape_class=(scores.shape[1], n, m))


# ---- wanda_keep_mask ----

@torch.library.custom_op("prunekit::wanda_keep_mask", mutates_args=())
def wanda_keep_mask(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """Wanda keep mask of W [out, in] given the per-input mean squared norms act_norm_sq [in]:
    per row prune int(in * sparsity) (m = 0), or keep n of every m (sparsity unused)."""
    _check_wanda(W, act_norm_sq, sparsity, n, m)
    return _wanda_reference(W, act_norm_sq, sparsity, n, m)


@wanda_keep_mask.register_fake
def _(W, act_norm_sq, sparsity, n, m):
    _check_wanda(W, act_norm_sq, sparsity, n, m)
    return _new_mask(W)


@wanda_keep_mask.register_kernel("cpu")
def _(W, act_norm_sq, sparsity, n, m):
    _check_wanda(W, act_norm_sq, sparsity, n, m)
    mod = _cpu_module_or_none("wanda_keep_mask")
    if mod is None or W.dtype not in _KERNEL_DTYPES:
        return _wanda_reference(W, act_norm_sq, sparsity, n, m)
    src = _dispatch.contiguous(W)
    # torch's sqrt is correctly rounded like the reference's; the kernel only multiplies.
    sqrt_norm = _dispatch.contiguous(act_norm_sq.float().sqrt())
    keep = _new_mask(src)
    n_prune = 0 if m else int(W.shape[1] * sparsity)
    mod.wanda_keep_mask(src.data_ptr(), _native.dtype_code(src, "W"), sqrt_norm.data_ptr(), keep.data_ptr(),
                        src.shape[0], src.shape[1], n_prune, n, m)
    return keep


@wanda_keep_mask.register_kernel("cuda")
def _(W, act_norm_sq, sparsity, n, m):
    _check_wanda(W, act_norm_sq, sparsity, n, m)
    kernels = _triton_kernels_or_none("wanda_keep_mask")
    if kernels is None or W.dtype not in _KERNEL_DTYPES:
        return _wanda_reference(W, act_norm_sq, sparsity, n, m)
    return _checked("wanda_keep_mask", lambda w: kernels.wanda_keep_mask_triton(w, act_norm_sq, sparsity, n, m),
                    lambda w: _wanda_reference(w, act_norm_sq, sparsity, n, m), _dispatch.contiguous(W),
                    shape_class=(W.shape[1], sparsity, n, m))


# ---- tensor_keep_mask ----

@torch.library.custom_op("prunekit::tensor_keep_mask", mutates_args=())
def tensor_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Over the whole tensor, prune the int(numel * sparsity) lowest scores (ties: lower index first)."""
    _validate.float_tensor(scores, "scores")
    return selection.tensor_keep_mask(scores, _validate.sparsity(sparsity))


@tensor_keep_mask.register_fake
def _(scores, sparsity):
    _validate.float_tensor(scores, "scores")
    return _new_mask(scores)


@tensor_keep_mask.register_kernel(["cpu", "cuda"])
def _(scores, sparsity):
    _validate.float_tensor(scores, "scores")
    flat = scores.reshape(-1)
    n_prune = int(flat.numel() * _validate.sparsity(sparsity))
    if n_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # The n_prune-th smallest value is the threshold: everything below it goes, and of the values equal
    # to it the lowest-index ones, until n_prune are gone (what a stable sort would pick). No host sync.
    threshold = torch.kthvalue(flat, n_prune).values
    below = flat < threshold
    ties = flat == threshold
    tie_budget = n_prune - below.sum()
    pruned = below | (ties & (torch.cumsum(ties, 0) <= tie_budget))
    return (~pruned).reshape(scores.shape)

"""Weight reconstruction with the mask fixed: the exact least-squares update of the kept weights.

For each output row w (dense) with kept support S and pruned set P, minimize the row's error on the
damped Hessian Hd = H + λI over the kept values ŵ_S (ŵ_P = 0):

    min (w − ŵ)ᵀ Hd (w − ŵ)   ⇒   ŵ_S = w_S + (Hd_SS)⁻¹ Hd_SP w_P

the normal equations of the row's least-squares problem on the calibration inputs. Damping as in
SparseGPT: dead inputs (H_ii = 0) get H_ii = 1, λ = percdamp · mean(diag(H)); the damping pulls the
kept weights toward their dense values. The mask is unchanged, so a 2:4 layer stays exactly 2:4.

Rows are solved batched: rows with the same support share one factorization (torch.unique over mask
rows), supports with the same size are stacked into batched Cholesky solves of at most `max_bytes`.
A factorization that fails (Hd_SS not numerically positive definite) retries in float64, then with
damping x10 per step, and says so in the notes. The plain reference (one dense solve per row) is
prunekit.ref.least_squares.

`LeastSquares` (the refinement step) keeps, per row, whichever of the input and the solved weights has
the lower *undamped* error (RefineStep.apply), so the step never raises the layer's reconstruction error.
"""
from __future__ import annotations

import torch

from .. import _validate
from .damping import MAX_PERCDAMP, damping_ladder
from .refine import RefineStep



def damped_hessian(H: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H with dead inputs' diagonal set to 1 and λ = percdamp · mean(diag) added to the diagonal."""
    Hd = H.to(dtype, copy=True)
    diag = Hd.diagonal()
    diag[diag == 0] = 1
    diag.add_(percdamp * torch.mean(diag))
    return Hd


def _solve(W: torch.Tensor, mask: torch.Tensor, Hd: torch.Tensor, max_bytes: int) -> torch.Tensor | None:
    """The kept weights' solution on Hd (W, Hd in one dtype); None when a factorization fails."""
    out = W * mask
    rhs = (W * ~mask) @ Hd                     # row r: Hd · w_P (Hd symmetric); its S entries are Hd_SP w_P
    supports, which = torch.unique(mask, dim=0, return_inverse=True)
    sizes = supports.sum(1)
    rows_of = torch.argsort(which, stable=True)     # rows grouped by support, in row order inside a group
    counts = torch.bincount(which, minlength=supports.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    item = Hd.element_size()
    for k in torch.unique(sizes).tolist():
        if k == 0:
            continue
        group = torch.nonzero(sizes == k).flatten()
        widest = int(counts[group].max())
        chunk = max(1, max_bytes // (item * k * (k + widest)))
        for c0 in range(0, group.numel(), chunk):
            sup = group[c0:c0 + chunk]
            idx = torch.nonzero(supports[sup])[:, 1].reshape(sup.numel(), k)   # ascending kept indices
            A = Hd[idx[:, :, None], idx[:, None, :]]
            L, info = torch.linalg.cholesky_ex(A)
            if bool((info != 0).any()):
                return None
            # rows of each support as columns of one right-hand side (padded to the widest support)
            cnt = counts[sup]
            width = int(cnt.max())
            slot = torch.arange(width, device=W.device)
            valid = slot[None, :] < cnt[:, None]                                  # [b, width]
            rows = rows_of[(starts[sup][:, None] + slot[None, :]).clamp(max=rows_of.numel() - 1)]
            rows = torch.where(valid, rows, torch.zeros_like(rows))
            B = rhs[rows[:, :, None], idx[:, None, :]].mT                         # [b, k, width]
            X = torch.cholesky_solve(B, L)
            r = rows[valid]
            cols = idx[:, None, :].expand(-1, width, -1)[valid]                   # [n_rows, k]
            out[r[:, None], cols] += X.mT[valid]
    return out


def least_squares_weights(W: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01, *,
                          name: str = "layer", max_bytes: int = 1 << 28):
    """The kept weights' least-squares values on H + λI with `mask` fixed.

    W: the dense weight [out, in]; mask: bool, True = kept; H: [in, in] = 2/n·XᵀX.
    Returns (weight float32 with zeros outside the mask, the percdamp used, notes).
    """
    _validate.float_tensor(W, f"{name}.weight", ndim=2)
    _validate.finite(W, f"{name}.weight")
    _validate.shape(mask, tuple(W.shape), f"{name} mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} mask: expected a bool tensor, got {mask.dtype}")
    _validate.float_tensor(H, f"{name} Hessian", ndim=2)
    _validate.shape(H, (W.shape[1], W.shape[1]), f"{name} Hessian")
    _validate.same_device(f"{name}.weight", W, f"{name} Hessian", H)
    _validate.finite(H, f"{name} Hessian")
    if not percdamp >= 0:
        raise ValueError(f"percdamp: expected a non-negative number, got {percdamp}")
    attempts = damping_ladder(percdamp)
    for used, dtype in attempts:
        out = _solve(W.to(dtype), mask, damped_hessian(H, used, dtype), max_bytes)
        if out is None:
            continue
        notes = []
        if (used, dtype) != attempts[0]:
            notes.append(f"{name}: least squares: the float32 Cholesky of the kept block of H + "
                         f"{percdamp:g}·mean(diag(H))·I failed; used damping {used:g}·mean(diag(H)) in "
                         f"{str(dtype).removeprefix('torch.')}")
        return out.float(), used, notes
    raise RuntimeError(f"{name}: least squares: H is not positive definite even with damping "
                       f"{MAX_PERCDAMP:g}·mean(diag(H)) in float64; check the calibration inputs")


class LeastSquares(RefineStep):
    """Refinement step: re-solve the kept weights by least squares on the layer's H, mask fixed.

    percdamp: relative damping λ = percdamp · mean(diag(H)), as SparseGPT's (default 0.01).
    Rows whose solved weights have a higher undamped error than their input keep the input (damping
    makes this possible, rarely; RefineStep.apply); the record counts rows solved and rows reverted.
    """

    def __init__(self, percdamp: float = 0.01, max_bytes: int = 1 << 28):
        if not percdamp >= 0:
            raise ValueError(f"LeastSquares percdamp: expected a non-negative number, got {percdamp}")
        self.percdamp, self.max_bytes = float(percdamp), int(max_bytes)

    def refine(self, dense, result, H, name):
        solved, _, notes = least_squares_weights(dense, result.mask, H, self.percdamp, name=name,
                                                 max_bytes=self.max_bytes)
        return solved, result.mask, int(result.mask.any(1).sum()), notes

    def __repr__(self) -> str:
        return f"LeastSquares(percdamp={self.percdamp:g})"

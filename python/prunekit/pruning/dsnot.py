"""Mask refinement without training: prune-and-grow swaps that lower the layer's reconstruction error.

After DSnoT (Zhang et al., "Dynamic Sparse No Training", ICLR 2024): starting from a pruned layer, each
output row repeatedly grows one pruned weight (back to its dense value) and prunes one kept weight, so
the row keeps its number of weights (unstructured) or the swap stays inside one group of M (N:M keeps
exactly N per group). DSnoT picks swaps from the *expected* error (feature means) and a variance
heuristic; here H = 2/n·XᵀX is at hand, so each swap's change of the row's exact error
e(δ) = δᵀHδ (δ = w − ŵ, g = Hδ) is computed in closed form,

    grow p (δ_p: w_p → 0), prune q (δ_q: w_q − ŵ_q → w_q, b = ŵ_q):
    Δ(p, q) = (−2 w_p g_p + w_p² H_pp) + 2 b (g_q − w_p H_pq) + b² H_qq,

and a swap is made only when it lowers the error (Δ < −tol · e). Per row and iteration:
  * unstructured: the `candidates` pruned weights whose regrowth alone lowers e the most, each paired
    with its best kept weight to prune; the best pair wins;
  * N:M: the best pair over all groups (every pruned/kept pair inside a group), exactly.
A row stops when its best swap does not help; all rows stop after `max_iter` iterations. Cost per
iteration O(rows · in_features · candidates) (N:M: · M); g is updated incrementally (two columns of H).
The plain reference (one row at a time, each candidate's error recomputed as a full quadratic form) is
prunekit.ref.dsnot.
"""
from __future__ import annotations

import torch

from .. import _validate, patterns
from .refine import RefineStep


def dsnot_swaps(W: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, pattern, *,
                max_iter: int = 50, candidates: int = 1, tol: float = 1e-6, dtype: torch.dtype = torch.float32,
                name: str = "layer"):
    """Swaps on W (dense) / weight (pruned, zero outside `mask`) with H; returns (weight, mask, swaps).

    The returned weight is in `dtype`; grown weights take their dense values, pruned ones become 0,
    every other weight keeps its input value.
    """
    pattern = patterns.parse(pattern)
    _validate.float_tensor(W, f"{name}.weight", ndim=2)
    _validate.shape(weight, tuple(W.shape), f"{name} pruned weight")
    _validate.shape(mask, tuple(W.shape), f"{name} mask")
    _validate.shape(H, (W.shape[1], W.shape[1]), f"{name} Hessian")
    pattern.check_width(W.shape[1], f"{name}.weight")
    if max_iter < 0 or candidates < 1 or not tol >= 0:
        raise ValueError(f"DSnoT: expected max_iter >= 0, candidates >= 1, tol >= 0, got {max_iter}, "
                         f"{candidates}, {tol}")
    rows, cols = W.shape
    Wd, Hd = W.to(dtype), H.to(dtype)
    M = mask.clone()
    Wc = torch.where(M, weight.to(dtype), torch.zeros((), dtype=dtype, device=W.device))
    G = (Wd - Wc) @ Hd                           # g = Hδ per row (H symmetric)
    E = ((Wd - Wc) * G).sum(1)
    hdiag = Hd.diagonal()
    inf = torch.tensor(float("inf"), dtype=dtype, device=W.device)
    if pattern.is_nm:
        m = pattern.m
        groups = cols // m
        ar = torch.arange(groups, device=W.device)
        Hblk = Hd.reshape(groups, m, groups, m)[ar, :, ar, :]                  # [groups, m, m]
    active = torch.arange(rows, device=W.device)
    swaps = 0
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        w, g, kept, b = Wd[active], G[active], M[active], Wc[active]
        grow = torch.where(kept, inf, w * w * hdiag - 2 * w * g)               # regrow p alone
        if pattern.is_nm:
            r = active.numel()
            wg, gg, bg, kg = (t.reshape(r, groups, m) for t in (w, g, b, kept))
            pair = (grow.reshape(r, groups, m)[..., :, None]
                    + 2 * bg[..., None, :] * (gg[..., None, :] - wg[..., :, None] * Hblk)
                    + (bg * bg * hdiag.reshape(groups, m))[..., None, :])
            valid = ~kg[..., :, None] & kg[..., None, :]
            pair = torch.where(valid, pair, inf).reshape(r, -1)
            best, j = pair.min(1)
            grp, within = j // (m * m), j % (m * m)
            p, q = grp * m + within // m, grp * m + within % m
        else:
            k = min(candidates, cols)
            order = torch.argsort(grow, dim=1, stable=True)[:, :k]              # [r, k]
            wp = w.gather(1, order)
            pair = (grow.gather(1, order)[..., None]
                    + 2 * b[:, None, :] * (g[:, None, :] - wp[..., None] * Hd[order])
                    + (b * b * hdiag)[:, None, :])
            pair = torch.where(kept[:, None, :] & torch.isfinite(grow.gather(1, order))[..., None], pair, inf)
            best, j = pair.reshape(active.numel(), -1).min(1)
            p, q = order.gather(1, (j // cols)[:, None]).squeeze(1), j % cols
        ok = best < -tol * E[active]
        if not bool(ok.any()):
            break
        rr, p, q, best = active[ok], p[ok], q[ok], best[ok]
        wp, bq = Wd[rr, p], Wc[rr, q]
        G[rr] += bq[:, None] * Hd[q] - wp[:, None] * Hd[p]
        E[rr] += best
        Wc[rr, p], Wc[rr, q] = wp, 0
        M[rr, p], M[rr, q] = True, False
        swaps += int(rr.numel())
        active = rr
    return Wc, M, swaps


class DSnoT(RefineStep):
    """Refinement step: prune-and-grow mask swaps that lower each row's exact reconstruction error,
    keeping the per-row count (unstructured) or N kept per group of M (N:M).

    max_iter: swaps per row at most (DSnoT's max cycle count, 50 by default); candidates: how many of
    the best regrowth candidates each row pairs with a weight to prune (unstructured only; N:M searches
    every pair); tol: a swap must lower the row's error by more than tol × its error.
    Rows that end with a higher error than their input (possible only through round-off) are restored
    (RefineStep.apply). `changed` in the record counts the swaps made.
    """

    def __init__(self, max_iter: int = 50, candidates: int = 1, tol: float = 1e-6):
        if not (isinstance(max_iter, int) and max_iter >= 0):
            raise ValueError(f"DSnoT max_iter: expected a non-negative integer, got {max_iter!r}")
        if not (isinstance(candidates, int) and candidates >= 1):
            raise ValueError(f"DSnoT candidates: expected a positive integer, got {candidates!r}")
        if not tol >= 0:
            raise ValueError(f"DSnoT tol: expected a non-negative number, got {tol!r}")
        self.max_iter, self.candidates, self.tol = max_iter, candidates, float(tol)

    def refine(self, dense, result, H, name):
        weight, mask, swaps = dsnot_swaps(dense, result.weight, result.mask, H, result.pattern,
                                          max_iter=self.max_iter, candidates=self.candidates, tol=self.tol,
                                          name=name)
        return weight, mask, swaps, []

    def __repr__(self) -> str:
        return f"DSnoT(max_iter={self.max_iter}, candidates={self.candidates}, tol={self.tol:g})"

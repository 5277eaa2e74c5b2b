"""Reference prune-and-grow swaps (prunekit.pruning.dsnot): one row at a time in float64, every
candidate's error recomputed from scratch as the full quadratic form e(δ) = δᵀHδ, δ = w − ŵ.

Per row and iteration: regrowth candidates are the pruned positions ordered by e(after regrowing p
alone) − e (stable: the lower index first on ties); unstructured rows pair each of the first
`candidates` with every kept position, N:M rows try every (pruned, kept) pair inside each group, in the
order (group, p, q); the first pair with the lowest change wins and is made if it lowers e by more than
tol · e. A grown weight takes its dense value, a pruned one becomes 0.
"""
from __future__ import annotations

import torch


def _err(delta: torch.Tensor, H: torch.Tensor) -> float:
    return float(delta @ H @ delta)


def dsnot_swaps(W, weight, mask, H, n: int = 0, m: int = 0, *, max_iter: int = 50, candidates: int = 1,
                tol: float = 1e-6):
    """Returns (weight float64, mask, swaps)."""
    H = H.double()
    out = torch.where(mask, weight.double(), torch.zeros((), dtype=torch.float64))
    M = mask.clone()
    swaps = 0
    for r in range(W.shape[0]):
        w = W[r].double()
        for _ in range(max_iter):
            delta = w - out[r]
            e = _err(delta, H)
            pairs = []                       # (change, p, q) in search order
            if m:
                for g0 in range(0, W.shape[1], m):
                    for p in range(g0, g0 + m):
                        if M[r, p]:
                            continue
                        for q in range(g0, g0 + m):
                            if not M[r, q]:
                                continue
                            d2 = delta.clone()
                            d2[p], d2[q] = 0, w[q]
                            pairs.append((_err(d2, H) - e, p, q))
            else:
                grows = []
                for p in range(W.shape[1]):
                    if not M[r, p]:
                        d1 = delta.clone()
                        d1[p] = 0
                        grows.append((_err(d1, H) - e, p))
                grows.sort(key=lambda t: t[0])       # stable: equal changes keep index order
                for _, p in grows[:candidates]:
                    for q in range(W.shape[1]):
                        if M[r, q]:
                            d2 = delta.clone()
                            d2[p], d2[q] = 0, w[q]
                            pairs.append((_err(d2, H) - e, p, q))
            if not pairs:
                break
            best = min(range(len(pairs)), key=lambda i: pairs[i][0])   # first minimum
            change, p, q = pairs[best]
            if not change < -tol * e:
                break
            out[r, p], out[r, q] = w[p], 0
            M[r, p], M[r, q] = True, False
            swaps += 1
    return out, M, swaps

"""Reference least-squares reconstruction with a fixed mask: one row at a time, each row's normal
equations solved directly in float64 (torch.linalg.solve), no batching, no shared factorizations.

Row w (dense), kept set S, pruned set P, Hd = H with dead inputs' H_ii = 1 plus λ = percdamp·mean(diag):
    Hd_SS ŵ_S = Hd_SS w_S + Hd_SP w_P,   ŵ_P = 0.
"""
from __future__ import annotations

import torch


def least_squares_weights(W: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01
                          ) -> torch.Tensor:
    Hd = H.double().clone()
    for i in range(Hd.shape[0]):
        if Hd[i, i] == 0:
            Hd[i, i] = 1
    lam = percdamp * (torch.diagonal(Hd).sum() / Hd.shape[0])
    for i in range(Hd.shape[0]):
        Hd[i, i] += lam
    out = torch.zeros(W.shape, dtype=torch.float64)
    for r in range(W.shape[0]):
        w = W[r].double()
        S = torch.nonzero(mask[r]).flatten()
        P = torch.nonzero(~mask[r]).flatten()
        if S.numel() == 0:
            continue
        A = Hd[S][:, S]
        b = A @ w[S] + Hd[S][:, P] @ w[P]
        out[r, S] = torch.linalg.solve(A, b)
    return out

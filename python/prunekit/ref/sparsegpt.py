"""Reference SparseGPT (Frantar & Alistarh 2023): a line-by-line transcription of IST-DASLab/sparsegpt
`SparseGPT.fasterprune`, per-column Python loop included. It is the oracle our fast path is tested
against and the baseline it is benchmarked against, so it stays deliberately slow and literal.

Two things differ from the original, both on purpose:
  * Unstructured selection. The original takes `thresh = sort(tmp)[int(numel * sparsity)]` and prunes
    `tmp <= thresh`, i.e. one weight more than requested per block (and one even at sparsity 0). We prune
    exactly the int(numel * sparsity) lowest scores of the block (stable sort: on ties the lower
    row-major index goes first), so the achieved sparsity is the requested one. prunekit's fast path
    does the same, so the two stay comparable mask for mask.
  * N:M ties. The original uses `topk(largest=False)`, whose order among equal scores is unspecified; we
    prune the lower index first (stable sort), as everywhere in prunekit.
Kept from the original: its N:M convention. `prunen` is the number PRUNED in each group of `prunem`
(prunen=2, prunem=4 is 2:4). prunekit's patterns count KEPT weights: N:M kept == prunen = M - N.
The original's optional quantizer is transcribed (GPTQ-style groups when groupsize > 0, parameters read
from the block-start weights); its optional external mask is not (prunekit does not use it).
"""
from __future__ import annotations

import torch

from .selection import tensor_keep_mask


def reference_hinv(H: torch.Tensor) -> torch.Tensor:
    """The original's route to the inverse-Hessian factor: Cholesky of the (already damped) H, inverse
    from that factor, then the upper Cholesky factor of the inverse. Returns U with H^-1 = U^T U."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def reference_fasterprune(W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0,
                          prunem: int = 0, blocksize: int = 128, percdamp: float = 0.01,
                          quantizer=None, groupsize: int = -1):
    """Prune W [rows, columns] given H [columns, columns] = 2/n XᵀX, exactly as the original does.

    quantizer: optional (find_params, quantize) pair, the original's `self.quantizer`:
        find_params(x [rows, k]) -> (scale, zero) each [rows, 1]; quantize(x [rows, 1], scale, zero).
    Returns (W_pruned float32, keep mask bool (True = kept), Losses [rows] float32).
    """
    W = W.clone().float()
    H = H.clone().float()
    if quantizer is not None:
        find_params, quantize = quantizer
        scale, zero = find_params(W)
    rows, columns = W.shape

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Losses = torch.zeros(rows, device=W.device)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    Hinv = reference_hinv(H)

    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = ~tensor_keep_mask(tmp, sparsity)  # original: tmp <= sort(tmp)[int(numel*sparsity)]
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if quantizer is not None and groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)])

            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                # original: mask1.scatter_(1, i + topk(tmp, prunen, dim=1, largest=False)[1], True)
                lowest = torch.sort(tmp, dim=1, stable=True).indices[:, :prunen]
                mask1.scatter_(1, i + lowest, True)

            q = w.clone()
            q[mask1[:, i]] = 0
            if quantizer is not None:
                q = quantize(q.unsqueeze(1), scale, zero).flatten()

            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return W, ~pruned, Losses

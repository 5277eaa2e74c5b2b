"""Joint SparseGPT pruning + quantization: the reference `fasterprune` run with a quantizer
(IST-DASLab/sparsegpt, with GPTQ's per-group parameters).

Column by column inside each block, the pruned weight q (w with the mask applied) is also rounded to
the quantization grid before its error (w - q) / [H^-1]_ii is spread over the not-yet-processed
columns, so the OBS update compensates for pruning and rounding together. Quantization parameters are
per output row, or per group of `groupsize` input columns, found when the sweep reaches a group's first
column from the weights as they stand at the start of the current block (as the reference reads its
outer W, not the block copy).

Masks, damping, dead inputs and the exact per-block unstructured count are those of
prunekit.pruning.sparsegpt (its helpers are reused). The in-block loop is plain PyTorch here,
vectorised over rows, one column at a time; a fused C++/CUDA sweep (as `prunekit::obs_sweep` is for
pruning alone) is future work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pruning.base import LayerResult
from ..pruning.sparsegpt import (HessianFactor, _block_size, _pattern, _validate_inputs, block_keep_mask,
                                 factor_hessian)
from ..ref.selection import nm_keep_mask
from .quantizer import QuantParams, QuantSpec, find_params, quantize


@dataclass
class QuantLayerResult(LayerResult):
    """A LayerResult whose weight lies on the grid of `quant` (integer codes: `quant.codes(weight)`)."""

    quant: QuantParams | None = None


def sparsegpt_quant_prune(W: torch.Tensor, H: torch.Tensor, sparsity="0.5", *, bits: int,
                          groupsize: int = -1, sym: bool = False, blocksize: int = 128,
                          percdamp: float = 0.01, name: str = "layer",
                          factor: HessianFactor | None = None) -> QuantLayerResult:
    """Prune W [out, in] with SparseGPT and quantize the kept weights to `bits` (2..8) jointly.

    `sparsity` is a fraction or pattern ("50%", "2:4"); `groupsize` input columns share a scale and
    zero-point (-1: one per row; otherwise it must divide the width); `sym` picks a symmetric grid.
    H [in, in] = 2/n XᵀX; `factor` (from `factor_hessian`) skips the factorization when layers share H.
    Returns a QuantLayerResult: the pruned, fake-quantized weight in W's dtype (pruned entries exactly
    0), the kept-mask, the damping used, the OBS loss estimate of pruning + rounding, notes, and the
    quantization parameters.
    """
    spec = QuantSpec(bits, groupsize, sym)
    pattern = _pattern(sparsity, 0, 0)
    _validate_inputs(W, H, pattern, name)
    rows, cols = W.shape
    g = spec.group_width(cols, name)
    block = _block_size(blocksize, pattern)
    if factor is None:
        factor = factor_hessian(H, percdamp, name)
    U = factor.U
    Wf = W.detach().to(torch.float32, copy=True)
    scales = Wf.new_empty(rows, cols // g)
    zeros = Wf.new_empty(rows, cols // g)
    if spec.groupsize == -1:  # the reference fits per-row parameters once, before zeroing dead inputs
        scales[:, 0], zeros[:, 0] = find_params(Wf, spec.bits, spec.sym)
    notes = list(factor.notes)
    n_dead = int(factor.dead.sum())
    if n_dead:
        Wf[:, factor.dead] = 0
        notes.append(f"{name}: {n_dead} dead input feature(s) (H_ii = 0); their weights were set to 0")

    keep = torch.empty_like(Wf, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float32, device=Wf.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        Hinv1 = U[i1:i2, i1:i2]
        Q1, Err1, keep1 = _sweep_block(Wf, i1, i2, Hinv1, pattern, spec, g, scales, zeros)
        Wf[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        losses += Err1.square().sum(1) / 2  # (w - q)² / d² summed over the block, halved
        if i2 < cols:
            Wf[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return QuantLayerResult(weight=Wf.to(W.dtype), mask=keep, pattern=pattern, damping=factor.percdamp,
                            loss_estimate=float(losses.sum()), notes=notes,
                            quant=QuantParams(scales, zeros, spec.bits, g))


def _sweep_block(Wf, i1, i2, Hinv1, pattern, spec: QuantSpec, g, scales, zeros):
    """Prune + quantize columns i1..i2 of Wf one at a time (Wf itself is left as at the block start).
    Fills scales/zeros for groups starting in the block; returns (Q1, Err1, keep1)."""
    W1 = Wf[:, i1:i2].clone()
    diag = torch.diag(Hinv1)
    keep1 = block_keep_mask(W1, Hinv1, pattern)
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    for i in range(i2 - i1):
        col = i1 + i
        col_group = col // g
        if pattern.is_nm and i % pattern.m == 0:
            scores = W1[:, i:i + pattern.m] ** 2 / diag[i:i + pattern.m].reshape(1, -1) ** 2
            keep1[:, i:i + pattern.m] = nm_keep_mask(scores, pattern.n, pattern.m)
        if spec.groupsize != -1 and col % g == 0:
            scales[:, col_group], zeros[:, col_group] = find_params(Wf[:, col:col + g], spec.bits, spec.sym)
        w = W1[:, i]
        q = torch.where(keep1[:, i], w, torch.zeros_like(w))
        q = quantize(q, scales[:, col_group], zeros[:, col_group], spec.maxq)
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err
    return Q1, Err1, keep1

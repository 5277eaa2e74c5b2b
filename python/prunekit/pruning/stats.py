"""Calibration statistics of one layer's input, accumulated exactly as the reference code does.

Wanda (locuslab/wanda, WrappedGPT.add_batch): a running mean over samples of the per-input-feature
squared norm, `scaler_row`. SparseGPT (IST-DASLab/sparsegpt, SparseGPT.add_batch): H = 2/n · Σ XᵀX in
fp32. A "sample" is one row of the leading (batch) dimension, as in both references. The arithmetic
lives in the custom ops of prunekit.ops.calib_stats (reference: prunekit.ref.calib_stats).

Layers that see the batch flattened to tokens (OPT's fc1/fc2 get [batch·seq_len, features]) count the
same samples as layers that see it 3-D: given `tokens_per_sample` (prunekit.prune passes the calibration
sequence length), a 2-D input of k·seq_len rows counts k samples. The references feed one sample at a
time, where both readings agree; counting a flattened batch as one sample would scale such a layer's
statistics by the batch size relative to the block's other layers (and so move OWL's allocation).
"""
from __future__ import annotations

import torch

from .. import _validate
from ..ops import calib_stats


class LayerStats:
    """Accumulates what a pruning method needs from a layer's inputs."""

    def __init__(self, in_features: int, *, hessian: bool = False, act_norm: bool = False,
                 device: torch.device | str | None = None, name: str = "layer"):
        self.in_features = in_features
        self.name = name
        self.nsamples = 0
        self.act_norm_sq = torch.zeros(in_features, dtype=torch.float32, device=device) if act_norm else None
        self.hessian = (torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
                        if hessian else None)
        # What methods derive from the statistics alone (SparseGPT's H^-1 factor). Layers that read
        # the same input (q/k/v, gate/up) share one LayerStats, so they share this too.
        self.derived: dict = {}

    def add_batch(self, x: torch.Tensor, tokens_per_sample: int | None = None) -> None:
        """x: the layer input, [..., in_features]. Its first dimension counts as samples if 3-D or more;
        a 2-D input counts rows / tokens_per_sample samples when the rows are a whole number of
        sequences of that length, else one (as in the references)."""
        _validate.float_tensor(x, f"{self.name} input")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name} input: expected last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        batch = samples_in(x, tokens_per_sample)
        rows = x.reshape(-1, self.in_features)
        # The ops read the activation once in its own dtype (tensor cores for bf16/fp16 on CUDA).
        if self.act_norm_sq is not None:
            self.act_norm_sq = calib_stats.act_norm_sq_update(
                rows.to(self.act_norm_sq.device), self.act_norm_sq, self.nsamples, batch)
        if self.hessian is not None:
            self.hessian = calib_stats.hessian_update(
                rows.to(self.hessian.device), self.hessian, self.nsamples, batch)
        self.nsamples += batch
        self.derived.clear()

    def check_finite(self) -> None:
        """Raises when the accumulated statistics hold NaN/Inf: the calibration activations did."""
        for what, t in (("activation norms", self.act_norm_sq), ("Hessian", self.hessian)):
            if t is not None and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{self.name}: NaN/Inf in the calibration activations ({bad} non-finite "
                                 f"value(s) in its {what}); the model produces non-finite values on the "
                                 "calibration data before this layer")

def samples_in(x: torch.Tensor, tokens_per_sample: int | None = None) -> int:
    """How many calibration samples the layer input x [..., features] holds; see the module docstring."""
    if x.dim() >= 3:
        return max(1, x.shape[0])
    rows = x.shape[0] if x.dim() == 2 else 1
    if tokens_per_sample and rows >= tokens_per_sample and rows % tokens_per_sample == 0:
        return rows // tokens_per_sample
    return 1

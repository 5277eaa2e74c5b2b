"""Min-max weight quantizer as in the GPTQ / SparseGPT reference `Quantizer` (IST-DASLab), for weights.

Each output channel (row), or each group of `groupsize` consecutive input columns of a row, gets a
scale and an integer zero-point from its min and max (the range always includes 0). A value x maps to
the integer code q = clamp(round(x / scale) + zero, 0, 2^bits - 1) and back to scale * (q - zero).

Because the zero-point is an integer in [0, 2^bits - 1], x = 0 maps to code `zero` and back to exactly
0: pruned weights stay pruned after quantization (tests/test_quant.py checks it).

One deliberate difference from the reference: with `sym=True` the reference only mirrors the range
when the group has a negative value, so an all-nonnegative group gets the range [~-max/2, ~max/2] and
its larger values are clipped. Here a symmetric range is always [-amax, amax].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validate


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: `bits` in 2..8, `groupsize` input columns per scale (-1: one per row),
    `sym`: symmetric grid around 0 (zero-point 2^(bits-1)) instead of asymmetric min-max."""

    bits: int = 4
    groupsize: int = -1
    sym: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"quantization bits: expected an integer in 2..8, got {self.bits!r}")
        if (isinstance(self.groupsize, bool) or not isinstance(self.groupsize, int)
                or not (self.groupsize == -1 or self.groupsize >= 1)):
            raise ValueError(f"quantization groupsize: expected -1 (one group per row) or a positive "
                             f"integer, got {self.groupsize!r}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def group_width(self, width: int, name: str = "weight") -> int:
        """Columns per group for a weight of `width` input features; the groups must tile the row."""
        if self.groupsize == -1:
            return width
        if width % self.groupsize != 0:
            raise ValueError(f"{name}: quantization groupsize {self.groupsize} does not divide the input "
                             f"width {width}; use a divisor of {width} or -1 (one group per row)")
        return self.groupsize


@dataclass
class QuantParams:
    """Scales and integer zero-points of a quantized weight [rows, cols]: one per row and group."""

    scale: torch.Tensor  # float32 [rows, cols // groupsize]
    zero: torch.Tensor   # float32 [rows, cols // groupsize], integer-valued, in [0, maxq]
    bits: int
    groupsize: int       # columns per group (cols when per channel)

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def per_column(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) expanded to [rows, cols]."""
        return (self.scale.repeat_interleave(self.groupsize, dim=1),
                self.zero.repeat_interleave(self.groupsize, dim=1))

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes (uint8 [rows, cols]) of a weight quantized with these parameters."""
        scale, zero = self.per_column()
        return torch.clamp(torch.round(weight.float() / scale) + zero, 0, self.maxq).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 weight scale * (codes - zero)."""
        scale, zero = self.per_column()
        return scale * (codes.float() - zero)


def find_params(x: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [rows, k]: (scale, zero) [rows] float32 from the row's range extended to include 0.
    A row of zeros gets the range [-1, 1] (as the reference), so its scale is never 0."""
    maxq = 2 ** bits - 1
    x = x.float()
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1).values, zeros)
    xmax = torch.maximum(x.max(1).values, zeros)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmax - xmin) / maxq == 0  # all zero, or a range so small the scale underflows
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Fake quantization: x rounded to the grid scale * (q - zero), q in 0..maxq (broadcasting)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def fit_params(W: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantParams:
    """Min-max parameters of W [rows, cols] per row and group (no error feedback: round-to-nearest)."""
    _validate.float_tensor(W, name, ndim=2)
    rows, cols = W.shape
    g = spec.group_width(cols, name)
    groups = W.float().reshape(rows * (cols // g), g)
    scale, zero = find_params(groups, spec.bits, spec.sym)
    return QuantParams(scale.reshape(rows, -1), zero.reshape(rows, -1), spec.bits, g)


def quantize_rtn(W: torch.Tensor, bits: int = 4, groupsize: int = -1, keep_mask: torch.Tensor | None = None,
                 *, sym: bool = False, name: str = "weight") -> torch.Tensor:
    """Round-to-nearest quantization of an (optionally pruned) weight, e.g. after magnitude or Wanda.

    Weights outside `keep_mask` (bool, True = kept) are zeroed first, so they take part in the ranges
    as zeros and come back exactly 0. Returns the dequantized weight in W's dtype; the integer codes
    are `fit_params(W_masked, QuantSpec(bits, groupsize, sym)).codes(result)`.
    """
    spec = QuantSpec(bits, groupsize, sym)
    _validate.float_tensor(W, name, ndim=2)
    _validate.finite(W, name)
    Wf = W.detach().float()
    if keep_mask is not None:
        if keep_mask.dtype != torch.bool:
            raise TypeError(f"{name}: keep_mask must be a bool tensor (True = kept), got {keep_mask.dtype}")
        _validate.shape(keep_mask, tuple(W.shape), f"{name} keep_mask")
        Wf = Wf.masked_fill(~keep_mask.to(Wf.device), 0)
    params = fit_params(Wf, spec, name)
    scale, zero = params.per_column()
    return quantize(Wf, scale, zero, spec.maxq).to(W.dtype)

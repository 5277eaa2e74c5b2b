"""Reference 2:4 linear: unpack the logical format (ref/pack24.py) and run a dense F.linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pack24


def check_inputs(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> None:
    pack24.check_packed(values, meta)
    out_features, in_features = values.shape[0], 2 * values.shape[1]
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features} (in_features), got shape {tuple(x.shape)}")
    if x.dtype != values.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the 2:4 weight has {values.dtype}; cast one of them")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != values.dtype):
        raise ValueError(f"bias: expected shape ({out_features},) and dtype {values.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("values", values), ("meta", meta), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put both on one device")


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    check_inputs(x, values, meta, bias)
    return F.linear(x, pack24.unpack24(values, meta), bias)

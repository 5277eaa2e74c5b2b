"""Input checks with messages that name the tensor and say what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def float_tensor(t, name: str, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float32/float16/bfloat16/float64), "
                        f"got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    return t


def finite(t: torch.Tensor, name: str) -> torch.Tensor:
    # One reduction first: any NaN/Inf makes the sum non-finite. Only a non-finite sum (which a large
    # finite tensor can also give, by overflow) pays for the element-wise check.
    if bool(torch.isfinite(t.sum())):
        return t
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} NaN/Inf value(s) of {t.numel()}")
    return t


def same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; put both on one device")


def shape(t: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def sparsity(value, name: str = "sparsity") -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number in [0, 1), got {value!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    return s


def n_m(n: int, m: int, width: int | None = None, name: str = "weight") -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2 or n >= m:
        raise ValueError(f"{name}: N:M pattern needs integers 1 <= N < M, got {n}:{m}")
    if width is not None and width % m != 0:
        raise ValueError(f"{name}: N:M pattern {n}:{m} needs the input width divisible by M={m}, "
                         f"got width {width}")

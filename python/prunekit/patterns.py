"""Sparsity patterns: an unstructured fraction, or N:M (N kept of every M consecutive inputs)."""
from __future__ import annotations

from dataclasses import dataclass

from . import _validate


@dataclass(frozen=True)
class Pattern:
    """What to prune. `sparsity` is the pruned fraction; for N:M it is 1 - n/m."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def check_width(self, width: int, name: str) -> None:
        if self.is_nm:
            _validate.n_m(self.n, self.m, width, name)


def parse(spec) -> Pattern:
    """Accepts 0.5, "0.5", "50%", "2:4", (2, 4) or a Pattern."""
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        n, m = spec
        _validate.n_m(n, m, name="pattern")
        return Pattern(1.0 - n / m, n, m)
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            left, _, right = text.partition(":")
            try:
                n, m = int(left), int(right)
            except ValueError:
                raise ValueError(f"pattern: expected 'N:M' with integers, got {spec!r}") from None
            return parse((n, m))
        if text.endswith("%"):
            return Pattern(_validate.sparsity(float(text[:-1]) / 100.0))
        try:
            return Pattern(_validate.sparsity(float(text)))
        except (TypeError, ValueError):
            raise ValueError(f"pattern: expected a fraction like 0.5, a percentage like '50%' "
                             f"or 'N:M' like '2:4', got {spec!r}") from None
    return Pattern(_validate.sparsity(spec))

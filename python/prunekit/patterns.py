r"""Sparsity patterns (an unstructured fraction, or N:M: N kept of every M consecutive inputs) and
layer-name patterns (which layers `include` / `exclude` / an allocation rule / `sparsify` select).

Layer-name rule, the one used everywhere: a pattern is a shell glob (fnmatch, case-sensitive) over the
full dotted module name — `*` matches any run of characters (dots included), `?` one character,
`[...]` a set. So `model.layers.1.*` selects block 1 only, never blocks 10 or 11. A pattern starting
with `re:` is a Python regular expression matched against the full name (`re.fullmatch`), e.g.
`re:model\.layers\.(1|2)\..*`. Nothing else is tried: a glob is never also read as a regex.
"""
from __future__ import annotations

import fnmatch
import re
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
        try:
            value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"pattern: expected a fraction like 0.5, a percentage like '50%' "
                             f"or 'N:M' like '2:4', got {spec!r}") from None
        try:
            return Pattern(_validate.sparsity(value))
        except ValueError as exc:  # keep the range ("[0, 1)") and say what was given
            raise ValueError(f"{exc} (from {spec!r})") from None
    return Pattern(_validate.sparsity(spec))


# ----------------------------------------------------------------------------- layer-name patterns
REGEX_PREFIX = "re:"


def as_name_patterns(value, what: str) -> list[str]:
    """None, one pattern or a list of them, as a list; checks each (a bad `re:` pattern is an error)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value) if not isinstance(value, bytes) else None
    if items is None or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{what}: expected a layer-name pattern or a list of them, got {value!r}")
    for p in items:
        _compiled(p, what)
    return items


def _compiled(pattern: str, what: str = "pattern") -> re.Pattern:
    if pattern.startswith(REGEX_PREFIX):
        try:
            return re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as exc:
            raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from None
    return re.compile(fnmatch.translate(pattern))


def name_matches(name: str, pattern: str) -> bool:
    """Whether the dotted module `name` matches one layer-name `pattern` (glob, or `re:` regex)."""
    return _compiled(pattern).fullmatch(name) is not None


def matches_any(name: str, patterns) -> bool:
    return any(name_matches(name, p) for p in as_name_patterns(patterns, "patterns"))


def selected(name: str, include: list[str], exclude: list[str], default: bool) -> bool:
    """The include / exclude rule every layer selection uses: a non-empty `include` replaces the
    `default` choice (whether the layer is picked without patterns), then `exclude` removes from it.
    `include` / `exclude` are lists already checked by `as_name_patterns`."""
    take = any(name_matches(name, p) for p in include) if include else default
    return take and not any(name_matches(name, p) for p in exclude)

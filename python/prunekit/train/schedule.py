"""Gradual pruning schedules: the sparsity to reach at each optimizer step.

Zhu & Gupta 2017 ("To prune, or not to prune") raise sparsity from s_i to s_f over n pruning steps
Δt apart, starting at step t0:  s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³  for t = t0, t0+Δt, …,
t0+nΔt. Here `begin` = t0, `end` = t0 + nΔt and `every` = Δt. Masks change only at those update
steps, so between them the sparsity holds its last value; before `begin` the model is dense and after
`end` it stays at s_f. `cubic_schedule` is that rule; `linear_schedule` and `constant_schedule` share
the timing with another shape.
"""
from __future__ import annotations

from collections.abc import Callable

from .. import _validate


def _step(value, name: str) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{name}: expected a non-negative integer step, got {value!r}")
    return value


class Schedule:
    """Sparsity as a function of the step count, with the steps at which masks are recomputed.

    shape maps progress p in [0, 1] (from begin to end) to the fraction of the way from `initial`
    to `final`: p ↦ 1 − (1 − p)³ for cubic, p for linear.
    """

    def __init__(self, final, initial=0.0, begin: int = 0, end: int | None = None, every: int = 1,
                 shape: Callable[[float], float] = lambda p: p, name: str = "schedule"):
        self.final = _validate.sparsity(final, f"{name}: final")
        self.initial = _validate.sparsity(initial, f"{name}: initial")
        self.begin = _step(begin, f"{name}: begin")
        self.end = _step(begin if end is None else end, f"{name}: end")
        self.every = _step(every, f"{name}: every")
        if self.every < 1:
            raise ValueError(f"{name}: every must be at least 1, got {every}")
        if self.end < self.begin:
            raise ValueError(f"{name}: end ({self.end}) comes before begin ({self.begin})")
        if (self.end - self.begin) % self.every:
            raise ValueError(f"{name}: end - begin ({self.end - self.begin}) must be a multiple of "
                             f"every ({self.every}) so that the last update lands on end")
        self.shape, self.name = shape, name

    def is_update(self, step: int) -> bool:
        """Whether masks are recomputed at this step."""
        return self.begin <= step <= self.end and (step - self.begin) % self.every == 0

    def __call__(self, step: int) -> float:
        """The sparsity in force after `step` steps (0.0, dense, before `begin`)."""
        _step(step, f"{self.name}: step")
        if step < self.begin:
            return 0.0
        last_update = self.begin + (min(step, self.end) - self.begin) // self.every * self.every
        if self.end == self.begin:
            return self.final
        progress = (last_update - self.begin) / (self.end - self.begin)
        return self.initial + (self.final - self.initial) * self.shape(progress)

    @property
    def is_constant(self) -> bool:
        return self.initial == self.final or self.begin == self.end

    def __repr__(self) -> str:
        return (f"{self.name}(final={self.final:g}, initial={self.initial:g}, begin={self.begin}, "
                f"end={self.end}, every={self.every})")


def cubic_schedule(final, initial=0.0, begin: int = 0, end: int = 1000, every: int = 100) -> Schedule:
    """Zhu & Gupta's cubic ramp: fast pruning early, slow near the end."""
    return Schedule(final, initial, begin, end, every, shape=lambda p: 1.0 - (1.0 - p) ** 3, name="cubic")


def linear_schedule(final, initial=0.0, begin: int = 0, end: int = 1000, every: int = 100) -> Schedule:
    """Sparsity rising by equal amounts at each update step."""
    return Schedule(final, initial, begin, end, every, name="linear")


def constant_schedule(sparsity, begin: int = 0, every: int | None = None, end: int | None = None) -> Schedule:
    """One sparsity from `begin` on. With `every` (and `end`), the masks are also recomputed at those
    steps (same sparsity, current weights)."""
    end = begin if end is None else end
    return Schedule(sparsity, sparsity, begin, end, every or max(end - begin, 1), name="constant")

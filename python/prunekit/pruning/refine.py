"""Post-hoc refinement of a pruned layer: steps that run after a pruning method, on the same statistics.

    pk.prune(model, pk.Wanda("2:4"), calib, refine=[pk.DSnoT(), pk.LeastSquares()])

Each step takes the dense weight W, the method's result (pruned weight Ŵ, kept-mask) and the layer's
Hessian H = 2/n·XᵀX, and returns a new result with the *same pattern* (unstructured: the same number
of kept weights per row; N:M: N kept in every group of M). Every step lowers (never raises) the layer's
reconstruction error on the calibration inputs,

    error(Ŵ) = Σ_tokens ||(W − Ŵ) x||² = n/2 · Σ_rows (w − ŵ)ᵀ H (w − ŵ),

and records what it did (`LayerResult.refine`, copied into the pipeline's report): the error before and
after on the calibration statistics, its time, and how much it changed. Steps:

  * `prunekit.LeastSquares` (pruning/least_squares.py): the kept weights' exact least-squares update on
    H with the mask fixed;
  * `prunekit.DSnoT` (pruning/dsnot.py): prune-and-grow swaps of the mask that lower the error.

`Refined(method, steps)` is the wrapper that `prunekit.prune(..., refine=...)` puts around the method;
it can be used directly too (it is an ordinary PruningMethod).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from .. import _validate
from .base import LayerResult, PruningMethod
from .block_reconstruct import BlockReconstruct
from .stats import LayerStats


def row_errors(dense: torch.Tensor, weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per output row, (w − ŵ)ᵀ H (w − ŵ) in float64 (dense, weight: [out, in]; H: [in, in])."""
    delta = dense.double() - weight.double()
    return ((delta @ H.double()) * delta).sum(1)


def check_inputs(dense: torch.Tensor, result: LayerResult, stats: LayerStats | None, step, name: str
                 ) -> torch.Tensor:
    """Validates a step's inputs; returns H (float32, on the weight's device)."""
    if stats is None or stats.hessian is None:
        raise ValueError(f"{name}: {step!r} needs the layer's Hessian; create the stats with hessian=True "
                         "(prunekit.prune(..., refine=...) does)")
    if stats.nsamples == 0:
        raise ValueError(f"{name}: {step!r}: the statistics saw no calibration samples")
    _validate.float_tensor(dense, f"{name}.weight", ndim=2)
    _validate.shape(result.weight, tuple(dense.shape), f"{name} pruned weight")
    _validate.shape(result.mask, tuple(dense.shape), f"{name} mask")
    if result.mask.dtype != torch.bool:
        raise TypeError(f"{name} mask: expected a bool tensor, got {result.mask.dtype}")
    H = stats.hessian
    _validate.shape(H, (dense.shape[1], dense.shape[1]), f"{name} Hessian")
    if bool(result.weight.ne(0).logical_and_(~result.mask).any()):
        raise ValueError(f"{name}: the pruned weight has nonzeros outside its mask")
    return H.to(device=dense.device, dtype=torch.float32)


@dataclass
class RefineRecord:
    """What one refinement step did to one layer (errors on the layer's calibration statistics)."""

    step: str
    error_before: float
    error_after: float
    seconds: float
    changed: int = 0               # LeastSquares: rows solved; DSnoT: swaps made
    reverted: int = 0              # rows given back their input because the step made them worse
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"step": self.step, "error_before": self.error_before, "error_after": self.error_after,
                "seconds": self.seconds, "changed": self.changed, "reverted": self.reverted}


class RefineStep:
    """Base class: `refine(dense, result, H, name)` returns (weight float32, mask, changed, notes).

    `apply` wraps it: per row it keeps the step's output only where the row's error on the undamped H,
    in the layer's dtype, is not higher than the input's (damping, float32 round-off or the cast to
    bf16/fp16 could otherwise raise it), so no step ever raises the layer's reconstruction error.
    """

    def refine(self, dense: torch.Tensor, result: LayerResult, H: torch.Tensor, name: str):
        raise NotImplementedError

    def apply(self, dense: torch.Tensor, result: LayerResult, stats: LayerStats | None,
              name: str = "layer") -> LayerResult:
        """Runs the step on one layer; returns a new LayerResult with a RefineRecord appended."""
        H = check_inputs(dense, result, stats, self, name)
        began = time.perf_counter()
        before = row_errors(dense, result.weight, H)
        weight, mask, changed, notes = self.refine(dense, result, H, name)
        weight = weight.to(result.weight.dtype)
        after = row_errors(dense, weight, H)
        worse = after > before
        reverted = int(worse.sum())
        if reverted:
            weight = torch.where(worse[:, None], result.weight, weight)
            mask = torch.where(worse[:, None], result.mask, mask)
            after = torch.where(worse, before, after)
        if dense.device.type == "cuda":
            torch.cuda.synchronize(dense.device)
        scale = stats.nsamples / 2  # Σ_tokens ||δx||² = n/2 · δᵀHδ
        record = RefineRecord(repr(self), float(before.sum()) * scale, float(after.sum()) * scale,
                              time.perf_counter() - began, changed, reverted, tuple(notes))
        return replace(result, weight=weight, mask=mask, notes=list(result.notes) + list(notes),
                       refine=list(result.refine) + [record])


def as_steps(refine) -> list:
    """None, one step (a RefineStep or BlockReconstruct), or an iterable of them."""
    if refine is None:
        return []
    if isinstance(refine, (RefineStep, BlockReconstruct)):
        return [refine]
    if isinstance(refine, Iterable) and not isinstance(refine, (str, bytes)):
        steps = list(refine)
        for step in steps:
            if not isinstance(step, (RefineStep, BlockReconstruct)):
                raise TypeError(f"refine: expected refinement steps (prunekit.DSnoT(), prunekit.LeastSquares(), "
                                f"prunekit.BlockReconstruct()), got {type(step).__name__} in {refine!r}")
        return steps
    raise TypeError(f"refine: expected a refinement step or a list of them (e.g. [prunekit.DSnoT(), "
                    f"prunekit.LeastSquares()]), got {type(refine).__name__}")


def check_method(method: PruningMethod) -> None:
    """Fails when `method`'s results cannot be refined (called before any calibration forward)."""
    if not isinstance(method, PruningMethod):
        raise TypeError(f"Refined: expected a prunekit pruning method, got {type(method).__name__}")
    if getattr(method, "quant", None) is not None:
        raise ValueError(f"refine: {method!r} quantizes the weights it keeps; refinement steps change "
                         "those values and would undo the quantization. Refine without quant=")


class Refined(PruningMethod):
    """`method`, then each refinement step in order on every layer it prunes. Collects the Hessian
    (the steps need it) in addition to whatever the method collects."""

    def __init__(self, method: PruningMethod, steps):
        check_method(method)
        self.method, self.steps, self.pattern = method, as_steps(steps), method.pattern
        if not self.steps:
            raise ValueError("Refined: expected at least one refinement step")
        self.name = method.name
        self.needs_hessian, self.needs_act_norm = True, method.needs_act_norm

    def new_stats(self, in_features: int, device=None, name: str = "layer") -> LayerStats:
        stats = self.method.new_stats(in_features, device=device, name=name)
        if stats is not None and stats.hessian is not None:
            return stats
        return LayerStats(in_features, hessian=True, act_norm=stats is not None and stats.act_norm_sq is not None,
                          device=device, name=name)

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats | None, name: str = "layer") -> LayerResult:
        dense = weight.detach().clone()
        result = self.method.prune_layer(weight, stats, name)
        for step in self.steps:
            result = step.apply(dense, result, stats, name)
        return result

    def with_pattern(self, sparsity) -> PruningMethod:
        clone = copy.copy(self)
        clone.method = self.method.with_pattern(sparsity)
        clone.pattern = clone.method.pattern
        return clone

    def __repr__(self) -> str:
        return " + ".join([repr(self.method), *map(repr, self.steps)])

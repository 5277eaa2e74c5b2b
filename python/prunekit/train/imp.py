"""Iterative magnitude pruning (IMP): train, prune a fraction of what is left, rewind, train again.

    def train(model, ctx):                     # your training loop, called once per round
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(ctx.start_step, 1000):
            loss = ...; loss.backward(); opt.step(); opt.zero_grad()
            ctx.step()                         # holds the mask; at rewind=k, takes the snapshot at step k
        return evaluate(model)                 # a number or a dict of numbers (or None)

    result = iterative_magnitude(model, train, rounds=5, fraction=0.2, rewind="init")
    print(result)                              # per round: sparsity, kept weights, your metric, steps, time
    result.plot("imp.png")                     # metric against sparsity (needs matplotlib: prunekit[plot])

Round 0 trains the model as it is (dense, or under `masks`). Each later round prunes `fraction` of
the weights still kept in the selected layers, by |w| of the trained weights, over all layers at once
(scope="global") or in each layer (scope="layer"); then puts the survivors back to an earlier state
and trains again under the new mask. After k pruning rounds a fraction (1 − fraction)^k of the weights
is left (exactly: each round prunes int(fraction · kept) weights, per layer or in total).

rewind: "init" (the weights before round 0: the lottery-ticket experiment), an int k (the weights
after step k of round 0, "late rewinding"; later rounds then train from ctx.start_step = k), "reinit"
(fresh weights from the model's initializer under the mask: the random-ticket control), or None
(no rewinding: keep training the pruned trained weights, i.e. prune and fine-tune).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from numbers import Real

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate
from ..pruning.magnitude import global_magnitude_masks
from .masked import MaskedTraining
from .masks import Masks
from .rewinding import Snapshot, reinitialize

log = logging.getLogger("prunekit")

SCOPES = ("global", "layer")


# ------------------------------------------------------------------------------- one pruning step
def _prune_kept(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Drops the k lowest of the given kept weights (1-D, by layer); True = still kept. Uses the
    library's global magnitude selection (radix select, ties: dict order, then index)."""
    total = sum(s.numel() for s in scores.values())
    if k == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    # global_magnitude_masks prunes int(total * sparsity) entries; (k + 0.5) / total lands on k exactly.
    keep = global_magnitude_masks(scores, (k + 0.5) / total)
    dropped = sum(int((~m).sum()) for m in keep.values())
    if dropped != k:  # pragma: no cover - a guard on the rounding argument above
        raise RuntimeError(f"prune_remaining: selected {dropped} weights instead of {k}")
    return keep


@torch.no_grad()
def prune_remaining(model: nn.Module, masks, fraction: float, scope: str = "global") -> Masks:
    """New masks: the old ones minus `fraction` of their kept weights, those of smallest |w| in the
    model's current weights (over all layers at once, or in each layer). Exactly int(fraction · kept)
    weights go, in total (global) or per layer."""
    if not (isinstance(fraction, Real) and 0 < fraction < 1):
        raise ValueError(f"fraction: expected the share of remaining weights to prune, in (0, 1), got {fraction!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    masks = Masks(masks)
    layers = masks.check(model)
    kept = {name: calibrate.layer_weight(layers[name]).detach()[keep.to(layers[name].weight.device)]
            for name, keep in masks.items()}
    if scope == "global":
        survivors = _prune_kept(kept, int(fraction * sum(v.numel() for v in kept.values())))
    else:
        survivors = {}
        for name, values in kept.items():
            survivors.update(_prune_kept({name: values}, int(fraction * values.numel())))
    out = Masks()
    for name, keep in masks.items():
        new = keep.clone()
        new[keep] = survivors[name].to(keep.device)
        out[name] = new
    return out


# ------------------------------------------------------------------------------- the rounds
class RoundContext:
    """What `train_fn` gets each round: call `step()` after every optimizer step."""

    def __init__(self, training: MaskedTraining, index: int, start_step: int, snapshot_at: int | None,
                 on_snapshot: Callable[[int], None]):
        self.training, self.index, self.start_step = training, index, start_step
        self.step_count = start_step
        self._snapshot_at, self._on_snapshot = snapshot_at, on_snapshot

    @property
    def masks(self) -> Masks:
        return self.training.masks

    @property
    def sparsity(self) -> float:
        return self.training.sparsity

    @property
    def steps(self) -> int:
        """Optimizer steps taken this round."""
        return self.step_count - self.start_step

    def step(self) -> None:
        """Holds the mask after an optimizer step (re-zeroes pruned weights) and counts the step."""
        self.training.step()
        self.step_count += 1
        if self._snapshot_at is not None and self.step_count == self._snapshot_at:
            self._on_snapshot(self.step_count)
            self._snapshot_at = None

    def __repr__(self) -> str:
        return f"RoundContext(round {self.index}, sparsity {self.sparsity:.4f}, step {self.step_count})"


@dataclass
class IMPRound:
    round: int
    sparsity: float                 # pruned fraction of the selected layers' weights while training
    kept: int                       # weights kept in the selected layers
    total: int                      # weights in the selected layers
    metric: dict[str, float] = field(default_factory=dict)  # what train_fn returned
    steps: int = 0                  # ctx.step() calls
    seconds: float = 0.0


@dataclass
class IMPResult:
    rounds: list[IMPRound]
    fraction: float
    scope: str
    rewind: str                     # "init", "step k", "reinit" or "none"
    masks: Masks | None = None      # the last round's masks

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "scope": self.scope, "rewind": self.rewind,
                "rounds": [asdict(r) for r in self.rounds]}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for r in self.rounds:
            names += [n for n in r.metric if n not in names]
        return names

    def __str__(self) -> str:
        names = self.metric_names
        header = ("round", "sparsity", "kept", *names, "steps", "seconds")
        rows = [(str(r.round), f"{r.sparsity:.4f}", f"{r.kept}/{r.total}",
                 *(f"{r.metric[n]:.5g}" if n in r.metric else "-" for n in names),
                 str(r.steps), f"{r.seconds:.1f}") for r in self.rounds]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
        title = f"iterative magnitude pruning: {self.fraction:g} of the remaining weights per round, " \
                f"{self.scope}, rewind {self.rewind}"
        return "\n".join([title, lines[0], "-" * len(lines[0]), *lines[1:]])

    def plot(self, path: str | os.PathLike, metric: str | None = None, *, label: str | None = None) -> None:
        """A PNG of the metric against sparsity, one point per round (needs matplotlib)."""
        plot_rounds({label or f"rewind {self.rewind}": self}, path, metric)


def plot_rounds(results: Mapping[str, IMPResult], path: str | os.PathLike, metric: str | None = None) -> None:
    """Several IMP runs (label -> result) on one chart: `metric` (default: the first one) against the
    share of weights left, log-scaled as in the lottery-ticket papers. Uses matplotlib's object API,
    so the caller's pyplot state and backend are left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting IMP rounds needs matplotlib: pip install 'prunekit[plot]'") from None
    if not results:
        raise ValueError("plot_rounds: no results to plot")
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ticks: set[float] = set()
    for label, result in results.items():
        name = metric or (result.metric_names[0] if result.metric_names else None)
        if name is None:
            raise ValueError(f"plot_rounds: {label!r} has no metric to plot (train_fn returned None)")
        points = [(100 * r.kept / r.total, r.metric[name]) for r in result.rounds if name in r.metric]
        if not points:
            raise ValueError(f"plot_rounds: {label!r} has no metric {name!r}; it has {result.metric_names}")
        ax.plot(*zip(*points), marker="o", label=label)
        ticks.update(round(x, 2) for x, _ in points)
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{x:.3g}" for x in sorted(ticks)])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _metric(value, index: int) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, Real) and not isinstance(value, bool):
        return {"metric": float(value)}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        out = {}
        for k, v in value.items():
            v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            if not (isinstance(v, Real) and not isinstance(v, bool)):
                raise TypeError(f"round {index}: train_fn's metric {k!r} is {type(v).__name__}, expected a number")
            out[k] = float(v)
        return out
    raise TypeError(f"round {index}: train_fn returned {type(value).__name__}; expected a number, a dict of "
                    "name -> number, or None")


def _rewind_label(rewind) -> str:
    if rewind is None:
        return "none"
    if rewind in ("init", "reinit"):
        return rewind
    if isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0:
        return "init" if rewind == 0 else f"step {rewind}"
    raise ValueError(f"rewind: expected 'init', a non-negative step number, 'reinit' or None, got {rewind!r}")


def iterative_magnitude(model: nn.Module, train_fn: Callable[[nn.Module, RoundContext], object], rounds: int,
                        fraction: float = 0.2, *, scope: str = "global", rewind="init", masks=None,
                        include=None, exclude=None, blocks: str | None = None, reinit_seed: int | None = None,
                        save_dir: str | os.PathLike | None = None, progress: bool = True) -> IMPResult:
    """Runs `rounds` pruning rounds of IMP on `model` in place (rounds + 1 trainings); see the module
    docstring. The model ends trained under the last round's masks.

    train_fn(model, ctx) trains the model and returns its metric; it must call ctx.step() after each
        optimizer step (ctx: RoundContext with .index, .start_step, .masks, .sparsity).
    masks: start from these masks instead of the dense selected layers (e.g. an earlier run's).
    include / exclude / blocks: the layers to prune (as for prunekit.prune; default every linear layer
        in the model's blocks, or every linear layer of a model without blocks).
    save_dir: writes each round's masks there as round_<i>.safetensors (Masks.save) and the report as
        imp.json.
    """
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0):
        raise ValueError(f"rounds: expected a non-negative number of pruning rounds, got {rounds!r}")
    if not callable(train_fn):
        raise TypeError(f"train_fn: expected a function train_fn(model, ctx), got {type(train_fn).__name__}")
    if not (isinstance(fraction, Real) and 0 < fraction < 1):
        raise ValueError(f"fraction: expected the share of remaining weights to prune, in (0, 1), got {fraction!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    label = _rewind_label(rewind)
    rewind_step = 0 if rewind == "init" else rewind if isinstance(rewind, int) else None
    if masks is None:
        found = calibrate.find_blocks(model, blocks)
        layers = calibrate.select_layers(model, include, exclude, found[0] if found is not None else None)
        if not layers:
            raise calibrate.no_layers_error(model, include, exclude)
        masks = Masks({name: torch.ones_like(calibrate.layer_weight(m), dtype=torch.bool)
                       for name, m in layers.items()})
    else:
        masks = Masks(masks)
        masks.check(model)
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)

    snapshots: list[Snapshot] = []
    if rewind_step == 0:
        snapshots.append(Snapshot(model, 0))
    result = IMPResult([], float(fraction), scope, label)
    log.info("IMP: %d rounds, %g of the remaining weights per round (%s), rewind %s, %d layers",
             rounds, fraction, scope, label, len(masks))
    for index in tqdm(range(rounds + 1), desc="prunekit IMP", unit="round", disable=None if progress else True):
        start_step = 0
        if index > 0:
            masks = prune_remaining(model, masks, fraction, scope)
            if rewind_step is not None:
                snapshots[0].restore(model)
                start_step = rewind_step
            elif rewind == "reinit":
                reinitialize(model, seed=None if reinit_seed is None else reinit_seed + index)
        began = time.perf_counter()
        training = MaskedTraining.from_masks(model, masks)
        snapshot_at = rewind_step if index == 0 and rewind_step else None
        ctx = RoundContext(training, index, start_step, snapshot_at,
                           lambda step: snapshots.append(Snapshot(model, step)))
        try:
            value = train_fn(model, ctx)
            _warn_if_revived(training, index)
        finally:
            training.finalize()
        record = IMPRound(index, masks.sparsity, masks.kept, masks.total, _metric(value, index), ctx.steps,
                          time.perf_counter() - began)
        result.rounds.append(record)
        log.info("IMP round %d: sparsity %.4f, metric %s, %d steps", index, record.sparsity, record.metric,
                 record.steps)
        if index == 0 and rewind_step and not snapshots:
            raise ValueError(f"rewind={rewind}: round 0 made only {ctx.steps} steps (ctx.step() calls), so "
                             f"there is no step-{rewind} state to rewind to")
        if save_dir is not None:
            masks.save(os.path.join(save_dir, f"round_{index}.safetensors"))
            result.to_json(os.path.join(save_dir, "imp.json"))
    result.masks = masks
    return result


def _warn_if_revived(training: MaskedTraining, index: int) -> None:
    revived = [name for name, keep in training.masks.items()
               if bool(calibrate.layer_weight(training.layers[name]).detach()[~keep].ne(0).any())]
    if revived:
        warnings.warn(f"IMP round {index}: pruned weights of {', '.join(revived[:4])} were nonzero when train_fn "
                      "returned (so its metric saw them); call ctx.step() after every optimizer step",
                      stacklevel=3)

"""prunekit.search_allocation: search the per-layer sparsity that keeps the model closest to its dense self.

Search space: one rung of a ladder of sparsities (target ± k·step, up to `spread` away) per group of
layers — a block (default) or a single layer — repaired so that the parameter-weighted mean is the
target exactly (prunekit.search.space). Trials are cheap: every layer is pruned once at every rung from
statistics captured once (prunekit.search.cache); a trial copies the chosen variants into the model and
scores it on held-out calibration batches (prunekit.search.score).

Sampler: optuna's TPE (multivariate, seeded). The space is a handful of ordinal integer choices with an
equality constraint enforced by repair, under a budget of ~100 trials. TPE models integer parameters
natively and is sample-efficient at that budget; the multivariate variant models the interactions the
budget constraint creates between groups. CMA-ES suits continuous spaces and spends its budget on
populations (and needs the `cmaes` package); NSGA-II searches a size-vs-quality front, which is not
needed when the size is a constraint met exactly rather than a second objective. sampler="random"
(optuna's RandomSampler) is there as a baseline.

The uniform allocation (every rung 0) is always the first trial, so the result is never worse than
uniform on the search's own score.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate, data, patterns, preflight, reparam
from .._progress import show_progress
from ..pruning.base import PruningMethod
from .cache import VariantCache
from .result import SearchedAllocation
from .score import OBJECTIVES, Fidelity
from .space import Group, balance, make_groups, make_ladder, weighted_sparsity

log = logging.getLogger("prunekit")

SAMPLERS = ("tpe", "random")


def search_allocation(model: nn.Module, method, calibration, *, target=None, kept: int | None = None,
                      latency=None, objective: str = "auto", trials: int = 100, seed: int = 0,
                      granularity: str = "block", step: float = 0.05, spread: float = 0.15,
                      holdout: float = 0.25, scoring=None, include=None, exclude=None, blocks: str | None = None,
                      device=None, batch_size: int = 1, sampler: str = "tpe",
                      progress: bool | None = None) -> SearchedAllocation:
    """Searches a per-layer sparsity allocation for `method` that meets the overall target exactly.

    method: a prunekit method (prunekit.Wanda(0.6)) or its name ("magnitude", "wanda", "sparsegpt");
        unstructured only (an N:M pattern cannot be re-allocated).
    calibration: as for prunekit.prune. Its last `holdout` share of batches is held out for scoring
        (statistics come from the rest), unless `scoring` (batches in the same forms) is given.
    target: the overall sparsity, a fraction in [0, 1) (default: the method's); or `kept`: the number
        of targeted weights left nonzero. `latency` budgets are not supported (an error says so).
    objective: "auto", "kl", "cosine" or "mse" (prunekit.search.score).
    trials: optuna trials (the first is the uniform allocation). seed: seeds the sampler and torch.
    granularity: "block" (one sparsity per block) or "layer". step, spread: the ladder's rung spacing
        and largest deviation from the target.
    include / exclude / blocks / device / batch_size: as for prunekit.prune.

    Returns a SearchedAllocation: pass it as prunekit.prune(..., allocation=...); `.history` holds
    every trial, `.save(path)` writes the file `prunekit prune --allocation` reads. The weighted mean of
    the allocated sparsities equals the target exactly; each layer's realized sparsity differs from its
    allocated one only by the method's per-row (SparseGPT: per-block) rounding, as for a uniform run.
    """
    import_optuna()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if latency is not None:
        raise ValueError(f"latency={latency!r}: latency budgets are not supported by search_allocation (it has no "
                         "per-layer latency model of the sparse kernels yet); give target= (overall sparsity) "
                         "or kept= (weights left)")
    if target is not None and kept is not None:
        raise ValueError("target and kept are alternatives; give one")
    method = _method(method, target)
    if not (isinstance(trials, int) and not isinstance(trials, bool) and trials >= 1):
        raise ValueError(f"trials: expected a positive integer, got {trials!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if scoring is None and not (isinstance(holdout, (int, float)) and 0 < holdout < 1):
        raise ValueError(f"holdout: expected the share of calibration batches kept for scoring, in (0, 1), got {holdout!r}")

    found = calibrate.find_blocks(model, blocks)
    layers = calibrate.select_layers(model, include, exclude, found[0] if found else None)
    if not layers:
        raise calibrate.no_layers_error(model, include, exclude)
    layers, _ = preflight.split_empty(layers)
    preflight.check_weights(method, layers)
    reparam.check_plain_weights(layers, "search_allocation")
    masked = [name for name, m in layers.items() if reparam.torch_pruned(m)]
    if masked:  # the search writes trial weights into .weight, which torch's pre-hook would overwrite
        raise ValueError(f"search_allocation: {masked[0]} (and {len(masked) - 1} more layers) carry "
                         "torch.nn.utils.prune masks; make them permanent first (torch.nn.utils.prune.remove)")
    numel = {name: calibrate.layer_weight(m).numel() for name, m in layers.items()}
    total = sum(numel.values())
    if kept is not None:
        if not (isinstance(kept, int) and not isinstance(kept, bool)):
            raise TypeError(f"kept: expected an integer number of weights, got {type(kept).__name__}")
        if not 0 < kept <= total:
            raise ValueError(f"kept={kept}: unreachable; the {len(layers)} targeted layers hold {total} weights, "
                             f"so kept must lie in [1, {total}]")
        method = method.with_pattern(1.0 - kept / total)
    goal = method.pattern.sparsity
    groups = make_groups(layers, found, granularity)
    ladder = make_ladder(goal, step, spread)

    stat_batches, score_batches = _split(model, calibration, scoring, holdout, batch_size)
    home = calibrate.model_device(model)
    device = torch.device(device) if device is not None else home
    show = show_progress(progress)
    began = time.perf_counter()
    with calibrate.kept_modes(model, train=False), torch.no_grad(), calibrate.calibration_mode(model), \
            torch.random.fork_rng(devices=[]), _optuna_quiet():
        torch.manual_seed(seed)
        if device != home:
            model.to(device)
        cache = None
        try:
            fidelity = Fidelity(model, score_batches, objective, device)
            cache = VariantCache(model, method, layers, stat_batches, device, ladder, show)
            records, best = _optimize(groups, ladder, cache, fidelity, trials, seed, sampler, show, numel)
        finally:
            if cache is not None:
                cache.restore()
            if device != home:
                model.to(home)
    seconds = time.perf_counter() - began

    chosen = {name: ladder.level(best["rungs"][g.name]) for g in groups for name in g.layers}
    done = [r for r in records if r["state"] == "complete"]
    history = {
        "method": repr(method), "target": goal, "weights": total, "kept": total - goal * total,
        "objective": fidelity.objective, "quality_name": fidelity.quality_name,
        "sampler": f"optuna.{'TPESampler(multivariate=True' if sampler == 'tpe' else 'RandomSampler('}, seed={seed})",
        "seed": seed, "granularity": granularity, "trials_asked": trials,
        "ladder": {"step": ladder.step, "k_min": ladder.k_min, "k_max": ladder.k_max,
                   "levels": [ladder.level(k) for k in ladder.rungs]},
        "groups": [{"name": g.name, "layers": list(g.layers), "numel": g.numel} for g in groups],
        "batches": {"statistics": len(stat_batches), "scoring": len(score_batches)},
        "seconds": {"statistics": cache.stats_seconds, "variants": cache.seconds - cache.stats_seconds,
                    "trials": sum(r["seconds"] for r in records), "total": seconds,
                    "trial_median": statistics.median([r["seconds"] for r in done if not r["repeat"]] or [0.0])},
        "uniform": {k: records[0][k] for k in ("loss", "quality")},
        "best": {k: best[k] for k in ("number", "loss", "quality")},
        "allocation": chosen,
        "trials": records,
    }
    log.info("search: %s %.4f (uniform %.4f) after %d trials in %.1f s", fidelity.quality_name,
             best["quality"], records[0]["quality"], len(records), seconds)
    return SearchedAllocation(chosen, history)


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("prunekit.search_allocation needs optuna: pip install 'prunekit[search]'") from None
    return optuna


def _method(method, target) -> PruningMethod:
    from ..pipeline import METHODS, make_method

    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float, str)):
            raise TypeError(f"target: expected the overall sparsity, a fraction in [0, 1), got {type(target).__name__}")
        if isinstance(target, (int, float)) and not 0 <= target < 1:
            raise ValueError(f"target={target!r}: the overall sparsity must be a fraction in [0, 1)"
                             + (" (to keep a number of weights, use kept=)" if target >= 1 else ""))
        pattern = patterns.parse(target)
        if pattern.is_nm:
            raise ValueError(f"target={target!r}: an N:M pattern keeps N of every M weights in every layer and "
                             "cannot be re-allocated; give a fraction like 0.6")
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method: expected one of {sorted(METHODS)} or a prunekit method, got {method!r}")
        method = make_method(method, target if target is not None else 0.5)
    elif not isinstance(method, PruningMethod):
        raise TypeError(f"method: expected a prunekit pruning method (e.g. prunekit.Wanda(0.6)) or its name, "
                        f"got {type(method).__name__}")
    elif target is not None:
        method = method.with_pattern(target)
    if method.pattern.is_nm:
        raise ValueError(f"method {method!r}: an N:M pattern cannot be re-allocated; use a fraction like 0.6")
    if getattr(method, "scope", None) == "global":
        raise ValueError(f"method {method!r}: scope='global' already picks one threshold for all layers; "
                         "use scope='layer' or 'row' with a searched allocation")
    return method


def _split(model, calibration, scoring, holdout, batch_size):
    """(batches for the statistics, batches for scoring)."""
    limits = dict(batch_size=batch_size, max_len=data.max_positions(model), vocab=data.vocab_size(model))
    if calibration is None:
        raise ValueError("calibration: the search needs calibration data (token ids [n_samples, seq_len] or batches)")
    batches = data.as_batches(calibration, **limits)
    if scoring is not None:
        return batches, data.as_batches(scoring, **limits)
    if len(batches) < 2:
        raise ValueError(f"calibration: {len(batches)} batch; the search holds some out for scoring, so it needs "
                         "at least 2 (use more samples or a smaller batch_size, or pass scoring=)")
    n_score = min(len(batches) - 1, max(1, round(holdout * len(batches))))
    return batches[:-n_score], batches[-n_score:]


@contextlib.contextmanager
def _optuna_quiet():
    """optuna logs every trial at INFO; the search shows its own bar instead. Restored afterwards."""
    optuna = import_optuna()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _optimize(groups: list[Group], ladder, cache: VariantCache, fidelity: Fidelity, trials: int, seed: int,
              sampler: str, show: bool, numel: dict[str, int]):
    """Runs the study; returns (a record per trial, the best record)."""
    optuna = import_optuna()
    sizes = [g.numel for g in groups]
    scored: dict[tuple, float] = {}
    records: list[dict] = []
    if sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    else:
        chosen = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="minimize", sampler=chosen)
    study.enqueue_trial({g.name: 0 for g in groups})  # trial 0: the uniform allocation
    bar = tqdm(total=trials, desc="prunekit search", unit="trial", disable=not show)

    def objective(trial) -> float:
        began = time.perf_counter()
        raw = [trial.suggest_int(g.name, ladder.k_min, ladder.k_max) for g in groups]
        ks = balance(raw, sizes, ladder)
        record = {"number": trial.number, "raw": dict(zip((g.name for g in groups), raw)), "state": "infeasible",
                  "rungs": None, "sparsity": None, "loss": None, "quality": None, "repeat": False}
        records.append(record)
        if ks is None:
            record["seconds"] = time.perf_counter() - began
            bar.update(1)
            raise optuna.TrialPruned("no balanced rungs near these")
        rungs = {g.name: k for g, k in zip(groups, ks)}
        per_layer = {name: ladder.level(rungs[g.name]) for g in groups for name in g.layers}
        overall = weighted_sparsity(per_layer, numel)
        if abs(overall - ladder.target) > 1e-9:  # balance() guarantees Σ n·k = 0; this guards the arithmetic
            raise RuntimeError(f"search: trial {trial.number} has overall sparsity {overall!r}, not the target "
                               f"{ladder.target!r}")
        key = tuple(ks)
        record["repeat"] = key in scored
        if key not in scored:
            cache.assemble({name: rungs[g.name] for g in groups for name in g.layers})
            scored[key] = fidelity.loss()
        loss = scored[key]
        record.update(state="complete", rungs=rungs, sparsity=overall, loss=loss, quality=fidelity.quality(loss),
                      seconds=time.perf_counter() - began)
        bar.update(1)
        best = min(r["loss"] for r in records if r["loss"] is not None)
        bar.set_postfix_str(f"{fidelity.quality_name} best {fidelity.quality(best):.4f}")
        return loss

    try:
        study.optimize(objective, n_trials=trials, catch=())
    finally:
        bar.close()
    complete = [r for r in records if r["state"] == "complete"]
    if not complete:
        raise RuntimeError("search: no trial met the target exactly; use granularity='block' or a smaller step")
    best = min(complete, key=lambda r: (r["loss"], r["number"]))
    return records, best

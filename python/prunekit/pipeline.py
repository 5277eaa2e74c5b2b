"""prunekit.prune: prune every targeted linear layer of a model, block by block, as the references do.

(The module is pipeline.py, not prune.py: a submodule named like the function would shadow
`prunekit.prune` once imported.)

For each block: run the calibration inputs through it with hooks that accumulate each layer's
statistics, prune the block's layers, then run it again to measure each layer's reconstruction error
and to produce the inputs of the next block — so block i+1 is calibrated on the outputs of the pruned
blocks before it. Linear layers outside the block list (only when `include` asks for them), and every
layer of a model without blocks, are pruned afterwards from statistics of whole-model forwards.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibrate, data, preflight, reparam
from ._progress import show_progress
from .collect import collect_stats
from .distributed import partition as dist_partition
from .distributed import reduce as dist_reduce
from .distributed import session as dist_session
from .distributed import share as dist_share
from .pruning.allocation import Context, LayerSparsity, as_allocation
from .pruning import block_reconstruct
from .pruning.base import LayerResult, PruningMethod
from .pruning.refine import Refined
from .pruning.refine import as_steps as refine_steps
from .pruning.refine import check_method as check_refinable
from .report import LayerReport, PruneReport

log = logging.getLogger("prunekit")

METHODS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


def make_method(name: str, sparsity) -> PruningMethod:
    """A pruning method by its command-line name: make_method("wanda", "2:4") is prunekit.Wanda("2:4")."""
    import prunekit

    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return getattr(prunekit, METHODS[name])(sparsity)


def prune(model: nn.Module, method: PruningMethod, calibration, *, include=None, exclude=None,
          offload: bool = False, device=None, blocks: str | None = None, seed: int = 0,
          progress: bool | None = None, batch_size: int = 1, allocation=None, refine=None,
          distributed: bool | None = None) -> PruneReport:
    """Prunes `model` in place with `method` and returns a per-layer report.

    calibration: token ids [n_samples, seq_len] (see prunekit.data), or a list of batches (tensors or
        dicts of model inputs). A tensor is fed `batch_size` rows at a time. None for magnitude
        pruning: the weights are pruned without any forward, and the report's errors are None.
    include / exclude: layer-name patterns (shell globs; a regular expression with a `re:` prefix; see
        prunekit.patterns). By default every linear layer inside the model's blocks is pruned, and the
        LM head and embeddings stay dense.
    device: where the computation runs (default: where the model is). The model is left where it was.
    offload: keep the model on its own device (CPU) and bring only the block being pruned to `device`.
    blocks: dotted name of the block list (e.g. "model.layers") when it cannot be discovered.
    seed: seeds torch's RNG for the run, so a given seed gives the same result.
    progress: tqdm bars (default: only when stderr is a terminal).
    allocation: per-layer sparsity: prunekit.OWL(), or a dict of layer-name pattern -> sparsity
        (see prunekit.pruning.allocation); the method's sparsity is the target.
    refine: refinement steps run on each layer after the method, in order, on the same statistics
        (e.g. [prunekit.DSnoT(), prunekit.LeastSquares()]; see prunekit.pruning.refine); a last
        prunekit.BlockReconstruct() trains each block's kept weights against the dense block's outputs.
    distributed: None (default) runs across the ranks of a torch.distributed process group of several
        processes when there is one (torchrun; prunekit initializes it from torchrun's environment
        when needed): each rank calibrates on its share of the batches and prunes its share of each
        block's layers, and every rank ends with the whole pruned model (the same one a single process
        would make, up to float summation order). Every rank must pass the same model, method and
        data. False: this process prunes alone. See prunekit.distributed.
    """
    home = calibrate.model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    session = dist_session.start(distributed, device if device is not None else home)
    with dist_session.running(session):
        return _prune(model, method, calibration, include=include, exclude=exclude, offload=offload,
                      device=session.device if session is not None else device, blocks=blocks, seed=seed,
                      progress=progress, batch_size=batch_size, allocation=allocation, refine=refine,
                      session=session)


def _prune(model, method, calibration, *, include, exclude, offload, device, blocks, seed, progress,
           batch_size, allocation, refine, session) -> PruneReport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, PruningMethod):
        raise TypeError(f"method: expected a prunekit pruning method (e.g. prunekit.Wanda(0.5)), "
                        f"got {type(method).__name__}")
    allocation = as_allocation(allocation)
    progress = show_progress(progress) and (session is None or session.rank == 0)  # default: on a terminal
    refine, block_step = block_reconstruct.split_steps(refine_steps(refine))
    if block_step is not None and session is not None:
        raise ValueError(f"refine: {block_step!r} does not run distributed (each rank holds a different "
                         "share of the calibration batches); run it in one process (distributed=False)")
    if refine or block_step:
        check_refinable(method)
        if calibration is None:
            raise ValueError("calibration: refine=... needs calibration data (each step works on the layer's "
                             "Hessian from the calibration inputs)")
    start = time.perf_counter()
    home = calibrate.model_device(model)
    device = torch.device(device) if device is not None else home
    batches = _batches_or_none(calibration, method, allocation, model, batch_size)
    if session is not None:
        session.agree("arguments", dist_session.fingerprint(model, method, batches, include, exclude, allocation))
        if batches is not None:
            batches = session.shard(batches)
    found = calibrate.find_blocks(model, blocks)
    block_path, block_list = found if found is not None else (None, None)
    targets = calibrate.select_layers(model, include, exclude, block_path)
    if not targets:
        raise calibrate.no_layers_error(model, include, exclude)
    if block_step is not None and block_list is None:
        raise ValueError(f"refine: {block_step!r} works block by block, and no block list was found in "
                         f"{type(model).__name__}; name it with blocks=...")
    # Everything that can be known before a forward is checked on every layer before anything changes.
    targets, skipped = preflight.split_empty(targets)
    preflight.check_weights(method, targets)
    preflight.check_tied(model, targets)
    if allocation is not None:
        allocation.check(method, targets)
    reparam.plain_weights(targets, "prune")  # torch.nn.utils.prune masks: fold them, with a warning
    skipped += preflight.unpruned_block_weights(block_path, block_list, targets)
    log.info("pruning %d layers with %r on %s (blocks: %s, %d calibration batches)",
             len(targets), method, device, block_path or "none", len(batches or ()))

    report = PruneReport(method=repr(method), pattern=str(method.pattern), blocks=block_path)
    report.skipped = skipped
    target = method.pattern.sparsity
    if getattr(method, "scope", None) == "global":
        method = _GlobalMagnitude(method, targets)
    if offload and block_list is None:
        log.warning("offload needs a block list; the whole model goes to %s", device)
    offload = offload and block_list is not None and device != home
    with calibrate.kept_modes(model, train=False):
        try:
            if offload:
                calibrate.move_outside_blocks(model, block_list, device)
            elif device != home:
                model.to(device)
            with torch.no_grad(), _seeded(seed, device), calibrate.calibration_mode(model):
                if method.needs_hessian or method.needs_act_norm:
                    preflight.check_called(model, targets, lambda: _whole_model_run(
                        model, batches, device, block_list if offload else None, home)(0))
                if allocation is not None:
                    if session is not None:
                        session.where = "allocation"
                    method = allocation.apply(method, targets, Context(model, batches, device, found,
                                                                       home if offload else None, progress))
                if refine:
                    method = Refined(method, refine)
                    report.method = repr(method)
                if block_step is not None:
                    report.method = f"{report.method} + {block_step!r}"
                done = set()
                if batches is None:  # no calibration data: weights only, no error pass
                    _prune_weights_only(targets, method, report)
                    done = set(targets)
                elif block_list is not None:
                    done = _prune_blocks(model, block_path, block_list, targets, batches, method, device,
                                         home if offload else None, progress, report, block_step)
                rest = {name: m for name, m in targets.items() if name not in done}
                if rest:
                    _prune_whole_model(model, rest, batches, method, device, block_list if offload else None,
                                       home, report)
        finally:
            if offload:
                calibrate.move_outside_blocks(model, block_list, home)
                block_list.to(home)  # a no-op unless a block was left on the device by an error
            elif device != home:
                model.to(home)
    if session is not None:
        session.where = "end"
        report.distributed = session.summary()
    report.seconds = time.perf_counter() - start
    _check_target(report, target, allocation, per_layer=not isinstance(method, _GlobalMagnitude))
    log.info("pruned %d layers to sparsity %.4f in %.1f s", len(report.layers), report.sparsity, report.seconds)
    return report


def _check_target(report: PruneReport, target: float, allocation, per_layer: bool = True) -> None:
    """Warns (and records in the report) when a layer's zeros fall short of its own sparsity, or the
    total falls short of the target (an allocation that had to clamp), by more than the per-row rounding
    of a layer's width. A dict allocation's target is its layers' weighted mean."""
    if not report.layers:
        return
    chosen = getattr(allocation, "layer_sparsity", {}) if allocation is not None else {}

    def slack(row) -> float:  # one row's or one column's worth of rounding
        return 1.0 / min(row.shape) + 1e-9

    short = [] if per_layer is False else [
        row.name for row in report.layers if row.sparsity < chosen.get(row.name, target) - slack(row)]
    if short:
        _warn(report, f"prunekit.prune: {len(short)} layer(s) are less sparse than asked: "
                      f"{', '.join(short[:6])}{', ...' if len(short) > 6 else ''}")
    if isinstance(allocation, LayerSparsity):
        total = sum(row.numel for row in report.layers)
        target = sum(chosen.get(row.name, target) * row.numel for row in report.layers) / total
    if report.sparsity < target - max(slack(row) for row in report.layers):
        why = f" ({allocation!r} moved layers' sparsities)" if allocation is not None else ""
        _warn(report, f"prunekit.prune: the pruned layers are {report.sparsity:.4f} sparse, below the "
                      f"target {target:.4f}{why}")


def _warn(report: PruneReport, message: str) -> None:
    report.warnings.append(message)
    warnings.warn(message, stacklevel=4)


def _batches_or_none(calibration, method, allocation, model, batch_size):
    """The calibration batches; None when none were given and nothing needs them (magnitude)."""
    if calibration is not None:
        return data.as_batches(calibration, batch_size=batch_size, max_len=data.max_positions(model),
                               vocab=data.vocab_size(model))
    if method.needs_hessian or method.needs_act_norm:
        raise ValueError(f"calibration: {method!r} needs calibration data (token ids [n_samples, seq_len]; "
                         f"see prunekit.data); only magnitude pruning runs without")
    if allocation is not None and not isinstance(allocation, LayerSparsity):
        raise ValueError(f"calibration: allocation={allocation!r} needs calibration data")
    return None


def _prune_weights_only(targets, method, report) -> None:
    """Prunes each layer from its weight alone (calibration=None); the report's error is None."""
    for name, module in targets.items():
        dense = calibrate.layer_weight(module).detach().clone()
        began = time.perf_counter()
        result = method.prune_layer(dense.clone(), None, name)
        _check_result(result, dense, name, method)
        calibrate.set_layer_weight(module, result.weight)
        report.layers.append(LayerReport(name=name, shape=tuple(dense.shape), pattern=str(result.pattern),
                                         sparsity=float(result.weight.eq(0).float().mean()), error=None,
                                         seconds=time.perf_counter() - began, damping=result.damping,
                                         notes=list(result.notes)))


class _GlobalMagnitude(PruningMethod):
    """Magnitude(scope="global"): one threshold over all targeted layers, so the masks are chosen
    up front (magnitude needs no calibration data) and handed out layer by layer."""

    def __init__(self, method: PruningMethod, targets: dict[str, nn.Module]):
        from .pruning.magnitude import global_magnitude_masks

        self.method, self.pattern = method, method.pattern
        weights = {name: calibrate.layer_weight(m).detach() for name, m in targets.items()}
        self.masks = global_magnitude_masks(weights, method.pattern, score=method.score)

    def prune_layer(self, weight, stats=None, name="layer") -> LayerResult:
        keep = self.masks.pop(name).to(weight.device)
        return LayerResult(weight=weight.masked_fill(~keep, 0), mask=keep, pattern=self.pattern)

    def __repr__(self) -> str:
        return repr(self.method)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _prune_blocks(model, block_path, block_list, targets, batches, method, device, offload_home,
                  progress, report, block_step=None) -> set[str]:
    """Walks the blocks in order, up to the last one holding a targeted layer; returns the names
    of the layers it pruned."""
    per_block = []
    for child, block in block_list.named_children():
        prefix = f"{block_path}.{child}."
        per_block.append((block, {name: m for name, m in targets.items() if name.startswith(prefix)}))
    while per_block and not per_block[-1][1]:
        per_block.pop()
    if not per_block:
        return set()
    inputs = calibrate.capture_block_inputs(model, block_list, batches, device, last=len(per_block) - 1)
    dense = block_reconstruct.Targets(block_step, inputs) if block_step is not None else None
    done: set[str] = set()
    bar = tqdm(per_block, desc=f"prunekit {method!r}", unit="block", disable=not progress)
    for index, (block, layers) in enumerate(bar):
        if dist_session.active() is not None:
            dist_session.active().where = f"block {index}"
        if offload_home is not None:
            block.to(device)

        def run(j: int, block=block, index=index) -> torch.Tensor:
            return inputs[j].call(block, index)

        after_prune = None
        if dense is not None:
            wanted = dense.before_pruning(block, index, inputs)  # the dense block's outputs

            def after_prune(masks, block=block, index=index, layers=layers, wanted=wanted):
                return block_step.reconstruct(block, index, {n: layers[n] for n in masks}, masks, inputs, wanted)
        if layers:
            outputs = _prune_layers(layers, run, len(inputs), method, device, report,
                                    lambda j: inputs[j].tokens_per_sample, after_prune)
        else:
            outputs = [run(j) for j in range(len(inputs))]
        for inp, out in zip(inputs, outputs):
            inp.hidden = out
        if offload_home is not None:
            block.to(offload_home)
        done.update(layers)
        if layers:
            errors = sum(r.error for r in report.layers[-len(layers):])
            log.info("block %d/%d: %d layers pruned, reconstruction error %.4g", index + 1, len(bar),
                     len(layers), errors)
    return done


def _whole_model_run(model, batches, device, offload_blocks, home):
    """run(j): one forward of batch j through the whole model (blocks visiting `device` when offloading)."""
    extra = calibrate.forward_kwargs(model)

    def run(j: int) -> None:
        offloading = (calibrate.OffloadHooks(offload_blocks, device, home) if offload_blocks is not None
                      else contextlib.nullcontext())
        with offloading:
            model(**calibrate.to_device(batches[j], device), **extra)
    return run


def _sequence_length(batch: dict) -> int | None:
    ids = batch.get("input_ids")
    return ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _prune_whole_model(model, layers, batches, method, device, offload_blocks, home, report) -> None:
    """Prunes layers with statistics from whole-model forwards (models without blocks, or layers
    outside the block list)."""
    run = _whole_model_run(model, batches, device, offload_blocks, home)
    if dist_session.active() is not None:
        dist_session.active().where = "layers outside the blocks"
    _prune_layers(layers, run, len(batches), method, device, report, lambda j: _sequence_length(batches[j]))


def _prune_layers(layers: dict[str, nn.Module], run, n_batches: int, method: PruningMethod,
                  device: torch.device, report: PruneReport, tokens_of=lambda j: None, after_prune=None) -> list:
    """Statistics pass, pruning, `after_prune(masks)` (block reconstruction, single process only: returns
    its record, kept with the block's first layer), then a re-run that measures each layer's error;
    returns the re-run's outputs."""
    stats = collect_stats(layers, run, n_batches, method, device, tokens_of)  # summed over ranks if distributed
    session = dist_session.active()
    if session is not None:  # each layer is pruned by one rank (its owner) and broadcast
        owner = dist_partition.owners(layers, stats, method.needs_hessian, session.world)
    deltas: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}  # dense weights, for the error after block reconstruction
    rows: dict[str, LayerReport] = {}
    for name, module in layers.items():
        dense = calibrate.layer_weight(module).detach().clone()
        if stats[name] is not None and stats[name].nsamples == 0:
            message = (f"{name} received no calibration input (never called on these batches, e.g. an "
                       "expert no token was routed to); left dense")
            warnings.warn(message, stacklevel=4)
            report.warnings.append(message)
            report.skipped.append({"name": name, "shape": list(dense.shape), "reason": message})
            continue
        if session is not None and owner[name] != session.rank:
            continue
        began = _clock(device)
        result = method.prune_layer(dense.clone(), stats[name], name)
        seconds = _clock(device) - began
        _check_result(result, dense, name, method)
        calibrate.set_layer_weight(module, result.weight)
        deltas[name] = dense.float() - result.weight.float()
        masks[name] = result.mask
        if after_prune is not None:
            kept[name] = dense.float()
        rows[name] = LayerReport(name=name, shape=tuple(dense.shape), pattern=str(result.pattern),
                                 sparsity=float(result.weight.eq(0).float().mean()), error=0.0,
                                 seconds=seconds, damping=result.damping, notes=list(result.notes),
                                 refine=[r.as_dict() for r in result.refine])
        if getattr(result, "quant", None) is not None:
            report.quant[name] = result.quant
        for note in result.notes:
            log.info(note)
        if session is not None:
            session.layers_pruned += 1
            session.prune_seconds += seconds
    del stats
    if session is not None:
        rows = dist_share.share_pruned(session, layers, owner, rows, deltas, report.quant)
    if after_prune is not None and rows:
        record = after_prune({name: masks[name] for name in rows})
        next(iter(rows.values())).refine.append(record)
        for name in rows:  # the error pass measures the reconstructed weights
            deltas[name] = kept[name] - calibrate.layer_weight(layers[name]).detach().float()
        kept.clear()

    errors = {name: torch.zeros((), dtype=torch.float64, device=device) for name in rows}

    def measure(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, deltas[name].shape[1]).float()
            errors[name] += (x @ deltas[name].t()).pow(2).sum().double()  # fp32 per batch, fp64 across
        return hook

    handles = [layers[name].register_forward_hook(measure(name)) for name in rows]
    try:
        outputs = [run(j) for j in range(n_batches)]
    finally:
        for h in handles:
            h.remove()
    if session is not None:
        dist_reduce.sum_errors(session, errors)
    for name, row in rows.items():
        row.error = errors[name].item()
        report.layers.append(row)
    return outputs


def _check_result(result: LayerResult, dense: torch.Tensor, name: str, method: PruningMethod) -> None:
    if not isinstance(result, LayerResult):
        raise TypeError(f"{method!r}.prune_layer({name}) returned {type(result).__name__}, expected a LayerResult")
    if tuple(result.weight.shape) != tuple(dense.shape) or tuple(result.mask.shape) != tuple(dense.shape):
        raise RuntimeError(f"{method!r} returned weight {tuple(result.weight.shape)} / mask "
                           f"{tuple(result.mask.shape)} for {name}, expected {tuple(dense.shape)}")
    if bool(result.weight.ne(0).logical_and_(~result.mask).any()):
        raise RuntimeError(f"{method!r} left nonzero weights outside its mask in {name}")


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

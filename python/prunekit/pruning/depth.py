"""Depth pruning: remove whole transformer blocks (LLM-Pruner's layer-wise pruning, Minitron's depth axis).

    report = prunekit.prune_depth(model, calib_ids, n_blocks=2, importance="angular")

Block importance, measured on calibration data:
- "angular" (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"; ShortGPT's
  block influence is 1 − cos of the same pair): the mean over tokens of arccos(cos(x_in, x_out)) / π
  between a block's input and output hidden states. A block that barely turns its input is cheap to drop.
- "loss": the increase of the next-token loss when the block alone is skipped (its output replaced
  by its input), summed over the calibration batches.

The `n_blocks` least important blocks are removed (ties: the later block first). The block list is
rebuilt, `num_hidden_layers` and the per-layer config lists (e.g. `layer_types`, any list with one
entry per block) are cut to the kept blocks, and the attention modules' `layer_idx` (the KV-cache slot)
is renumbered, so the model generates and save_pretrained / from_pretrained round-trip.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import calibrate, data

log = logging.getLogger("prunekit")

IMPORTANCES = ("angular", "loss")


@dataclass
class DepthReport:
    importance: str
    blocks: str
    n_blocks: tuple[int, int]                 # before, after
    removed: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)   # per original block
    params: tuple[int, int] = (0, 0)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"depth pruning ({self.importance}) of {self.blocks}: blocks {self.n_blocks[0]} -> "
                f"{self.n_blocks[1]} (removed {self.removed}), params {self.params[0]:,} -> "
                f"{self.params[1]:,} in {self.seconds:.2f} s")


def _hidden(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


def _block_input(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError(f"a block was called without hidden states (kwargs {sorted(kwargs)})")


@torch.no_grad()
def angular_distances(model: nn.Module, block_list: nn.ModuleList, batches: list[dict]) -> list[float]:
    """Per block: mean over (non-padding) tokens of arccos(cos(input, output)) / π."""
    device = calibrate.model_device(model)
    sums = [0.0] * len(block_list)
    counts = [0] * len(block_list)
    state = {}

    def pre(index):
        def hook(module, args, kwargs):
            state[index] = _block_input(args, kwargs).detach()
        return hook

    def post(index):
        def hook(module, args, kwargs, output):
            x, y = state.pop(index).float(), _hidden(output).float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1)
            angle = torch.arccos(cos) / math.pi
            keep = state.get("mask")
            angle = angle[keep] if keep is not None and keep.shape == angle.shape else angle.flatten()
            sums[index] += float(angle.sum(dtype=torch.float64))
            counts[index] += angle.numel()
        return hook

    handles = []
    for i, block in enumerate(block_list):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i), with_kwargs=True))
    try:
        for batch in batches:
            batch = calibrate.to_device(batch, device)
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            model(**batch, **calibrate.forward_kwargs(model))
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def _lm_loss(model: nn.Module, batches: list[dict], device) -> float:
    total = 0.0
    for batch in batches:
        batch = calibrate.to_device(batch, device)
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels, **calibrate.forward_kwargs(model))
        total += float(out.loss)
    return total


@torch.no_grad()
def loss_increases(model: nn.Module, block_list: nn.ModuleList, batches: list[dict]) -> list[float]:
    """Per block: LM loss (summed over batches) with the block skipped, minus the loss of the full model."""
    if any("input_ids" not in b for b in batches):
        raise ValueError("importance='loss' needs input_ids in every calibration batch")
    device = calibrate.model_device(model)
    base = _lm_loss(model, batches, device)
    scores = []
    for block in block_list:
        def skip(module, args, kwargs, output):
            x = _block_input(args, kwargs)
            return x if isinstance(output, torch.Tensor) else (x,) + tuple(output[1:])
        handle = block.register_forward_hook(skip, with_kwargs=True)
        try:
            scores.append(_lm_loss(model, batches, device) - base)
        finally:
            handle.remove()
    return scores


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise ValueError(f"prune_depth: {type(model).__name__} has no Hugging Face config with "
                         f"num_hidden_layers; depth pruning updates it so the model can be reloaded")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def prune_depth(model: nn.Module, calibration=None, *, n_blocks: int | None = None, ratio: float | None = None,
                importance: str = "angular", remove: list[int] | None = None, blocks: str | None = None,
                batch_size: int = 1) -> DepthReport:
    """Removes whole blocks from `model` in place and returns a DepthReport.

    n_blocks / ratio: how many blocks to remove (ratio of the block count, rounded to nearest),
        chosen by `importance` on `calibration` (token ids [n, seq_len] or batches); or
    remove: explicit block indices (no calibration needed).
    """
    start = time.perf_counter()
    if importance not in IMPORTANCES:
        raise ValueError(f"importance: expected one of {IMPORTANCES}, got {importance!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    config = _config(model)
    found = calibrate.find_blocks(model, blocks)
    if found is None:
        raise ValueError(f"prune_depth: {type(model).__name__} has no list of transformer blocks; name it "
                         f"with blocks=...")
    block_path, block_list = found
    total = len(block_list)
    if config.num_hidden_layers != total:
        raise ValueError(f"prune_depth: {block_path} has {total} blocks but config.num_hidden_layers is "
                         f"{config.num_hidden_layers}")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("prune_depth: the config scales attention by 1/layer_idx, so a block's output "
                         "depends on its position and would change when earlier blocks are removed")
    given = [x is not None for x in (n_blocks, ratio, remove)]
    if sum(given) != 1:
        raise ValueError("prune_depth: give exactly one of n_blocks, ratio or remove")
    report = DepthReport(importance=importance if remove is None else "given", blocks=block_path,
                         n_blocks=(total, 0), params=(sum(p.numel() for p in model.parameters()), 0))
    if remove is not None:
        removed = sorted(set(int(i) for i in remove))
        if any(not 0 <= i < total for i in removed):
            raise ValueError(f"remove: block indices must lie in [0, {total}), got {remove}")
    else:
        if ratio is not None:
            if not 0.0 <= float(ratio) < 1.0:
                raise ValueError(f"ratio: expected a fraction in [0, 1), got {ratio!r}")
            n_blocks = int(math.floor(float(ratio) * total + 0.5))
        if not (isinstance(n_blocks, int) and 0 <= n_blocks):
            raise ValueError(f"n_blocks: expected a non-negative integer, got {n_blocks!r}")
        if calibration is None:
            raise ValueError(f"importance={importance!r} needs calibration data (token ids or batches)")
        batches = data.as_batches(calibration, batch_size=batch_size, max_len=data.max_positions(model),
                                  vocab=data.vocab_size(model))
        with calibrate.kept_modes(model, train=False):  # each submodule's own flag comes back
            scores = (angular_distances if importance == "angular" else loss_increases)(model, block_list, batches)
        report.scores = scores
        order = sorted(range(total), key=lambda i: (scores[i], -i))
        removed = sorted(order[:n_blocks])
    if len(removed) >= total:
        raise ValueError(f"prune_depth: removing {len(removed)} of {total} blocks would leave none")
    _remove_blocks(model, config, block_path, block_list, removed)
    report.removed = removed
    report.n_blocks = (total, total - len(removed))
    report.params = (report.params[0], sum(p.numel() for p in model.parameters()))
    report.seconds = time.perf_counter() - start
    log.info("%s", report)
    return report


def _remove_blocks(model, config, block_path, block_list, removed) -> None:
    total = len(block_list)
    kept = [i for i in range(total) if i not in set(removed)]
    if not removed:
        return
    new_list = type(block_list)([block_list[i] for i in kept])
    parent, _, name = block_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new_list)
    for new_index, block in enumerate(new_list):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for key, value in list(vars(config).items()):
        if "layer" not in key or not isinstance(value, (list, tuple)):
            continue
        if len(value) == total:  # one entry per block (layer_types, no_rope_layers, ...)
            setattr(config, key, type(value)(value[i] for i in kept))
            log.info("prune_depth: config.%s cut to the kept blocks", key)
        else:
            log.warning("prune_depth: config.%s = %r is not one entry per block; left unchanged", key, value)
    config.num_hidden_layers = len(kept)

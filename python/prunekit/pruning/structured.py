"""Structured pruning of transformer blocks: whole attention heads and MLP channels are removed and the
model physically shrinks (LLM-Pruner style dependency groups, one-shot, no recovery training).

The pieces, one concept a module:
- structured_groups: where a head group's / an MLP channel's weights live in a block (per family);
- structured_importance: one score per group (l1, l2, taylor, activation) and the choice of kept groups;
- structured_plan: how many groups each block keeps, and whether the config can describe that;
- structured_shrink: removing the rows / columns and updating the config.

Counts: every block keeps the same number of heads (each block picks its own), because a Hugging Face
config has one `num_attention_heads`; MLP widths may differ per block (`mlp=[...]`, one fraction per
block, e.g. from an allocation) only where the config stores a per-layer width list that
`from_pretrained` reads back (Gemma3n's `intermediate_size`), and are refused with that reason elsewhere.
Head pruning needs a config that names head_dim separately from hidden_size (Llama, Mistral, Qwen2/3,
Gemma3n, ...): OPT, GPT-2 and BERT derive head_dim = hidden_size / num_attention_heads, so a model with
fewer heads of the same size cannot be reloaded and is refused (their MLP channels can be pruned).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field

from torch import nn

from .. import calibrate, reparam
from .structured_groups import detect_family, group_kinds
from .structured_importance import IMPORTANCES, importances, select_kept
from .structured_plan import block_ratios, plan
from .structured_shrink import shrink, update_config

log = logging.getLogger("prunekit")

# ----------------------------------------------------------------------------------- report
@dataclass
class StructuredReport:
    """What prune_structured did. `kept[i]` holds block i's kept KV-group and channel indices."""

    family: str
    importance: str
    blocks: str
    heads: tuple[int, int] | None = None       # attention heads per block: before, after
    kv_heads: tuple[int, int] | None = None    # key/value heads per block: before, after
    mlp: tuple | None = None                   # MLP channels per block: before, after (lists when per block)
    params: tuple[int, int] = (0, 0)           # model parameters: before, after
    kept: list[dict[str, list[int]]] = field(default_factory=list)
    seconds: float = 0.0
    removed: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind: (requested, removed) fraction
    notes: list[str] = field(default_factory=list)  # what rounding did to the requested fractions

    @property
    def param_ratio(self) -> float:
        return self.params[1] / self.params[0] if self.params[0] else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"structured pruning ({self.family}, importance={self.importance}) of {self.blocks}:"]
        for name in ("heads", "kv_heads", "mlp"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} {value[0]} -> {value[1]}")
        parts.append(f"params {self.params[0]:,} -> {self.params[1]:,} ({self.param_ratio:.1%}) "
                     f"in {self.seconds:.2f} s")
        return "\n".join([" ".join(parts), *(f"note: {n}" for n in self.notes)])


# ----------------------------------------------------------------------------------- public
def prune_structured(model: nn.Module, *, heads=0.0, mlp=0.0, importance: str = "l2",
                     calibration=None, blocks: str | None = None, round_to: int = 1,
                     batch_size: int = 1, progress: bool | None = None) -> StructuredReport:
    """Removes a fraction of the attention heads and MLP channels of every block, in place.

    heads: fraction of key/value groups to remove per block (a KV head with the query heads that
        read it; one head for plain multi-head attention), rounded to the nearest whole group.
    mlp: fraction of MLP channels to remove per block; the kept width is rounded to the nearest
        multiple of `round_to` (e.g. 8 or 64 for tensor-core friendly widths).
        Either may be a list with one fraction per block; counts that then differ between blocks are
        refused unless the config stores per-block widths (see the module docstring).
    importance: "l1" (Σ|w|) or "l2" (sqrt Σw²) over all weights of a group; "taylor": Σ|w·∂L/∂w|
        with the gradient of the LM loss summed over the calibration batches (needs a model with an
        LM head); "activation": mean |input| of the group's down/o_proj input columns over the
        calibration tokens, summed over the group.
    calibration: token ids [n_samples, seq_len] or a list of batches (see prunekit.data), needed by
        "taylor" and "activation".
    blocks: dotted name of the block list when it cannot be discovered.
    progress: a tqdm bar over the calibration batches (default: only on a terminal).

    Rounding (whole groups, `round_to`) can remove more or less than asked: the report's `removed` and
    `notes` say what was removed, and a difference of a percentage point or more is also a warning.

    The updated config describes the model, so save_pretrained / from_pretrained round-trip.
    Returns a StructuredReport.
    """
    start = time.perf_counter()
    if importance not in IMPORTANCES:
        raise ValueError(f"importance: expected one of {IMPORTANCES}, got {importance!r}")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"round_to: expected a positive integer, got {round_to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    found = calibrate.find_blocks(model, blocks)
    if found is None:
        raise ValueError(f"prune_structured: {type(model).__name__} has no list of transformer blocks; "
                         f"name it with blocks=...")
    block_path, block_list = found
    heads_ratios = block_ratios(heads, "heads", len(block_list))
    mlp_ratios = block_ratios(mlp, "mlp", len(block_list))
    family = detect_family(block_list[0])
    config = text_config(model)
    kinds = [group_kinds(family, config, any(heads_ratios), any(mlp_ratios), block) for block in block_list]
    report = StructuredReport(family=family.name, importance=importance, blocks=block_path,
                              params=(n_params(model), 0))
    chosen_plan = plan(kinds, family, config, heads_ratios, mlp_ratios, round_to)
    report.removed, report.notes = chosen_plan.removed, chosen_plan.notes
    keeps = chosen_plan.keeps
    if not keeps:
        log.info("prune_structured: nothing to prune (heads=%s, mlp=%s)", heads, mlp)
        report.params = (report.params[0], report.params[0])
        return report
    _warn_activation_sparsity(config, keeps)

    reparam.plain_weights({f"{block_path}.{n}": m for n, m in block_list.named_modules()
                           if calibrate.is_prunable(m)}, "prune_structured")
    scores = importances(model, block_list, kinds, importance, calibration, batch_size, progress)
    for index, block in enumerate(block_list):
        kept = {}
        for kind in kinds[index]:
            if kind.name in keeps:
                chosen = select_kept(scores[index][kind.name], keeps[kind.name][index])
                shrink(block, kind, chosen)
                kept[kind.name] = chosen.tolist()
        report.kept.append(kept)
    for name, value in update_config(block_list, family, config, kinds, keeps).items():
        setattr(report, name, value)
    report.params = (report.params[0], n_params(model))
    report.seconds = time.perf_counter() - start
    log.info("%s", report)
    return report


def _warn_activation_sparsity(config, keeps) -> None:
    pattern = getattr(config, "activation_sparsity_pattern", None)
    if "mlp" in keeps and isinstance(pattern, (list, tuple)) and any(p > 0 for p in pattern):
        warnings.warn("prune_structured: the config keeps only the largest MLP activations by a Gaussian cutoff "
                      "over each block's channels (activation_sparsity_pattern); removing channels moves that "
                      "cutoff, so the pruned model is not the dense model with those channels zeroed",
                      stacklevel=3)


def text_config(model: nn.Module):
    """The (text) config structured pruning updates; an error when the model has none."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"prune_structured: {type(model).__name__} has no Hugging Face config; structured "
                         f"pruning updates the config so the model can be saved and reloaded")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

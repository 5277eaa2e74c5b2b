"""How many groups each block keeps: requested fractions (one for all blocks, or one per block) rounded
to whole groups, checked against what the config can describe before anything changes.

Uniform and per-block counts: a Hugging Face config has one `num_attention_heads` /
`num_key_value_heads` for every block, so every block must keep the same number of heads (each block
picks its own). MLP widths may differ per block only when the config's width field is a per-layer list
that `from_pretrained` reads back (Gemma3n's `intermediate_size`); Llama, Mistral, Qwen2, OPT, GPT-2 and
BERT have one integer, so per-block widths there are refused with that reason.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from .structured_groups import Family, GroupKind, kind_heads

log = logging.getLogger("prunekit")


def ratio(value, name: str) -> float:
    """One fraction in [0, 1)."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a fraction in [0, 1), got {value!r}") from None
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    return r


def block_ratios(value, name: str, n_blocks: int) -> list[float]:
    """A fraction for every block: one number for all, or a sequence with one per block."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n_blocks:
            raise ValueError(f"{name}: expected one fraction per block ({n_blocks}), got {len(value)}")
        return [ratio(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [ratio(value, name)] * n_blocks


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def kept_heads(n_kv: int, r: float) -> int:
    keep = n_kv - _round_half_up(r * n_kv)
    if keep < 1:
        raise ValueError(f"heads={r}: pruning {n_kv - keep} of {n_kv} key/value groups would remove "
                         f"every attention head; use a ratio below {(n_kv - 0.5) / n_kv:.3f}")
    return keep


def kept_channels(width: int, r: float, round_to: int) -> int:
    if round_to > width:
        raise ValueError(f"round_to={round_to} is larger than the MLP width {width}")
    keep = round_to * _round_half_up((width - r * width) / round_to)
    return min(max(keep, round_to), width)


def _heads_config_ok(config, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the config class accepts these head counts (transformers 5 validates on save)."""
    trial = copy.deepcopy(config)
    trial.num_attention_heads, trial.num_key_value_heads, trial.head_dim = n_heads, n_kv, head_dim
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception:
        return False
    return True


def _check_heads_config(config, kind: GroupKind, keep: int, r: float) -> None:
    n_heads, n_kv, head_dim = kind_heads(kind)
    rep = n_heads // n_kv
    if _heads_config_ok(config, keep * rep, keep, head_dim):
        return
    ok = [f"{(n_kv - k) / n_kv:g}" for k in range(n_kv - 1, 0, -1) if _heads_config_ok(config, k * rep, k, head_dim)]
    raise ValueError(f"heads={r}: {type(config).__name__} rejects {keep * rep} attention heads "
                     f"(hidden_size {getattr(config, 'hidden_size', '?')} must be a multiple of the head "
                     f"count); ratios it accepts: {', '.join(ok) or 'none'}")


def _check_reloadable(name: str, keep: list[int], family: Family, config) -> None:
    if len(set(keep)) == 1:
        return
    cls = type(config).__name__
    if name == "heads":
        raise ValueError(f"heads: per-block head counts (key/value groups kept {keep}) cannot be reloaded: "
                         f"{cls} has one num_attention_heads / num_key_value_heads for every block and "
                         f"from_pretrained builds every block with them; give one fraction for all blocks")
    if not isinstance(getattr(config, family.mlp_config, None), (list, tuple)):
        raise ValueError(f"mlp: per-block MLP widths {keep} cannot be reloaded: {cls}.{family.mlp_config} is "
                         f"one integer for every block and from_pretrained builds every block with it (only "
                         f"configs with a per-layer list, such as Gemma3n's intermediate_size, can hold "
                         f"them); give one fraction for all blocks")


@dataclass
class Plan:
    keeps: dict[str, list[int]] = field(default_factory=dict)    # kind: groups kept per block (pruned kinds)
    removed: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind: (requested, removed) fraction
    notes: list[str] = field(default_factory=list)               # what rounding did to the request


def plan(kinds: list[list[GroupKind]], family: Family, config, heads: list[float], mlp: list[float],
         round_to: int) -> Plan:
    """Groups to keep per block, by kind; checked against the config before anything changes. What
    rounding did to each requested fraction goes to the notes (and a warning when it is far off)."""
    result = Plan()
    for position, kind0 in enumerate(kinds[0]):
        per_block = [k[position] for k in kinds]
        ratios = heads if kind0.name == "heads" else mlp
        if kind0.name == "heads":
            keep = [kept_heads(k.count, r) for k, r in zip(per_block, ratios)]
            unit = "key/value head groups"
        else:
            keep = [kept_channels(k.count, r, round_to) for k, r in zip(per_block, ratios)]
            unit = "MLP channels" + (f" (kept width a multiple of round_to={round_to})" if round_to > 1 else "")
        counts = [k.count for k in per_block]
        total = sum(counts)
        requested = sum(r * c for r, c in zip(ratios, counts)) / total
        removed = sum(c - k for c, k in zip(counts, keep)) / total
        result.removed[kind0.name] = (requested, removed)
        label = "heads" if kind0.name == "heads" else "mlp"
        far = []
        if len(set(counts)) == 1 and len(set(ratios)) == 1 and len(set(keep)) == 1:
            lines = [(f"{label}={ratios[0]:g} of {counts[0]} {unit} rounds to removing {counts[0] - keep[0]} "
                      f"({removed:.3g} instead of {ratios[0]:g}) per block", abs(removed - ratios[0]))]
        else:
            lines = [(f"block {i}: {label}={r:g} of {c} {unit} rounds to removing {c - k} "
                      f"({(c - k) / c:.3g} instead of {r:g})", abs((c - k) / c - r))
                     for i, (c, k, r) in enumerate(zip(counts, keep, ratios))]
        for note, off in lines:
            if off > 1e-9:
                result.notes.append(note)
                log.info("prune_structured: %s", note)
                if off >= 0.01:
                    far.append(note)
        if far:
            warnings.warn("prune_structured: " + "; ".join(far), stacklevel=3)
        if any(k < c for k, c in zip(keep, counts)):
            _check_reloadable(kind0.name, keep, family, config)
            if kind0.name == "heads":
                _check_heads_config(config, kind0, keep[0], ratios[0])
            result.keeps[kind0.name] = keep
    return result

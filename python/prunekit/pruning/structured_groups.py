"""Dependency groups of structured pruning: where, inside one transformer block, the weights of one
attention head group or one MLP channel live (LLM-Pruner style).

A dependency group is every weight slice that exists only because of one head or one channel:
- an MLP channel j: row j of each up projection (gate_proj and up_proj; fc1; c_fc; intermediate.dense)
  and input column j of the down projection (down_proj; fc2; c_proj; output.dense);
- a key/value group g of grouped-query attention: the rows of its key and value head, the rows of the
  query heads that read it, and the o_proj input columns of those query heads. Removing whole KV groups
  keeps num_attention_heads / num_key_value_heads an integer (for plain multi-head attention a group
  is one head).

Head groups need a config that names head_dim separately from hidden_size (Llama, Mistral, Qwen2/3,
Gemma3n, ...): OPT, GPT-2 and BERT derive head_dim = hidden_size / num_attention_heads, so a model with
fewer heads of the same size cannot be reloaded; their heads are refused (their MLP channels can be pruned).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import calibrate


@dataclass(frozen=True)
class Family:
    """Where the prunable groups live inside one block of a model family (paths relative to a block)."""

    name: str
    mlp_up: tuple[str, ...]        # layers whose output rows are MLP channels
    mlp_down: str                  # layer whose input columns are MLP channels
    mlp_config: str                # config field holding the MLP width
    attention: str | None = None   # attention module, when heads can be pruned
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    out: str = "o_proj"
    no_heads: str = ""             # why heads cannot be pruned in this family


_DERIVED = ("its config derives head_dim = hidden_size / num_attention_heads and has no field for a "
            "separate head size, so from_pretrained could not rebuild a model with fewer heads")
# BERT and GPT-2 had transformers' own head pruning until transformers 4 (model.prune_heads, recorded in
# config.pruned_heads and re-applied by from_pretrained); transformers 5 removed both, and nothing else
# in their configs describes a narrower attention, so their heads are refused.
_NO_PRUNED_HEADS = ("; transformers' prune_heads / config.pruned_heads, which re-applied removed heads on "
                    "reload, was removed in transformers 5 and is not used")
FAMILIES = (
    Family("llama", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", "self_attn"),
    Family("gpt2", ("mlp.c_fc",), "mlp.c_proj", "n_inner",
           no_heads="GPT-2 fuses q/k/v into c_attn and " + _DERIVED + _NO_PRUNED_HEADS),
    Family("opt", ("fc1",), "fc2", "ffn_dim", no_heads="OPT: " + _DERIVED),
    Family("bert", ("intermediate.dense",), "output.dense", "intermediate_size",
           no_heads="BERT: " + _DERIVED + _NO_PRUNED_HEADS),
)


def _has_layer(block: nn.Module, path: str) -> bool:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return False
    return type(module) is nn.Linear or calibrate.is_conv1d(module)


def detect_family(block: nn.Module) -> Family:
    for family in FAMILIES:
        paths = list(family.mlp_up) + [family.mlp_down]
        if family.attention:
            paths += [f"{family.attention}.{p}" for p in (*family.qkv, family.out)]
        if all(_has_layer(block, p) for p in paths):
            return family
    children = ", ".join(name for name, _ in block.named_children())
    raise ValueError(f"prune_structured: unknown architecture: block {type(block).__name__} (children: "
                     f"{children}) matches none of the supported layouts "
                     f"{[f.name for f in FAMILIES]} (gate/up/down_proj, fc1/fc2, c_fc/c_proj, "
                     f"intermediate/output.dense)")


@dataclass(frozen=True)
class Slice:
    """One layer's share of every group: on `dim` ("out" rows or "in" columns, nn.Linear layout),
    group g owns the `size` consecutive indices starting at g * size."""

    path: str   # relative to the block
    dim: str
    size: int


@dataclass(frozen=True)
class GroupKind:
    name: str                 # "heads" (KV groups) or "mlp" (channels)
    count: int                # groups in this block
    slices: tuple[Slice, ...]
    probe: Slice              # the "in" slice whose input activations measure a group


def group_kinds(family: Family, config, heads: bool, mlp: bool, block: nn.Module) -> list[GroupKind]:
    """The group kinds of one block (its own MLP width: configs like Gemma3n's differ per block)."""
    kinds = []
    if heads:
        n_heads, n_kv, head_dim = head_counts(family, config, block)
        rep = n_heads // n_kv
        q, k, v = (f"{family.attention}.{p}" for p in family.qkv)
        o = Slice(f"{family.attention}.{family.out}", "in", rep * head_dim)
        kinds.append(GroupKind("heads", n_kv, (Slice(q, "out", rep * head_dim), Slice(k, "out", head_dim),
                                               Slice(v, "out", head_dim), o), o))
    if mlp:
        width = calibrate.layer_weight(block.get_submodule(family.mlp_down)).shape[1]
        down = Slice(family.mlp_down, "in", 1)
        kinds.append(GroupKind("mlp", width, tuple(Slice(p, "out", 1) for p in family.mlp_up) + (down,), down))
    return kinds


def head_counts(family: Family, config, block: nn.Module) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head_dim) of one block, checked against its q/k widths."""
    if family.attention is None:
        raise ValueError(f"prune_structured: heads cannot be pruned: {family.no_heads}; use heads=0")
    attention = block.get_submodule(family.attention)
    if getattr(attention, "is_kv_shared_layer", False):
        raise ValueError(f"prune_structured: heads cannot be pruned: {type(config).__name__} shares key/value "
                         f"caches between blocks (num_kv_shared_layers="
                         f"{getattr(config, 'num_kv_shared_layers', '?')}), and a block reading another "
                         f"block's cache must keep that block's heads; use heads=0 or a config without sharing")
    # Configs without a head_dim field (Qwen2) still read config.head_dim when it is set, and save it.
    head_dim = getattr(config, "head_dim", None) or getattr(attention, "head_dim", None)
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if not isinstance(head_dim, int) or not n_heads:
        raise ValueError(f"prune_structured: heads cannot be pruned: neither {type(config).__name__} nor "
                         f"the attention module names head_dim; use heads=0")
    q = calibrate.layer_weight(block.get_submodule(f"{family.attention}.{family.qkv[0]}"))
    k = calibrate.layer_weight(block.get_submodule(f"{family.attention}.{family.qkv[1]}"))
    if q.shape[0] != n_heads * head_dim or k.shape[0] != n_kv * head_dim or n_heads % n_kv:
        raise ValueError(f"prune_structured: q/k widths {q.shape[0]}/{k.shape[0]} do not match the config "
                         f"({n_heads} heads, {n_kv} KV heads, head_dim {head_dim})")
    return n_heads, n_kv, head_dim


def kind_heads(kind: GroupKind) -> tuple[int, int, int]:
    """(attention heads, KV heads, head_dim) of a "heads" group kind, from its q and k slices."""
    q, k = kind.slices[0], kind.slices[1]
    return kind.count * q.size // k.size, kind.count, k.size

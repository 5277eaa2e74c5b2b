"""Applying a structured plan: remove the dropped groups' rows / columns from every layer of a block
(weights and biases, nn.Linear and GPT-2's Conv1D) and write the new widths into the config and into
the size attributes modules copied from it, so save_pretrained / from_pretrained round-trip."""
from __future__ import annotations

import torch
from torch import nn

from .. import calibrate
from .structured_groups import Family, GroupKind, kind_heads


def _indices(kept: torch.Tensor, size: int) -> torch.Tensor:
    return (kept[:, None] * size + torch.arange(size, device=kept.device)).flatten()


def shrink(block: nn.Module, kind: GroupKind, kept: torch.Tensor) -> None:
    """Keeps only the groups `kept` (ascending indices) of `kind` in every layer of one block."""
    for s in kind.slices:
        layer = block.get_submodule(s.path)
        index = _indices(kept, s.size).to(layer.weight.device)
        if s.dim == "out":
            _keep_outputs(layer, index)
        else:
            _keep_inputs(layer, index)


def _set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Installs a new weight given in nn.Linear layout and updates the layer's size attributes."""
    requires_grad = layer.weight.requires_grad
    if calibrate.is_conv1d(layer):
        layer.weight = nn.Parameter(weight.t().contiguous(), requires_grad=requires_grad)
        layer.nx, layer.nf = weight.shape[1], weight.shape[0]
    else:
        layer.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
        layer.out_features, layer.in_features = weight.shape


def _keep_outputs(layer: nn.Module, index: torch.Tensor) -> None:
    with torch.no_grad():
        weight = calibrate.layer_weight(layer).index_select(0, index)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.index_select(0, index), requires_grad=layer.bias.requires_grad)
    _set_weight(layer, weight)


def _keep_inputs(layer: nn.Module, index: torch.Tensor) -> None:
    with torch.no_grad():
        weight = calibrate.layer_weight(layer).index_select(1, index)
    _set_weight(layer, weight)


def update_config(block_list, family: Family, config, kinds: list[list[GroupKind]],
                  keeps: dict[str, list[int]]) -> dict[str, tuple]:
    """Writes the kept counts (`keeps[kind][block]`) into the config and the modules' size attributes.
    Head counts must be one for all blocks; MLP widths may differ per block only when the config's
    width field is a per-layer list (checked by structured_plan.check_reloadable). Returns
    {"heads": (before, after), "kv_heads": ..., "mlp": ...} for the report; per-block MLP widths as lists."""
    changes = {}
    for position, kind in enumerate(kinds[0]):
        if kind.name not in keeps:
            continue
        keep = keeps[kind.name]
        if kind.name == "heads":
            n_heads, n_kv, head_dim = kind_heads(kind)
            rep = n_heads // n_kv
            config.num_attention_heads, config.num_key_value_heads = keep[0] * rep, keep[0]
            config.head_dim = head_dim  # explicit, or from_pretrained would derive hidden_size / heads
            changes["heads"], changes["kv_heads"] = (n_heads, keep[0] * rep), (n_kv, keep[0])
            for block in block_list:
                attention = block.get_submodule(family.attention)
                for attr, value in (("num_heads", keep[0] * rep), ("num_attention_heads", keep[0] * rep),
                                    ("num_key_value_heads", keep[0])):
                    if isinstance(getattr(attention, attr, None), int):
                        setattr(attention, attr, value)
        else:
            before = [k[position].count for k in kinds]
            per_layer = isinstance(getattr(config, family.mlp_config), (list, tuple))
            setattr(config, family.mlp_config, list(keep) if per_layer else keep[0])
            uniform = len(set(before)) == 1 and len(set(keep)) == 1
            changes["mlp"] = (before[0], keep[0]) if uniform else (before, list(keep))
            parent = family.mlp_down.rpartition(".")[0]
            for block, width in zip(block_list, keep):
                owner = block.get_submodule(parent) if parent else block
                for attr in ("intermediate_size", "ffn_dim"):
                    if isinstance(getattr(owner, attr, None), int):
                        setattr(owner, attr, width)
    return changes

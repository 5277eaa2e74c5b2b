"""After each rank pruned its share of a block's layers: every rank gets every pruned weight (a
broadcast from its owner) and every layer's report row (an all-gather of the small per-layer records)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import calibrate
from .session import Session


def _moved(obj, device):
    """A copy of obj (e.g. prunekit.quant.QuantParams) with its tensor fields on `device`."""
    if obj is None:
        return None
    moved = copy.copy(obj)
    for key, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            object.__setattr__(moved, key, value.detach().to(device))
    return moved


def share_pruned(session: Session, layers: dict[str, nn.Module], owner: dict[str, int], rows: dict,
                 deltas: dict[str, torch.Tensor], quant: dict) -> dict:
    """Sets every rank's copy of the block's pruned layers; returns the report rows of all of them in
    the order of `layers`, and fills `deltas` (dense - pruned, fp32) and `quant` for the layers pruned
    elsewhere."""
    session.sync("pruned")
    mine = {name: (row, _moved(quant.get(name), "cpu")) for name, row in rows.items()}
    everyone: dict = {}
    for part in session.all_gather_object(mine):
        everyone.update(part)
    shared: dict = {}
    for name, module in layers.items():
        if name not in everyone:  # left dense (no calibration input), on every rank alike
            continue
        row, params = everyone[name]
        src = owner[name]
        weight = calibrate.layer_weight(module)
        if src == session.rank:
            session.broadcast_(weight.detach(), src)
        else:
            received = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            session.broadcast_(received, src)
            dense = weight.detach().clone()
            calibrate.set_layer_weight(module, received)
            deltas[name] = dense.float() - received.float()
            if params is not None:
                quant[name] = _moved(params, weight.device)
        shared[name] = row
    for name in layers:  # quantization grids in layer order, as one process records them
        if name in quant:
            quant[name] = quant.pop(name)
    return shared

"""Round-to-nearest quantization of a whole model's layers in place (e.g. after magnitude or Wanda
pruning), keeping each layer's scales and zero-points, as SparseGPT(quant=...) keeps them in
`report.quant`, so that the integer codes can be written out (prunekit.export.compressed_tensors).

Per layer this is `quantize_rtn` (quantizer.py) on the layer's current weight: pruned weights are zeros,
take part in the ranges as zeros and stay exactly zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import calibrate
from .quantizer import QuantParams, QuantSpec, fit_params, quantize


@torch.no_grad()
def quantize_layers_rtn(model: nn.Module, spec: QuantSpec, *, report=None, include=None,
                        exclude=None) -> dict[str, QuantParams]:
    """Quantizes the chosen linear layers of `model` in place; returns {layer name: QuantParams}.

    report: a PruneReport: its layers (the pruned ones). Otherwise include / exclude patterns as for
    prunekit.prune (default: every linear layer inside the model's blocks, not the LM head)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec: expected a prunekit.QuantSpec, got {type(spec).__name__}")
    if report is not None:
        if include is not None or exclude is not None:
            raise ValueError("quantize_layers_rtn: give either report= or include/exclude, not both")
        layers = {}
        for layer in report.layers:
            try:
                layers[layer.name] = model.get_submodule(layer.name)
            except AttributeError:
                raise ValueError(f"the report names layer {layer.name!r} but the model has no such module") from None
    else:
        found = calibrate.find_blocks(model)
        layers = calibrate.select_layers(model, include, exclude, found[0] if found is not None else None)
        if not layers:
            raise calibrate.no_layers_error(model, include, exclude)
    for name, module in layers.items():
        if not calibrate.is_prunable(module):
            raise ValueError(f"{name}: a {type(module).__name__}, not a linear layer (quantize before "
                             f"prunekit.sparsify)")
        fit_params(calibrate.layer_weight(module), spec, name)  # every layer's width checked first
    params = {}
    for name, module in layers.items():
        weight = calibrate.layer_weight(module).detach()
        p = fit_params(weight, spec, name)
        scale, zero = p.per_column()
        calibrate.set_layer_weight(module, quantize(weight.float(), scale, zero, spec.maxq).to(weight.dtype))
        params[name] = p
    return params

"""prunekit: prune large language models and run the pruned models fast.

Public names are imported lazily so that `import prunekit` stays cheap and a missing optional
dependency (transformers, triton) only matters to the feature that needs it.
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger("prunekit").addHandler(logging.NullHandler())

# public name -> (module, attribute)
_EXPORTS = {
    "Pattern": ("patterns", "Pattern"),
    "parse_pattern": ("patterns", "parse"),
    "backends": ("_native", "backends"),
    "LayerStats": ("pruning.stats", "LayerStats"),
    "LayerResult": ("pruning.base", "LayerResult"),
    "PruningMethod": ("pruning.base", "PruningMethod"),
    "Magnitude": ("pruning.magnitude", "Magnitude"),
    "magnitude_mask": ("pruning.magnitude", "magnitude_mask"),
    "Wanda": ("pruning.wanda", "Wanda"),
    "wanda_mask": ("pruning.wanda", "wanda_mask"),
    "SparseGPT": ("pruning.sparsegpt", "SparseGPT"),
    "sparsegpt_prune": ("pruning.sparsegpt", "sparsegpt_prune"),
    "QuantSpec": ("quant.quantizer", "QuantSpec"),
    "sparsegpt_quant_prune": ("quant.sparse_quant", "sparsegpt_quant_prune"),
    "quantize_rtn": ("quant.quantizer", "quantize_rtn"),
    "Refined": ("pruning.refine", "Refined"),
    "LeastSquares": ("pruning.least_squares", "LeastSquares"),
    "DSnoT": ("pruning.dsnot", "DSnoT"),
    "BlockReconstruct": ("pruning.block_reconstruct", "BlockReconstruct"),
    "prune": ("pipeline", "prune"),
    "DistributedError": ("distributed.errors", "DistributedError"),  # not prune.py: a submodule named like the function would shadow it
    "PruneReport": ("report", "PruneReport"),
    "SparseLinear": ("nn.sparse_linear", "SparseLinear"),
    "UnstructuredSparseLinear": ("nn.unstructured_linear", "UnstructuredSparseLinear"),
    "sparsify": ("nn.swap", "sparsify"),
    "save": ("io", "save"),
    "load": ("io", "load"),
    "prune_structured": ("pruning.structured", "prune_structured"),
    "prune_filters": ("pruning.filters", "prune_filters"),
    "loraprune": ("pruning.loraprune", "loraprune"),
    "LoRAPrune": ("pruning.loraprune", "LoRAPrune"),
    "lora_guided_importance": ("pruning.loraprune", "lora_guided_importance"),
    "prune_depth": ("pruning.depth", "prune_depth"),
    "Allocation": ("pruning.allocation", "Allocation"),
    "OWL": ("pruning.allocation", "OWL"),
    "LayerSparsity": ("pruning.allocation", "LayerSparsity"),
    "search_allocation": ("search.run", "search_allocation"),
    "SearchedAllocation": ("search.result", "SearchedAllocation"),
    "MaskedTraining": ("train.masked", "MaskedTraining"),
    "Schedule": ("train.schedule", "Schedule"),
    "cubic_schedule": ("train.schedule", "cubic_schedule"),
    "linear_schedule": ("train.schedule", "linear_schedule"),
    "constant_schedule": ("train.schedule", "constant_schedule"),
    "distillation_loss": ("train.distill", "distillation_loss"),
    "recover": ("train.distill", "recover"),
    "Masks": ("train.masks", "Masks"),
    "Snapshot": ("train.rewinding", "Snapshot"),
    "rewind": ("train.rewinding", "rewind"),
    "reinitialize": ("train.rewinding", "reinitialize"),
    "iterative_magnitude": ("train.imp", "iterative_magnitude"),
    "recover_lora": ("train.lora", "recover_lora"),
    "export_compressed_tensors": ("export.compressed_tensors", "export_compressed_tensors"),
    "quantize_layers_rtn": ("quant.rtn", "quantize_layers_rtn"),
}
_SUBMODULES = {"data", "eval", "ops", "ref", "nn", "pruning", "io", "cli", "patterns", "calibrate", "train", "search",
               "torch_prune", "export", "quant"}


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f"prunekit.{module}"), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"prunekit.{name}")
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS) + list(_SUBMODULES))

"""Masks as values: which weights of which layers are kept, independent of the weights themselves.

    masks = Masks.from_model(model)                 # the zeros a one-shot prune left (or: report=PruneReport)
    masks.save("masks.safetensors")                 # bit-packed safetensors, no pickle
    masks = Masks.load("masks.safetensors", model)  # names and shapes checked against the model
    mt = MaskedTraining.from_masks(model, masks)    # train with exactly these weights held at zero

A `Masks` is a dict of layer name -> bool tensor (True = kept) in nn.Linear layout [out_features,
in_features] (transposed for a GPT-2 Conv1D, as everywhere in prunekit). Any pattern works: the
zeros of an unstructured, N:M or structured prune are all just masks. Because the mask is its own
value, the weights can be rewound or re-initialized (prunekit.train.rewinding) without losing it.

File layout: one uint8 tensor per layer holding the mask bit-packed along in_features (numpy
packbits, big bit order, rows padded to a whole byte), and a JSON header (metadata key
"prunekit_masks") with the format version and, per layer, the shape and the number of kept weights,
which `load` checks.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import calibrate

log = logging.getLogger("prunekit")

FORMAT = "prunekit.masks"
VERSION = 1
META_KEY = "prunekit_masks"


class Masks(dict):
    """Keep masks by layer name (bool, True = kept, [out_features, in_features]); see the module docstring."""

    # ---------------------------------------------------------------------------- constructors
    @classmethod
    def from_model(cls, model: nn.Module, report=None, *, include=None, exclude=None,
                   blocks: str | None = None) -> Masks:
        """The current zero pattern of a pruned model: `weight != 0` per layer.

        report: a PruneReport (or its JSON path) from prunekit.prune: the masks of exactly the layers
            it pruned (checked against the report's shapes). Without it: the selected linear layers
            (include / exclude / blocks as for prunekit.prune) that have any zero weight.
        """
        if report is not None:
            if include is not None or exclude is not None or blocks is not None:
                raise ValueError("Masks.from_model: give either report= or include/exclude/blocks, not both")
            return cls._from_report(model, report)
        found = calibrate.find_blocks(model, blocks)
        layers = calibrate.select_layers(model, include, exclude, found[0] if found is not None else None)
        if not layers:
            raise calibrate.no_layers_error(model, include, exclude)
        masks = cls()
        for name, module in layers.items():
            keep = calibrate.layer_weight(module).detach() != 0
            if not bool(keep.all()):
                masks[name] = keep
        if not masks:
            raise ValueError("none of the selected layers has zero weights; prune the model first "
                             "(prunekit.prune), or build the masks yourself")
        return masks

    @classmethod
    def _from_report(cls, model: nn.Module, report) -> Masks:
        from ..report import PruneReport

        if isinstance(report, (str, os.PathLike)):
            report = PruneReport.from_json(report)
        if not isinstance(report, PruneReport):
            raise TypeError(f"report: expected a prunekit PruneReport or its JSON path, got {type(report).__name__}")
        if not report.layers:
            raise ValueError("report: the PruneReport lists no layers")
        masks = cls()
        for layer in report.layers:
            module = _layer(model, layer.name, "the PruneReport")
            weight = calibrate.layer_weight(module)
            if tuple(weight.shape) != tuple(layer.shape):
                raise ValueError(f"{layer.name}: the PruneReport says {tuple(layer.shape)} [out, in] but the "
                                 f"model's weight is {tuple(weight.shape)}; is this the model it pruned?")
            masks[layer.name] = weight.detach() != 0
        return masks

    # ------------------------------------------------------------------------------- measures
    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.values())

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.values())

    @property
    def sparsity(self) -> float:
        """Pruned fraction over all the masks' weights."""
        total = self.total
        return 1.0 - self.kept / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {name: 1.0 - float(m.float().mean()) for name, m in self.items()}

    def clone(self) -> Masks:
        return Masks({name: m.clone() for name, m in self.items()})

    def cpu(self) -> Masks:
        return Masks({name: m.cpu() for name, m in self.items()})

    # ------------------------------------------------------------------------- against a model
    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's layers by mask name; raises naming the layer when a mask does not fit."""
        layers = {}
        for name, keep in self.items():
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
                got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
                raise TypeError(f"mask {name!r}: expected a bool tensor (True = kept), got {got}")
            module = _layer(model, name, "the masks")
            shape = tuple(calibrate.layer_weight(module).shape)
            if tuple(keep.shape) != shape:
                raise ValueError(f"mask {name!r} is {tuple(keep.shape)} but the layer's weight is {shape} "
                                 "[out_features, in_features]")
            layers[name] = module
        return layers

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Sets the model's pruned weights to exactly zero (once; MaskedTraining holds them while training)."""
        for name, module in self.check(model).items():
            weight = calibrate.layer_weight(module)
            weight.masked_fill_(~self[name].to(weight.device), 0)

    # ------------------------------------------------------------------------------- file I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Writes the masks to one safetensors file (atomically: a temporary file renamed into place)."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors, layers = {}, {}
        for name, keep in self.items():
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.ndim != 2:
                raise TypeError(f"mask {name!r}: expected a 2-D bool tensor, got "
                                f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
            # contiguous: safetensors writes a numpy array's buffer as is, whatever its strides
            tensors[name] = np.ascontiguousarray(np.packbits(keep.cpu().contiguous().numpy(), axis=1))
            layers[name] = {"shape": list(keep.shape), "kept": int(keep.sum())}
        header = json.dumps({"format": FORMAT, "version": VERSION, "layers": layers})
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={META_KEY: header})
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        log.info("saved %d masks (sparsity %.4f) to %s", len(self), self.sparsity, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Masks:
        """Reads masks written by `save` (on the CPU). With `model`, every mask is checked against it:
        the layer exists, is linear, and has the mask's shape."""
        from .._safetensors import read_with_header

        path = Path(path)
        header, packed = read_with_header(path, META_KEY, framework="numpy",
                                          missing="no such mask file (Masks.save writes one)",
                                          foreign=f"no {META_KEY!r} header; this is not a mask file written by "
                                                  f"Masks.save")
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}; "
                             f"this prunekit reads {FORMAT!r} version {VERSION}")
        layers = header.get("layers")
        if not isinstance(layers, dict):
            raise ValueError(f"{path}: the mask header is not valid (no 'layers' object)")
        if set(layers) != set(packed):
            missing, extra = sorted(set(layers) - set(packed)), sorted(set(packed) - set(layers))
            raise ValueError(f"{path}: tensors do not match the header (missing {missing}, unexpected {extra})")
        masks = cls()
        for name, info in layers.items():
            rows, cols = info["shape"]
            bits = packed[name]
            if bits.dtype != np.uint8 or bits.shape != (rows, (cols + 7) // 8):
                raise ValueError(f"{path}: mask {name!r} is stored as {bits.dtype} {bits.shape}; a {rows}x{cols} "
                                 f"mask is packed as uint8 {(rows, (cols + 7) // 8)}")
            keep = torch.from_numpy(np.unpackbits(bits, axis=1, count=cols).astype(bool))
            if int(keep.sum()) != info["kept"]:
                raise ValueError(f"{path}: mask {name!r} keeps {int(keep.sum())} weights but the header says "
                                 f"{info['kept']}: the file was altered or corrupted")
            masks[name] = keep
        if model is not None:
            masks.check(model)
        log.info("loaded %d masks (sparsity %.4f) from %s", len(masks), masks.sparsity, path)
        return masks

    def __repr__(self) -> str:
        return f"Masks({len(self)} layers, sparsity {self.sparsity:.4f})"


def _layer(model: nn.Module, name: str, source: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source} name layer {name!r} but the model has no such module") from None
    if not calibrate.is_prunable(module):
        raise ValueError(f"{source} name layer {name!r} but it is a {type(module).__name__}, "
                         "not a linear layer (nn.Linear or Conv1D)")
    return module

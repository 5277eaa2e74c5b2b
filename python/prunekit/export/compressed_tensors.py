"""Export a pruned, or pruned and quantized, transformers model in the compressed-tensors format (the
checkpoint layout llm-compressor writes and transformers / vLLM read: `quantization_config` with
`quant_method: compressed-tensors` in config.json). The format is the `compressed-tensors` package's:
its QuantizationScheme / QuantizationConfig describe the quantization, its compressor (pack-quantized)
turns each layer's weight, scales and zero-points into the stored tensors, and its ModelCompressor
writes the config; its DenseSparsityConfig records the sparsity structure. Nothing of the format is
re-implemented here.

What is stored:
  pruned layers         dense weights with their zeros (`sparsity_config`: format "dense", the structure
                        "2:4" or "unstructured", the global sparsity, the pruned layers as targets).
                        compressed-tensors >= 0.15 has no compressor for 2:4 (sparse-24-bitmask) any more,
                        and transformers / vLLM no longer read the sparsity metadata: it is a record.
  quantized layers      prunekit's integer codes with its scales and zero-points (`report.quant` of
                        SparseGPT(quant=...), or `quant.rtn.quantize_layers_rtn`), packed into int32
                        (`weight_packed`, `weight_scale` float32, `weight_zero_point`, `weight_shape`);
                        one config group per (bits, group size, symmetry), targets = layer names.
                        prunekit's unsigned codes q in [0, 2^b - 1] with zero-point z are stored as the
                        format's signed q - 2^(b-1) and z - 2^(b-1): the same value scale * (q - z).
                        A grid whose every zero-point is 2^(b-1) (QuantSpec(sym=True)) is stored
                        symmetric, without zero-points.
Every quantized layer is checked on the way out: the package's own decompressor applied to what is
written gives back the model's weight exactly (bit for bit, in the model's dtype), else a ValueError
names the layer.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .. import calibrate

log = logging.getLogger("prunekit")

CONFIG_NAME = "config.json"


def _package():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError("the compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'prunekit[compressed-tensors]'") from None
    return compressed_tensors


def _codes(name: str, weight: torch.Tensor, params) -> torch.Tensor:
    """prunekit's integer codes (int64 [rows, cols]) of a weight on the grid of `params`, such that
    params.dequantize(codes) cast to the weight's dtype is the weight exactly. In a low-precision model
    (bfloat16) a value scale * (q - z) was rounded after quantization, so round(w / scale) can be one
    off; the neighbours are tried. A weight that is not on the grid is refused."""
    rows, cols = weight.shape
    if tuple(params.scale.shape) != (rows, cols // params.groupsize) or cols % params.groupsize:
        raise ValueError(f"{name}: quantization parameters of shape {tuple(params.scale.shape)} (group size "
                         f"{params.groupsize}) do not fit the weight {tuple(weight.shape)}")
    scale, zero = params.per_column()
    scale, zero = scale.to(weight.device), zero.to(weight.device)
    w = weight.detach()
    codes = torch.clamp(torch.round(w.float() / scale) + zero, 0, params.maxq)

    def exact(c):
        return (scale * (c - zero)).to(w.dtype) == w

    ok = exact(codes)
    for step in (-1.0, 1.0):
        if bool(ok.all()):
            break
        other = torch.clamp(codes + step, 0, params.maxq)
        better = ~ok & exact(other)
        codes = torch.where(better, other, codes)
        ok |= better
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise ValueError(f"{name}: {int((~ok).sum())} weight(s) are not on the quantization grid of its scales "
                         f"and zero-points (first at row {bad[0]}, column {bad[1]}): the weights changed after "
                         f"quantization (e.g. training), or the parameters belong to another weight")
    return codes.long()


def _scheme_key(params) -> tuple:
    half = 2 ** (params.bits - 1)
    symmetric = bool((params.zero == half).all())
    per_row = params.scale.shape[1] == 1
    return params.bits, None if per_row else params.groupsize, symmetric


def _scheme(key: tuple, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, groupsize, symmetric = key
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if groupsize is None else "group", group_size=groupsize)
    return QuantizationScheme(targets=targets, weights=args)


def _compress_layer(name: str, weight: torch.Tensor, params, scheme, compressor) -> dict[str, torch.Tensor]:
    """The stored tensors of one layer (local names), checked through the package's decompressor."""
    half = 2 ** (params.bits - 1)
    codes = _codes(name, weight, params)
    scale, zero = params.per_column()
    grid = (scale.to(codes.device) * (codes - zero.to(codes.device)).float())  # float32 values on the grid
    state = {"weight": grid, "weight_scale": params.scale.float().contiguous()}
    if not scheme.weights.symmetric:
        state["weight_zero_point"] = (params.zero - half).to(torch.int8).contiguous()
    stored = compressor.compress(state, scheme)
    back = compressor.decompress(stored, scheme)["weight"].to(weight.dtype)
    if not torch.equal(back, weight.detach().to(back.device)):
        raise ValueError(f"{name}: compressed-tensors' decompressor does not give back this layer's weight "
                         f"exactly ({int((back != weight).sum())} values differ)")
    return {key: t.detach().cpu().contiguous() for key, t in stored.items()}


def _is_24(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def _pruned_layers(model: nn.Module, report) -> dict[str, torch.Tensor]:
    """Dense [out, in] weights of the pruned layers: the report's, or every linear layer holding zeros."""
    from ..nn.sparse_linear import SparseLinear
    from ..nn.unstructured_linear import UnstructuredSparseLinear

    def weight(module):
        if isinstance(module, (SparseLinear, UnstructuredSparseLinear)):
            return module.weight.detach()
        return calibrate.layer_weight(module).detach()

    if report is not None:
        return {layer.name: weight(model.get_submodule(layer.name)) for layer in report.layers}
    layers = {}
    for name, module in model.named_modules():
        if calibrate.is_prunable(module) or isinstance(module, (SparseLinear, UnstructuredSparseLinear)):
            w = weight(module)
            if bool((w == 0).any()):
                layers[name] = w
    return layers


def _global_sparsity(model: nn.Module) -> float:
    from .model_card import _model_zeros

    return _model_zeros(model) or 0.0


def sparsity_config(model: nn.Module, report=None):
    """The compressed-tensors DenseSparsityConfig describing the model's zeros, or None when no layer
    is pruned: structure "2:4" when every pruned layer is 2:4, else "unstructured"."""
    _package()
    from compressed_tensors.config import DenseSparsityConfig, SparsityStructure

    layers = _pruned_layers(model, report)
    if not layers:
        return None
    structure = SparsityStructure.TWO_FOUR if all(map(_is_24, layers.values())) else SparsityStructure.UNSTRUCTURED
    return DenseSparsityConfig(global_sparsity=_global_sparsity(model), sparsity_structure=structure.value,
                               targets=sorted(layers), ignore=[])


def export_compressed_tensors(model: nn.Module, directory: str | os.PathLike, report=None, *, quant=None,
                              tokenizer=None, calibration: str | None = None, quality: dict | None = None,
                              base_model: str | None = None) -> Path:
    """Writes `model` (a transformers model, pruned, possibly quantized) to `directory` in the
    compressed-tensors format; returns the directory.

    report: the PruneReport of the run: its layers are the pruned ones, its `quant` the quantization
        grids (SparseGPT(quant=QuantSpec(...))); it is written as report.json beside the weights.
    quant: {layer name: prunekit.quant.QuantParams} instead of (or without) report.quant, e.g. from
        `prunekit.quant.rtn.quantize_layers_rtn` (round-to-nearest after magnitude or Wanda).
    tokenizer: saved too when given. calibration / quality / base_model: for the model card (README.md,
        see prunekit.export.model_card).
    The model is not changed (SparseLinear layers are written as their dense weight)."""
    ct = _package()
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    from ..nn.swap import dense_state_dict
    from .model_card import write_model_card

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"export_compressed_tensors: expected a transformers model (save_pretrained, config), "
                        f"got {type(model).__name__}")
    quant = dict(report.quant if quant is None and report is not None else quant or {})
    directory = Path(directory)

    groups: dict[tuple, list[str]] = {}
    for name, params in quant.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quant names layer {name!r} but the model has no such module") from None
        if calibrate.is_conv1d(module):
            raise ValueError(f"{name}: a transformers Conv1D (GPT-2 style, weight [in, out]); compressed-tensors "
                             f"quantizes nn.Linear layers only, so this model cannot be exported quantized "
                             f"(export it pruned only, without quant)")
        groups.setdefault(_scheme_key(params), []).append(name)

    state = dense_state_dict(model)
    schemes = {}
    formats = set()
    for index, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        scheme = _scheme(key, names)
        fmt = infer_module_format(nn.Linear, scheme)
        scheme.format = fmt
        formats.add(fmt.value)
        compressor = BaseCompressor.get_value_from_registry(fmt.value)
        for name in names:
            weight = state.pop(f"{name}.weight")
            for local, tensor in _compress_layer(name, weight, quant[name], scheme, compressor).items():
                state[f"{name}.{local}"] = tensor
        schemes[f"group_{index}"] = scheme

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, state_dict=state)
    if schemes:
        config = QuantizationConfig(config_groups=schemes, format=formats.pop() if len(formats) == 1 else
                                    "mixed-precision", quantization_status=QuantizationStatus.COMPRESSED)
        ModelCompressor(quantization_config=config).update_config(directory)
    _record_sparsity(directory, sparsity_config(model, report), ct.__version__)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if report is not None:
        report.to_json(directory / "report.json")
    write_model_card(directory, report, model=model, fmt="compressed-tensors", calibration=calibration,
                     quality=quality, base_model=base_model)
    log.info("exported %s in the compressed-tensors format (%d quantized layers)", directory, len(quant))
    return directory


def _record_sparsity(directory: Path, sparsity, version: str) -> None:
    """Puts the DenseSparsityConfig into config.json's quantization_config (created for a model that is
    only pruned), as llm-compressor did for sparse dense checkpoints."""
    if sparsity is None:
        return
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text(encoding="utf-8"))
    block = config.setdefault("quantization_config", {"quant_method": "compressed-tensors", "version": version,
                                                      "format": "dense"})
    block["sparsity_config"] = sparsity.model_dump(exclude={"registry_requires_subclass"})
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")

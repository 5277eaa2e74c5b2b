"""Save and load pruned models as safetensors (no pickle), with SparseLinear layers kept compressed.

Layout of `<directory>/model.safetensors`:
  tensors   the model's state_dict: a SparseLinear named `L` contributes `L.values` [out, in/2],
            `L.meta` uint8 [out, in/8] (the logical 2:4 format, DESIGN.md §5) and `L.bias`; every other
            tensor is stored dense. Tensors that share storage (tied weights) are stored once.
  header    `__metadata__["prunekit"]`: JSON with format name and version, the SparseLinear modules
            (in/out features, dtype, bias), every tensor's shape, dtype and sha256, and the aliases.

`load(model, directory)` takes a model of the same architecture (dense or already sparsified), swaps
the listed nn.Linear modules for SparseLinear, checks every checksum and loads the state strictly.
A truncated or altered file raises a ValueError that says which check failed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .calibrate import is_conv1d
from .nn.sparse_linear import SparseLinear
from .nn.unstructured_linear import UnstructuredSparseLinear
from .ref.pack24 import nibble_positions

log = logging.getLogger("prunekit")

FORMAT = "prunekit.sparse24"
VERSION = 1
FILENAME = "model.safetensors"


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stores tied tensors once; returns (tensors, alias -> stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def _header(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict:
    sparse = {name: {"in_features": m.in_features, "out_features": m.out_features,
                     "dtype": str(m.values.dtype).removeprefix("torch."), "bias": m.bias is not None}
              for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    unstructured = {name: {"in_features": m.in_features, "out_features": m.out_features,
                           "dtype": str(m.values.dtype).removeprefix("torch."), "bias": m.bias is not None}
                    for name, m in model.named_modules() if isinstance(m, UnstructuredSparseLinear)}
    return {"format": FORMAT, "version": VERSION, "sparse_linear": sparse, "unstructured_linear": unstructured,
            "aliases": aliases,
            "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                               "sha256": _sha256(t)} for name, t in tensors.items()}}


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes `<directory>/model.safetensors` atomically (temp dir in `directory`, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedup(model.state_dict())
    header = _header(model, tensors, aliases)
    target = directory / FILENAME
    with tempfile.TemporaryDirectory(dir=directory, prefix=".prunekit-save-") as tmp:
        path = Path(tmp) / FILENAME
        save_file(tensors, str(path), metadata={"prunekit": json.dumps(header)})
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, target)
    log.info("saved %d tensors (%d SparseLinear) to %s", len(tensors), len(header["sparse_linear"]), target)
    return target


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; save(model, directory) writes {FILENAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header or short file
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if "prunekit" not in meta:
        raise ValueError(f"{path}: no prunekit header; it was not written by prunekit.save")
    try:
        header = json.loads(meta["prunekit"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the prunekit header is not valid JSON ({exc})") from None
    return header, tensors


def _verify(path: Path, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}; "
                         f"this prunekit reads {FORMAT!r} version {VERSION}")
    expected = header["tensors"]
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{path}: tensors do not match the header (missing {missing}, unexpected {extra})")
    for name, t in tensors.items():
        info = expected[name]
        if list(t.shape) != info["shape"] or str(t.dtype).removeprefix("torch.") != info["dtype"]:
            raise ValueError(f"{path}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, header says "
                             f"{tuple(info['shape'])} {info['dtype']}")
        if _sha256(t) != info["sha256"]:
            raise ValueError(f"{path}: checksum mismatch for tensor {name!r}: the file was altered or corrupted")


def _swap_in_sparse(model: nn.Module, sparse: dict[str, dict], cls=SparseLinear) -> None:
    for name, info in sparse.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load: the saved model has SparseLinear {name!r} but this model has no such module") from None
        if isinstance(module, cls):
            continue
        conv1d = is_conv1d(module)  # transformers' Conv1D (GPT-2): weight [in, out]
        if (not isinstance(module, nn.Linear) and not conv1d) or (conv1d and cls is not SparseLinear):
            raise ValueError(f"load: {name!r} is {cls.__name__} in the file but {type(module).__name__} in the model")
        out_features, in_features = module.weight.shape[::-1] if conv1d else module.weight.shape
        if (in_features, out_features) != (info["in_features"], info["out_features"]):
            raise ValueError(f"load: {name!r} is {info['out_features']}x{info['in_features']} in the file but "
                             f"{out_features}x{in_features} in the model")
        on_meta = module.weight.device.type == "meta"
        device = torch.device("cpu") if on_meta else module.weight.device
        # the layer keeps the model's dtype (values are cast on load, as for every dense tensor); a model
        # on the meta device takes the file's
        dtype = getattr(torch, info["dtype"]) if on_meta else module.weight.dtype
        replacement = cls(info["in_features"], info["out_features"], info["bias"], device=device, dtype=dtype)
        if conv1d:
            replacement.stored_transposed = True
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _meta_tensors(model: nn.Module, path: Path, state: dict) -> bool:
    """Whether the model was built on the meta device (then the file's tensors are taken as they are,
    on CPU); refuses a model only partly on meta, or one whose meta tensors the file does not hold
    (non-persistent buffers such as rotary tables), since those would stay unusable."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    meta = [name for name, t in tensors.items() if t.device.type == "meta"]
    if not meta:
        return False
    sparse_keys = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    unheld = [n for n in meta if n not in state and n not in sparse_keys]
    if len(meta) < len(tensors) or unheld:
        shown = ", ".join((unheld or meta)[:5]) + (", ..." if len(unheld or meta) > 5 else "")
        why = (f"the file does not hold {len(unheld)} of them ({shown})" if unheld else
               f"{len(meta)} of its {len(tensors)} tensors are ({shown}), the others are not")
        raise ValueError(f"load: the model has tensors on the meta device and {why}; they would stay on "
                         f"meta and fail at forward. Build the model on a real device (e.g. "
                         f"torch.device('cpu')) before prunekit.load({os.fspath(path.parent)!r})")
    return True


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restores a model saved by `save` into `model` (same architecture, dense or sparsified); returns it.

    Tensors take the model's device and dtype (a bfloat16 file loads into a float32 model as float32,
    SparseLinear layers included). A model built entirely on the meta device takes the file's tensors
    as stored, on CPU; one whose meta tensors the file does not hold is refused."""
    path = Path(directory) / FILENAME
    header, tensors = _read(path)
    _verify(path, header, tensors)
    state = dict(tensors)
    for alias, stored in header["aliases"].items():
        state[alias] = tensors[stored]
    on_meta = _meta_tensors(model, path, state)
    _swap_in_sparse(model, header["sparse_linear"])
    _swap_in_sparse(model, header.get("unstructured_linear", {}), UnstructuredSparseLinear)
    model.load_state_dict(state, strict=True, assign=on_meta)
    if on_meta and hasattr(model, "tie_weights"):
        model.tie_weights()  # assign=True gives each name its own Parameter
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            try:
                nibble_positions(module.meta)  # the CUDA forward trusts the metadata
            except ValueError as exc:
                raise ValueError(f"{path}: {name}.{exc}") from None
    log.info("loaded %d tensors (%d SparseLinear) from %s", len(tensors), len(header["sparse_linear"]), path)
    return model

"""Save and load pruned models as safetensors (no pickle), with SparseLinear layers kept compressed.

Layout of `<directory>/model.safetensors`:
  tensors   the model's state_dict: a SparseLinear named `L` contributes `L.values` [out, in/2],
            `L.meta` uint8 [out, in/8] (the logical 2:4 format, DESIGN.md §5) and `L.bias`; every other
            tensor is stored dense. Tensors that share storage (tied weights) are stored once.
  header    `__metadata__["prunekit"]`: JSON with format name and version, the SparseLinear modules
            (in/out features, dtype, bias), every tensor's shape, dtype and sha256, and the aliases;
            for a transformers model also its class name and config (`model`), so that `load(directory)`
            can build it. No config.json is written: from_pretrained would read the packed file as a
            dense checkpoint and initialize the weights it misses at random.

`load(model, directory)` takes a model of the same architecture (dense or already sparsified), swaps
the listed nn.Linear modules for SparseLinear, checks every checksum and loads the state strictly.
`load(directory)` builds the model first (transformers class and config from the header, or from the
folder's config.json); it also reads a folder written by `prunekit prune` (its packed copy in
`sparse24/`, or else its dense checkpoint, then `sparsify`). A truncated or altered file raises a
ValueError that says which check failed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ._safetensors import header_of, read_with_header
from .calibrate import is_conv1d
from .nn.sparse_linear import SparseLinear
from .nn.unstructured_linear import UnstructuredSparseLinear
from .ref.pack24 import nibble_positions

log = logging.getLogger("prunekit")

FORMAT = "prunekit.sparse24"
VERSION = 1
FILENAME = "model.safetensors"
META_KEY = "prunekit"
PACKED_DIR = "sparse24"  # the packed copy beside a dense checkpoint (`prunekit prune --format prunekit`)


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
    header = {"format": FORMAT, "version": VERSION, "sparse_linear": sparse, "unstructured_linear": unstructured,
              "aliases": aliases,
              "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                 "sha256": _sha256(t)} for name, t in tensors.items()}}
    described = _model_description(model)
    if described is not None:
        header["model"] = described
    return header


def _model_description(model: nn.Module) -> dict | None:
    """{"architecture": class name, "config": the config as JSON} for a transformers model, else None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not hasattr(type(model), "config_class"):
        return None
    return {"architecture": type(model).__name__,
            "config": json.loads(config.to_json_string(use_diff=False))}


def save(model: nn.Module, directory: str | os.PathLike, *, report=None) -> Path:
    """Writes `<directory>/model.safetensors` atomically (temp dir in `directory`, then rename).

    report: the PruneReport of the run (optional): then `report.json` and a model card (`README.md`)
    are written beside the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedup(model.state_dict())
    header = _header(model, tensors, aliases)
    target = directory / FILENAME
    with tempfile.TemporaryDirectory(dir=directory, prefix=".prunekit-save-") as tmp:
        path = Path(tmp) / FILENAME
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(header)})
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, target)
    if report is not None:
        from .export.model_card import write_model_card

        report.to_json(directory / "report.json")
        write_model_card(directory, report, model=model, fmt="packed")
    log.info("saved %d tensors (%d SparseLinear) to %s", len(tensors), len(header["sparse_linear"]), target)
    return target


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return read_with_header(path, META_KEY, missing=f"no such file; save(model, directory) writes {FILENAME}",
                            foreign="no prunekit header; it was not written by prunekit.save")


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


def load(model, directory: str | os.PathLike | None = None) -> nn.Module:
    """Restores a model saved by `save`; returns it.

    `load(directory)`: builds the model first, on the CPU in the file's dtype (a transformers model: its
    class and config are in the file; see `load_directory`), then restores it as below.
    `load(model, directory)`: into `model` (same architecture, dense or sparsified). Tensors take the
    model's device and dtype (a bfloat16 file loads into a float32 model as float32, SparseLinear layers
    included). A model built entirely on the meta device takes the file's tensors as stored, on CPU; one
    whose meta tensors the file does not hold is refused."""
    if directory is None:
        if isinstance(model, (str, os.PathLike)):
            return load_directory(model)
        raise TypeError(f"load: expected load(directory) or load(model, directory), got one "
                        f"{type(model).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"load: expected a torch.nn.Module as the model, got {type(model).__name__}")
    path = packed_file(directory) or Path(directory) / FILENAME  # a `prunekit prune` folder: its sparse24/
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


# ------------------------------------------------------------------------ load(directory) alone
def packed_file(directory: str | os.PathLike) -> Path | None:
    """The prunekit file of a folder: `<directory>/model.safetensors` written by `save`, or the packed
    copy `<directory>/sparse24/model.safetensors` beside a dense checkpoint; None when there is none."""
    directory = Path(directory)
    for path in (directory / FILENAME, directory / PACKED_DIR / FILENAME):
        if path.is_file() and header_of(path, META_KEY) is not None:
            return path
    return None


def load_directory(directory: str | os.PathLike) -> nn.Module:
    """A model from a folder alone, in eval mode, on the CPU, with its 2:4 layers as SparseLinear.

    - a prunekit file (`save`, or the `sparse24/` copy `prunekit prune` writes beside a dense
      checkpoint): the transformers class and config recorded in it (else the folder's config.json)
      build the model without initializing weights, then `load(model, ...)` restores it exactly;
    - a dense Hugging Face checkpoint (config.json + weights with zeros; a compressed-tensors one is
      dequantized while loading): `from_pretrained`, then `prunekit.sparsify` swaps every exactly-2:4
      layer."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory" if not directory.exists()
                                else f"{directory}: not a directory")
    path = packed_file(directory)
    if path is not None:
        header = header_of(path, META_KEY)
        model = _build_model(header.get("model"), directory, path, _file_dtype(header))
        return load(model, path.parent)
    if (directory / "config.json").is_file():
        return _from_pretrained_sparsified(directory)
    raise FileNotFoundError(f"{directory}: neither a prunekit file ({FILENAME} written by prunekit.save, or "
                            f"{PACKED_DIR}/{FILENAME}) nor a Hugging Face checkpoint (config.json)")


def _transformers(directory: Path):
    try:
        import transformers
    except ImportError:
        raise ImportError(f"load({os.fspath(directory)!r}) builds a transformers model: pip install "
                          f"'prunekit[hf]', or build the model yourself and call load(model, directory)") from None
    return transformers


def _build_model(described: dict | None, directory: Path, path: Path, dtype: torch.dtype) -> nn.Module:
    transformers = _transformers(directory)
    if described is not None:
        arch, config_dict = described.get("architecture"), described.get("config")
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None or not hasattr(cls, "config_class"):
            raise ValueError(f"{path}: the model class {arch!r} is not in this transformers "
                             f"({transformers.__version__}); build the model and call load(model, directory)")
        config = cls.config_class.from_dict(config_dict)
    elif (directory / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(directory)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise ValueError(f"{directory}/config.json names no transformers model class (architectures="
                             f"{config.architectures!r}); build the model and call load(model, directory)")
    else:
        raise ValueError(f"{path} was saved from a model that is not a transformers model (no class and "
                         f"config recorded) and the folder has no config.json; build the model and call "
                         f"prunekit.load(model, {os.fspath(directory)!r})")
    with _no_weight_init(transformers):
        model = cls._from_config(config, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # transformers ties embeddings while initializing weights, which was skipped
    log.info("built %s from %s (%s) to load %s", cls.__name__, "the file" if described else "config.json",
             dtype, path)
    return model.eval()


def _no_weight_init(transformers):
    """transformers' context that skips random initialization (the weights are loaded next)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _file_dtype(header: dict) -> torch.dtype:
    """The floating dtype holding most of the file's elements (the model's dtype)."""
    counts: dict[str, int] = {}
    for info in header.get("tensors", {}).values():
        dtype = getattr(torch, str(info.get("dtype")), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            numel = 1
            for d in info.get("shape", []):
                numel *= int(d)
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + numel
    return getattr(torch, max(counts, key=counts.get)) if counts else torch.float32


def _from_pretrained_sparsified(directory: Path) -> nn.Module:
    transformers = _transformers(directory)
    from .nn.swap import sparsify

    config = transformers.AutoConfig.from_pretrained(directory)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in transformers.__version__.split(".")[:2])
    kwargs = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": "auto"}
    quantization = getattr(config, "quantization_config", None)
    quant_method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if quant_method == "compressed-tensors" and quantization.get("config_groups"):
        # the weights must be dense for sparsify; dequantizing at load gives them exactly
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = cls.from_pretrained(directory, **kwargs).eval()
    report = sparsify(model)
    log.info("loaded the dense checkpoint %s; %s", directory, report)
    return model


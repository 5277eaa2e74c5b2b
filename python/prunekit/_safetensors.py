"""Reading a safetensors file that carries a JSON header of prunekit's own in its metadata (shared by
prunekit.io and prunekit.train.masks): every way the file can be unreadable becomes one ValueError that
names the file and what failed."""
from __future__ import annotations

import json
from pathlib import Path


def read_with_header(path: Path, key: str, *, framework: str = "pt", missing: str,
                     foreign: str) -> tuple[dict, dict]:
    """(header, tensors) of the safetensors file at `path`, the header parsed from metadata[key].

    missing: the end of the FileNotFoundError message when there is no file ("{path}: " + missing);
    foreign: the end of the ValueError message when the file has no `key` metadata."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        with safe_open(str(path), framework=framework) as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header or short file
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if key not in meta:
        raise ValueError(f"{path}: {foreign}")
    try:
        header = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the {key} header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the {key} header is not a JSON object")
    return header, tensors


def header_of(path: Path, key: str) -> dict | None:
    """The JSON header metadata[key] of a safetensors file without reading its tensors; None when the
    file is missing, unreadable or has no such header (for telling file kinds apart)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
        return json.loads(raw) if raw is not None else None
    except Exception:  # any unreadable file is simply "not ours" here; read_with_header reports why
        return None

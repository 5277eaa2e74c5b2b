"""The model card (README.md) written beside a pruned checkpoint, with the Hugging Face Hub's YAML front
matter: what was pruned and how (method, pattern, calibration, quantization), what was measured, the
file format and how to load it, and the prunekit version. Only what is known is stated; nothing is
guessed (an unmeasured quality says so)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

log = logging.getLogger("prunekit")

FORMATS = {
    "packed": "prunekit's packed 2:4 safetensors (`model.safetensors`: kept values and 2-bit positions of "
              "the 2:4 layers, every other tensor dense; class and config in its header)",
    "prunekit": "Hugging Face layout with dense weights (pruned weights are exact zeros); when the pattern "
                "is 2:4, `sparse24/` also holds prunekit's packed 2:4 copy",
    "hf": "Hugging Face layout with dense weights (pruned weights are exact zeros)",
    "compressed-tensors": "compressed-tensors (`quantization_config` with `quant_method: compressed-tensors`): "
                          "quantized layers as packed integer codes with scales and zero-points, the "
                          "sparsity structure recorded in `sparsity_config`, other weights dense",
}

_LOAD = {
    "packed": "```python\nimport prunekit as pk\nmodel = pk.load(\"{dir}\")   # 2:4 layers packed (SparseLinear)\n```",
    "prunekit": ("```python\nimport prunekit as pk\nmodel = pk.load(\"{dir}\")            # 2:4 layers packed "
                 "(SparseLinear)\n\nfrom transformers import AutoModel\nmodel = AutoModel.from_pretrained"
                 "(\"{dir}\")   # dense, with the zeros\n```"),
    "compressed-tensors": ("```python\nfrom transformers import AutoModelForCausalLM   # needs "
                           "`pip install compressed-tensors`\nmodel = AutoModelForCausalLM.from_pretrained"
                           "(\"{dir}\")\n```\nvLLM reads the same folder."),
}


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def _model_zeros(model: nn.Module) -> float | None:
    """Fraction of zero weights over all floating parameters (packed layers counted as their dense weight)."""
    from ..nn.sparse_linear import SparseLinear
    from ..nn.unstructured_linear import UnstructuredSparseLinear

    total = zeros = 0
    seen = set()  # parameters (tied ones once); a packed layer's dense weight is a fresh tensor

    def count(t):
        nonlocal total, zeros
        if t.is_floating_point():
            total += t.numel()
            zeros += int((t == 0).sum())

    for module in model.modules():
        packed = isinstance(module, (SparseLinear, UnstructuredSparseLinear))
        if packed:
            count(module.weight.detach())
        for name, p in module.named_parameters(recurse=False):
            if (packed and name != "bias") or id(p) in seen:
                continue
            seen.add(id(p))
            count(p.detach())
    return zeros / total if total else None


def _quant_line(report) -> str | None:
    quant = getattr(report, "quant", None) or {}
    if not quant:
        return None
    bits = sorted({q.bits for q in quant.values()})
    groups = sorted({"per row" if q.scale.shape[1] == 1 else f"{q.groupsize} columns"
                     for q in quant.values()})
    return (f"{'/'.join(map(str, bits))}-bit integer weights, one scale and zero-point per "
            f"{' / '.join(groups)}, on {len(quant)} layers")


def card_text(report=None, *, model: nn.Module | None = None, fmt: str = "prunekit", directory: str = ".",
              calibration: str | None = None, quality: dict | None = None, base_model: str | None = None) -> str:
    """The model card as a string; see `write_model_card`."""
    import prunekit

    pattern = getattr(report, "pattern", None)
    tags = ["prunekit", "pruned"]
    if pattern:
        tags.append(f"sparsity-{pattern}" if ":" in pattern else "unstructured-sparsity")
    if getattr(report, "quant", None):
        tags.append("quantized")
    if fmt == "compressed-tensors":
        tags.append("compressed-tensors")
    front = ["---"]
    if model is None or hasattr(model, "config"):
        front.append("library_name: transformers")
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]

    rows = []
    if report is not None:
        rows.append(("Method", f"`{report.method}`"))
        rows.append(("Pattern", str(report.pattern)))
        rows.append(("Pruned layers", f"{len(report.layers)} layers, {_percent(report.sparsity)} of their weights "
                                      f"are zero" + (f"; {len(report.skipped)} left dense" if report.skipped else "")))
    if model is not None:
        zeros = _model_zeros(model)
        if zeros is not None:
            rows.append(("Whole model", f"{_percent(zeros)} of all weights are zero"))
    if calibration:
        rows.append(("Calibration", calibration))
    elif report is not None:
        measured = any(layer.error is not None for layer in report.layers)
        rows.append(("Calibration", "not recorded" if measured else "none (weights only)"))
    quant = _quant_line(report) if report is not None else None
    if quant:
        rows.append(("Quantization", quant))
    measured = []
    if report is not None and report.error is not None:
        measured.append(f"reconstruction error {report.error:.4g} (sum over pruned layers of "
                        f"‖XWᵀ − XŴᵀ‖² on the calibration inputs)")
    for key, value in (quality or {}).items():
        measured.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    rows.append(("Measured quality", "; ".join(measured) if measured else
                 "not measured (e.g. `prunekit eval --model DIR --data text.txt` for perplexity)"))
    rows.append(("Format", FORMATS.get(fmt, fmt)))
    rows.append(("prunekit", prunekit.__version__))

    body = ["# Pruned with prunekit", "", "| | |", "|---|---|"]
    body += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    if report is not None and report.warnings:
        body += ["", "Warnings of the run:", ""] + [f"- {w}" for w in report.warnings]
    if fmt in _LOAD:
        body += ["", "## Load", "", _LOAD[fmt].format(dir=directory)]
        asymmetric = [q for q in (getattr(report, "quant", None) or {}).values()
                      if not bool((q.zero == 2 ** (q.bits - 1)).all())]
        if fmt == "compressed-tensors" and asymmetric:
            body += ["", "The weights are quantized asymmetrically (with zero-points). transformers 5.x's default "
                         "compressed-tensors route fails on asymmetric pack-quantized weights (a zero-point shape "
                         "mismatch); pass `quantization_config=CompressedTensorsConfig(dequantize=True)` to "
                         "`from_pretrained`, which loads them exactly."]
    if report is not None:
        body += ["", "`report.json` beside the weights lists every pruned layer (shape, sparsity, error, time)."]
    return "\n".join(front + body) + "\n"


def write_model_card(directory: str | os.PathLike, report=None, *, model: nn.Module | None = None,
                     fmt: str = "prunekit", calibration: str | None = None, quality: dict | None = None,
                     base_model: str | None = None) -> Path:
    """Writes `<directory>/README.md`.

    report: the PruneReport (method, pattern, per-layer sparsity and reconstruction error, quantization);
    model: the pruned model (its overall fraction of zero weights); fmt: "prunekit", "hf", "packed"
    (prunekit.save's file) or "compressed-tensors" (the format line and loading snippet); calibration: a description such as
    "128 windows x 2048 tokens of c4.txt"; quality: measured numbers, e.g. {"perplexity (wikitext-2)":
    7.2}; base_model: the Hub id of the dense model (front matter)."""
    directory = Path(directory)
    path = directory / "README.md"
    text = card_text(report, model=model, fmt=fmt, directory="path/to/this/folder", calibration=calibration,
                     quality=quality, base_model=base_model)
    path.write_text(text, encoding="utf-8")
    log.info("wrote the model card %s", path)
    return path

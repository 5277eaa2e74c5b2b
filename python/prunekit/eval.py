"""Evaluating a pruned model: perplexity (as the references compute it), sparsity, and for encoders
how closely its sentence embeddings follow the dense model's."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tqdm.auto import tqdm

from . import calibrate, data, patterns
from ._progress import show_progress


def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 2048, *, batch_size: int = 1,
               device=None, progress: bool | None = None) -> float:
    """Perplexity over non-overlapping windows of `seq_len` tokens (a trailing partial window is
    dropped), as SparseGPT/Wanda evaluate WikiText-2: exp(Σ mean-window-NLL · seq_len / (n · seq_len)).
    progress: a tqdm bar over the windows (default: only when stderr is a terminal)."""
    ids = data._check_token_ids(token_ids, "token_ids").reshape(-1).long()
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"token_ids: {ids.numel()} tokens make no window of seq_len={seq_len}")
    limit = data.max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is longer than the model supports ({limit} positions)")
    device = torch.device(device) if device is not None else calibrate.model_device(model)
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    extra = calibrate.forward_kwargs(model)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad(), calibrate.kept_modes(model, train=False):  # each submodule's flag comes back
        bar = tqdm(windows.split(batch_size), desc="prunekit perplexity", unit="batch",
                   disable=not show_progress(progress))
        for batch in bar:
            batch = batch.to(device)
            logits = model(input_ids=batch, **extra).logits.float()
            losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                     batch[:, 1:].reshape(-1), reduction="none")
            total += losses.reshape(batch.shape[0], -1).mean(1).double().sum().cpu() * seq_len
    return float(torch.exp(total / (n_windows * seq_len)))


@dataclass
class Sparsity:
    layers: dict[str, float]   # fraction of exactly-zero weights per linear layer
    total: float               # over all those layers' weights

    def __str__(self) -> str:
        width = max((len(n) for n in self.layers), default=5)
        lines = [f"{n.ljust(width)}  {s:.4f}" for n, s in self.layers.items()]
        return "\n".join([*lines, f"{'total'.ljust(width)}  {self.total:.4f}"])


def sparsity(model: nn.Module, include=None, exclude=None) -> Sparsity:
    """Fraction of exactly-zero weights in each linear layer and in total. By default the layers
    pk.prune targets by default: every nn.Linear / Conv1D / SparseLinear inside the model's blocks (all
    of them in a model without blocks), never the LM head — so BERT's pooler does not dilute it.
    SparseLinear / UnstructuredSparseLinear layers count their weight as stored (the pruned zeros count)."""
    found = calibrate.find_blocks(model)
    layers = calibrate.select_layers(model, include, exclude, found[0] if found else None)
    sparse = {name: m for name, m in model.named_modules() if _is_sparse_linear(m)}
    if sparse:  # SparseLinear is not a prunable nn.Linear; select it by the same rule
        prefix = found[0] + "." if found else ""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inc = patterns.as_name_patterns(include, "include")
        exc = patterns.as_name_patterns(exclude, "exclude")
        for name, m in sparse.items():
            if patterns.selected(name, inc, exc, name.startswith(prefix) and m is not head):
                layers[name] = m
        layers = {name: layers[name] for name, _ in model.named_modules() if name in layers}
    per_layer, zeros, numel = {}, 0, 0
    for name, module in layers.items():
        w = calibrate.layer_weight(module) if not _is_sparse_linear(module) else module.weight
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel() if w.numel() else 0.0
        zeros, numel = zeros + z, numel + w.numel()
    return Sparsity(per_layer, zeros / numel if numel else 0.0)


def _is_sparse_linear(module: nn.Module) -> bool:
    """prunekit's packed layers (2:4 SparseLinear, bitmask UnstructuredSparseLinear); `.weight` is dense."""
    from .nn.sparse_linear import SparseLinear
    from .nn.unstructured_linear import UnstructuredSparseLinear

    return isinstance(module, (SparseLinear, UnstructuredSparseLinear))


def embed(model: nn.Module, batches, device=None) -> torch.Tensor:
    """Mean-pooled (over attention_mask), L2-normalized last hidden states: [n_sentences, hidden]."""
    device = torch.device(device) if device is not None else calibrate.model_device(model)
    out = []
    with torch.no_grad(), calibrate.kept_modes(model, train=False):
        for batch in batches:
            batch = calibrate.to_device(batch, device)
            hidden = model(**batch)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            mask = batch.get("attention_mask")
            mask = torch.ones(hidden.shape[:2], device=device) if mask is None else mask
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def embedding_fidelity(dense_model: nn.Module, pruned_model: nn.Module, batches, device=None) -> dict:
    """How well the pruned encoder's sentence embeddings follow the dense one's on held-out text.

    cosine: mean cosine similarity between each sentence's dense and pruned embedding.
    nn_agreement: fraction of sentences whose nearest other sentence is the same under both models.
    """
    batches = list(batches)
    return compare_embeddings(embed(dense_model, batches, device), embed(pruned_model, batches, device))


def compare_embeddings(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    """`embedding_fidelity` on embeddings already computed (L2-normalized, one row per sentence)."""
    if dense.shape != pruned.shape:
        raise ValueError(f"embeddings: dense {tuple(dense.shape)} and pruned {tuple(pruned.shape)} differ in shape")
    if dense.shape[0] < 2:
        raise ValueError("embedding_fidelity: needs at least 2 sentences for nearest neighbours")
    agree = (_nearest(dense) == _nearest(pruned)).float().mean().item()
    return {"cosine": (dense * pruned).sum(-1).mean().item(), "nn_agreement": agree, "sentences": dense.shape[0]}


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.t()
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(-1)

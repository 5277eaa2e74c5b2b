"""The reward: how closely the pruned model's outputs follow the dense model's on held-out batches.

- "kl": mean over tokens of KL(dense ‖ pruned) of the next-token distributions (models with logits);
- "cosine": 1 − mean cosine between dense and pruned sentence embeddings (the last hidden state,
  mean-pooled over the attention mask and L2-normalized, as prunekit.eval.embed) — for encoders;
- "mse": ‖pruned − dense‖² / ‖dense‖² of the model's main output (logits, last hidden state, or the
  tensor a plain module returns);
- "auto": "kl" when the model returns logits, "cosine" when it returns a last hidden state, else "mse".

Lower is better for every loss; `quality` is the number a user reads (KL, cosine, relative error).
The dense outputs are computed once and kept (for "kl": log-probabilities, [tokens, vocab] per batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import calibrate

OBJECTIVES = ("auto", "kl", "cosine", "mse")


def main_output(out) -> tuple[str, torch.Tensor]:
    """("logits" | "hidden" | "tensor", the tensor) of a model's forward output."""
    if isinstance(out, torch.Tensor):
        return "tensor", out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return "logits", logits
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return "hidden", hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return "tensor", out[0]
    raise TypeError(f"the model's forward returned {type(out).__name__}; expected a tensor or an output with "
                    ".logits or .last_hidden_state")


class Fidelity:
    """Scores the model as it is now against its dense outputs on `batches` (captured at construction)."""

    def __init__(self, model: nn.Module, batches: list[dict], objective: str, device: torch.device):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
        self.model, self.batches, self.device = model, batches, device
        self.extra = calibrate.forward_kwargs(model)
        kind, _ = main_output(self._forward(batches[0]))
        if objective == "auto":
            objective = {"logits": "kl", "hidden": "cosine"}.get(kind, "mse")
        if objective == "kl" and kind != "logits":
            raise ValueError(f"objective='kl' needs a model that returns logits; this one returns {kind} "
                             "(use 'cosine' for an encoder or 'mse')")
        self.objective = objective
        self.reference = [self._summary(b) for b in batches]

    def _forward(self, batch: dict):
        return self.model(**calibrate.to_device(batch, self.device), **self.extra)

    def _summary(self, batch: dict) -> torch.Tensor:
        _, out = main_output(self._forward(batch))
        out = out.float()
        if self.objective == "kl":
            return F.log_softmax(out.reshape(-1, out.shape[-1]), dim=-1)
        if self.objective == "cosine":
            if out.dim() != 3:
                raise ValueError(f"objective='cosine' pools hidden states [batch, seq, features]; got {tuple(out.shape)}")
            mask = batch.get("attention_mask")
            mask = torch.ones(out.shape[:2]) if mask is None else mask
            mask = mask.to(out.device).unsqueeze(-1).to(out.dtype)
            return F.normalize((out * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)
        return out

    def loss(self) -> float:
        """The objective's loss of the model's current weights (lower is better)."""
        total, count = 0.0, 0
        for batch, ref in zip(self.batches, self.reference):
            now = self._summary(batch)
            if self.objective == "kl":
                kl = (ref.exp() * (ref - now)).sum(-1)  # per token
                total, count = total + float(kl.double().sum()), count + kl.numel()
            elif self.objective == "cosine":
                cos = (ref * now).sum(-1)
                total, count = total + float((1 - cos).double().sum()), count + cos.numel()
            else:
                err = (now - ref).double().pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30)
                total, count = total + float(err), count + 1
        return total / count

    def quality(self, loss: float) -> float:
        """The loss as a user reads it: the cosine itself for "cosine", the loss otherwise."""
        return 1.0 - loss if self.objective == "cosine" else loss

    @property
    def quality_name(self) -> str:
        return {"kl": "KL(dense || pruned)", "cosine": "embedding cosine", "mse": "relative squared error"}[self.objective]

"""Recovery fine-tuning with LoRA adapters (peft), as the Wanda and LLM-Pruner papers recover quality.

    report = prunekit.recover_lora(pruned, dense_teacher, calib_ids, steps=200, r=8, merge=True)

The pruned weights stay frozen; peft LoRA adapters (ΔW = s·B·A) on every linear layer of the blocks
train on the loss of prunekit.recover (distillation against the teacher's logits with `alpha` and
`temperature`, or next-token cross-entropy without a teacher). Encoders without logits (BERT,
MiniLM) distil their sentence embedding: 1 − cos between the student's and the teacher's
mean-pooled last hidden states.

merge=True folds the adapters back with the sparsity pattern kept exactly: a layer with zeros gets
W ← (W + s·B·A) ⊙ [W ≠ 0], so the part of the delta that fell on pruned weights is dropped;
`LoRARecoveryReport.delta_dropped` is that part's share of ‖s·B·A‖ (overall, and per layer).
Structurally pruned (shrunk) layers have no zeros and merge whole. merge=False keeps the adapters
separate: `report.model` is the peft model (`save_pretrained` writes the adapters alone); its
effective weights W + s·B·A are dense, and `delta_dropped` says what a masked merge would drop.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate, data
from .._progress import show_progress
from .._peft import ADAPTER, require_peft
from . import distill

log = logging.getLogger("prunekit")


@dataclass
class LoRARecoveryReport:
    losses: list[float]
    merged: bool
    delta_dropped: float                                   # ‖delta on pruned weights‖ / ‖delta‖, all layers
    per_layer: dict[str, float] = field(default_factory=dict)
    trainable: int = 0                                     # adapter parameters trained
    model: nn.Module | None = None                         # the peft model when merge=False, else the student

    def __str__(self) -> str:
        return (f"LoRA recovery: {len(self.losses)} steps, loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, "
                f"{self.trainable:,} adapter parameters, {'merged' if self.merged else 'kept separate'}; "
                f"{self.delta_dropped:.1%} of the delta's norm on pruned weights")


def _embedding(output, batch: dict) -> torch.Tensor:
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    mask = batch.get("attention_mask")
    mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.device)
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def embedding_loss(student: nn.Module, teacher: nn.Module, batch: dict) -> torch.Tensor:
    """1 − mean cosine between the student's and the teacher's mean-pooled last hidden states."""
    device = calibrate.model_device(student)
    batch = calibrate.to_device(batch, device)
    with torch.no_grad():
        target = _embedding(teacher(**batch), batch)
    pooled = _embedding(student(**batch), batch)
    return 1 - F.cosine_similarity(pooled.float(), target.float(), dim=-1).mean()


def has_logits(model: nn.Module) -> bool:
    """Whether the model has an LM head (so its recovery loss is next-token / logit distillation)."""
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def recovery_loss(model: nn.Module, batch: dict, teacher: nn.Module | None, *, temperature: float = 2.0,
                  alpha: float = 1.0) -> torch.Tensor:
    """prunekit.recover's loss for a model with an LM head (distillation against the teacher's logits,
    or next-token cross-entropy without a teacher); for an encoder, `embedding_loss` against the teacher."""
    if has_logits(model):
        return distill.lm_loss(model, batch, teacher, temperature=temperature, alpha=alpha)
    if teacher is None:
        raise ValueError(f"{type(model).__name__} has no LM head: its loss is embedding distillation, which needs a teacher")
    return embedding_loss(model, teacher, batch)


def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> dict[str, nn.Module]:
    """The peft LoRA layers of a model, by name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer") and adapter in m.lora_A}


@torch.no_grad()
def masked_delta(layer: nn.Module, adapter: str = ADAPTER) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s·B·A in nn.Linear layout, keep mask [W ≠ 0] or None when W has no zeros) of a peft LoRA layer."""
    w = calibrate.layer_weight(layer.get_base_layer())
    delta = float(layer.scaling[adapter]) * (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float())
    keep = w != 0
    return delta, (None if bool(keep.all()) else keep)


@torch.no_grad()
def delta_dropped(peft_model: nn.Module, adapter: str = ADAPTER) -> tuple[float, dict[str, float]]:
    """‖s·B·A on pruned weights‖ / ‖s·B·A‖: over all adapted layers, and per layer (by model path)."""
    lost = total = 0.0
    per_layer = {}
    for name, layer in lora_layers(peft_model, adapter).items():
        delta, keep = masked_delta(layer, adapter)
        norm_sq = float(delta.square().sum(dtype=torch.float64))
        lost_sq = 0.0 if keep is None else float(delta[~keep].square().sum(dtype=torch.float64))
        per_layer[name.removeprefix("base_model.model.")] = math.sqrt(lost_sq / norm_sq) if norm_sq > 0 else 0.0
        lost, total = lost + lost_sq, total + norm_sq
    return (math.sqrt(lost / total) if total > 0 else 0.0), per_layer


@torch.no_grad()
def merge_masked(peft_model: nn.Module, adapter: str = ADAPTER) -> nn.Module:
    """Merges the adapters keeping every layer's zeros, W ← (W + s·B·A) ⊙ [W ≠ 0], and returns the plain model."""
    for layer in lora_layers(peft_model, adapter).values():
        delta, keep = masked_delta(layer, adapter)
        w = calibrate.layer_weight(layer.get_base_layer())
        w.copy_((w.float() + (delta if keep is None else delta * keep)).to(w.dtype))
        layer.lora_B[adapter].weight.zero_()  # folded in; peft's merge adds nothing more
    return peft_model.merge_and_unload()


def recover_lora(student: nn.Module, teacher: nn.Module | None, batches, steps: int, lr: float = 1e-4, *,
                 r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0, merge: bool = True,
                 temperature: float = 2.0, alpha: float = 1.0, include=None, exclude=None,
                 blocks: str | None = None, batch_size: int = 1, max_grad_norm: float | None = 1.0,
                 progress: bool | None = None, log_every: int = 10) -> LoRARecoveryReport:
    """Fine-tunes LoRA adapters on the pruned `student` towards `teacher` (see the module docstring).

    batches: token ids [n, seq_len] or a list of batches, cycled for `steps` AdamW steps.
    teacher: the dense original (distillation) or None (causal LMs only: next-token cross-entropy).
    include / exclude / blocks: the layers that get adapters, as for prunekit.prune (default: every
        linear layer in the blocks).
    """
    peft = require_peft()
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    if not isinstance(student, nn.Module):
        raise TypeError(f"student: expected a torch.nn.Module, got {type(student).__name__}")
    if isinstance(student, peft.PeftModel):
        raise ValueError("recover_lora: the student already has peft adapters; give the plain model")
    causal = has_logits(student)
    if not causal and teacher is None:
        raise ValueError(f"recover_lora: {type(student).__name__} has no LM head, so its loss is embedding "
                         "distillation and needs a teacher")
    items = data.as_batches(batches, batch_size=batch_size, max_len=data.max_positions(student),
                            vocab=data.vocab_size(student))
    if causal and any("input_ids" not in b for b in items):
        raise ValueError("recover_lora: every batch needs input_ids (the next-token positions define the loss)")
    found = calibrate.find_blocks(student, blocks)
    layers = calibrate.select_layers(student, include, exclude, found[0] if found is not None else None)
    if not layers:
        raise calibrate.no_layers_error(student, include, exclude)
    conv1d = {calibrate.is_conv1d(m) for m in layers.values()}
    if len(conv1d) > 1:
        raise ValueError("recover_lora: the selected layers mix nn.Linear and Conv1D; select one kind")
    flags = {p: p.requires_grad for p in student.parameters()}
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                             target_modules=sorted(layers), fan_in_fan_out=conv1d.pop())
    peft_model = peft.get_peft_model(student, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    modes = contextlib.ExitStack()  # every submodule of both models gets its own training flag back
    modes.enter_context(calibrate.kept_modes(peft_model, train=True))
    if teacher is not None:
        modes.enter_context(calibrate.kept_modes(teacher, train=False))
    losses: list[float] = []
    log.info("recover_lora: %d steps, lr %g, rank %d on %d layers (%d adapter parameters)", steps, lr, r,
             len(layers), sum(p.numel() for p in params))
    try:
        for step in tqdm(range(steps), desc="prunekit recover_lora", unit="step",
                         disable=not show_progress(progress)):
            batch = items[step % len(items)]
            loss = recovery_loss(peft_model, batch, teacher, temperature=temperature, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                log.info("recover_lora step %d/%d: loss %.5f", step + 1, steps, losses[-1])
    finally:
        optimizer.zero_grad(set_to_none=True)
        modes.close()
    dropped, per_layer = delta_dropped(peft_model)
    report = LoRARecoveryReport(losses=losses, merged=merge, delta_dropped=dropped, per_layer=per_layer,
                                trainable=sum(p.numel() for p in params))
    if merge:
        report.model = merge_masked(peft_model)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    else:
        report.model = peft_model
    log.info("%s", report)
    return report

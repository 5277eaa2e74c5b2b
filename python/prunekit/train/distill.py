"""Knowledge distillation to recover a pruned model's quality from its dense original.

    losses = recover(pruned_model, dense_model, calib_ids, steps=200, lr=2e-5)

The loss (Hinton et al. 2015) is alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) plus
(1 − alpha) · cross-entropy of the student on the labels; T² keeps the gradient scale of the soft term
independent of the temperature. `recover` trains with the pruned weights held at exactly zero
(MaskedTraining.from_pruned), so the result has the sparsity pattern it started with.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import _validate, calibrate, data
from .._progress import show_progress
from .masked import MaskedTraining

log = logging.getLogger("prunekit")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                      alpha: float = 0.5, labels: torch.Tensor | None = None, *,
                      ignore_index: int = -100) -> torch.Tensor:
    """Mean over positions of alpha · T² · KL(teacher ‖ student) + (1 − alpha) · CE(student, labels).

    Logits are [..., vocab]; labels, if given, are the leading shape. Without labels the loss is the
    soft term T² · KL alone. Positions whose label is `ignore_index` count in neither term.
    Computed in float32.
    """
    _validate.float_tensor(student_logits, "student_logits")
    _validate.float_tensor(teacher_logits, "teacher_logits")
    _validate.shape(teacher_logits, tuple(student_logits.shape), "teacher_logits")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha!r}")
    vocab = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    teacher = teacher_logits.float().reshape(-1, vocab)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # per position
    if labels is None:
        return temperature ** 2 * kl.mean()
    _validate.shape(labels, tuple(student_logits.shape[:-1]), "labels")
    flat = labels.reshape(-1).to(student.device)
    kept = flat != ignore_index
    if not bool(kept.any()):
        raise ValueError(f"labels: every position is ignore_index ({ignore_index}); nothing to learn from")
    ce = F.cross_entropy(student, flat, ignore_index=ignore_index, reduction="none")
    per_position = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    return per_position[kept].mean()


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__} without logits; recover needs a "
                        "language model whose output has .logits (or a logits tensor)")
    return logits


def _forward(model: nn.Module, batch: dict) -> torch.Tensor:
    device = calibrate.model_device(model)
    return _logits(model(**calibrate.to_device(batch, device), **calibrate.forward_kwargs(model)))


def _next_token_labels(batch: dict, ignore_index: int) -> torch.Tensor:
    """The labels of positions 0..L-2: the next token (padding, by attention_mask, ignored)."""
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    return labels[:, 1:]


def lm_loss(student: nn.Module, batch: dict, teacher: nn.Module | None = None, *, temperature: float = 2.0,
            alpha: float = 1.0) -> torch.Tensor:
    """The training loss of one batch over positions 0..L-2 (those with a next token): with a teacher,
    distillation_loss(student, teacher, T, alpha, next-token labels); without one, next-token
    cross-entropy."""
    student_logits = _forward(student, batch)
    labels = _next_token_labels(batch, -100).to(student_logits.device)
    if teacher is None:
        logits = student_logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    with torch.no_grad():
        teacher_logits = _forward(teacher, batch)
    return distillation_loss(student_logits[:, :-1], teacher_logits[:, :-1].to(student_logits.device),
                             temperature, alpha, labels)


def recover(student: nn.Module, teacher: nn.Module, batches, steps: int, lr: float = 2e-5, *,
            temperature: float = 2.0, alpha: float = 1.0, weight_decay: float = 0.0,
            max_grad_norm: float | None = 1.0, batch_size: int = 1, include=None, exclude=None,
            blocks: str | None = None, progress: bool | None = None, log_every: int = 10) -> list[float]:
    """Fine-tunes a pruned causal LM `student` towards `teacher` (its dense original) in place.

    batches: token ids [n, seq_len] (fed `batch_size` rows at a time) or a list of batches, as for
        prunekit.prune; they are cycled through for `steps` AdamW steps.
    alpha: weight of the soft (distillation) term; below 1 the rest is next-token cross-entropy on
        the batch's own tokens. Loss positions are 0..L-2, the positions that have a next token.
    include / exclude / blocks: the layers whose zeros are held fixed (default as prunekit.prune);
        every trainable parameter of the student is optimized.
    Returns the loss of each step.
    """
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    items = data.as_batches(batches, batch_size=batch_size, max_len=data.max_positions(student),
                            vocab=data.vocab_size(student))
    if any("input_ids" not in b for b in items):
        raise ValueError("recover: every batch needs input_ids (the next-token positions define the loss)")
    _refuse_sparsified(student)
    masks = MaskedTraining.from_pruned(student, include=include, exclude=exclude, blocks=blocks)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    modes = contextlib.ExitStack()  # every submodule of both models gets its own training flag back
    modes.enter_context(calibrate.kept_modes(student, train=True))
    modes.enter_context(calibrate.kept_modes(teacher, train=False))
    losses: list[float] = []
    log.info("recover: %d steps, lr %g, T %g, alpha %g, %d sparse layers held fixed", steps, lr,
             temperature, alpha, len(masks.layers))
    try:
        for step in tqdm(range(steps), desc="prunekit recover", unit="step", disable=not show_progress(progress)):
            loss = lm_loss(student, items[step % len(items)], teacher, temperature=temperature, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            masks.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                log.info("recover step %d/%d: loss %.5f", step + 1, steps, losses[-1])
    finally:
        masks.finalize()
        optimizer.zero_grad(set_to_none=True)
        modes.close()
    return losses


def _refuse_sparsified(student: nn.Module) -> None:
    from ..nn.sparse_linear import SparseLinear

    packed = [name for name, m in student.named_modules() if isinstance(m, SparseLinear)]
    if packed:
        raise ValueError(f"recover: the student holds {len(packed)} SparseLinear layer(s) ({packed[0]}, ...): "
                         "recover fine-tunes dense nn.Linear weights under their zero masks. Run "
                         "prunekit.recover after prunekit.prune and before prunekit.sparsify, then sparsify")

"""Distillation loss against a hand-written formula; recovery of a pruned tiny Llama."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import prunekit as pk
from prunekit.train.distill import _next_token_labels

from pipeline_models import calib_ids, tiny_model


def hand_loss(student, teacher, T, alpha, labels=None, ignore=-100) -> float:
    """Per position: alpha·T²·Σ p_t (log p_t − log p_s) + (1 − alpha)·(−log softmax(s)[y]), averaged."""
    def log_softmax(row, temp):
        z = [x / temp for x in row]
        top = max(z)
        norm = top + math.log(sum(math.exp(x - top) for x in z))
        return [x - norm for x in z]

    values = []
    for pos, (s_row, t_row) in enumerate(zip(student.reshape(-1, student.shape[-1]).tolist(),
                                             teacher.reshape(-1, teacher.shape[-1]).tolist())):
        y = None if labels is None else labels.reshape(-1)[pos].item()
        if y == ignore:
            continue
        ls, lt = log_softmax(s_row, T), log_softmax(t_row, T)
        kl = sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
        if y is None:
            values.append(T * T * kl)
        else:
            values.append(alpha * T * T * kl + (1 - alpha) * -log_softmax(s_row, 1.0)[y])
    return sum(values) / len(values)


def test_loss_equals_the_hand_formula():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=gen), 2 * torch.randn(2, 3, 7, generator=gen)
    labels = torch.tensor([[1, 6, -100], [0, 3, 2]])
    got = pk.distillation_loss(student, teacher, temperature=2.0, alpha=0.3, labels=labels)
    assert got.item() == pytest.approx(hand_loss(student, teacher, 2.0, 0.3, labels), rel=1e-5)
    soft = pk.distillation_loss(student, teacher, temperature=3.0, alpha=0.3)
    assert soft.item() == pytest.approx(hand_loss(student, teacher, 3.0, 0.3), rel=1e-5)
    # soft term equals torch's KL with batchmean over positions
    kl = torch.nn.functional.kl_div((student / 3).log_softmax(-1).reshape(-1, 7),
                                    (teacher / 3).log_softmax(-1).reshape(-1, 7), log_target=True,
                                    reduction="batchmean")
    assert soft.item() == pytest.approx(9 * kl.item(), rel=1e-5)


def test_loss_is_zero_for_identical_logits_and_has_gradients():
    logits = torch.randn(4, 11, requires_grad=True)
    assert pk.distillation_loss(logits, logits.detach(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    loss = pk.distillation_loss(logits, torch.randn(4, 11), 2.0, 0.5, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_loss_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError):
        pk.distillation_loss(x, torch.randn(2, 6))
    with pytest.raises(ValueError):
        pk.distillation_loss(x, x, temperature=0)
    with pytest.raises(ValueError):
        pk.distillation_loss(x, x, alpha=1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        pk.distillation_loss(x, x, labels=torch.tensor([-100, -100]))


def test_next_token_labels_ignore_padding():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert _next_token_labels(batch, -100).tolist() == [[6, 7, -100]]


def eval_loss(student, teacher, ids) -> float:
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    return pk.distillation_loss(s[:, :-1], t[:, :-1], 2.0).item()


def test_recover_lowers_the_loss_and_keeps_the_zero_pattern():
    teacher = tiny_model("llama")
    with torch.no_grad():  # a random model's logits are near uniform; sharpen them so KL means something
        teacher.lm_head.weight.mul_(20.0)
    student = copy.deepcopy(teacher)
    ids = calib_ids(8, 16)
    pk.prune(student, pk.Magnitude(0.6), ids, progress=False)
    zeros = {n: m.weight.detach() == 0 for n, m in student.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n}
    frozen = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    before = eval_loss(student, teacher, ids)

    losses = pk.recover(student, teacher, ids, steps=12, lr=1e-3, batch_size=4, progress=False)

    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    after = eval_loss(student, teacher, ids)
    assert after < 0.3 * before
    for name, z in zeros.items():
        assert torch.equal(student.get_submodule(name).weight.detach() == 0, z), name
    assert not student.training and not teacher.training  # modes restored
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())  # teacher untouched
    assert any(not torch.equal(p, frozen[n]) for n, p in student.named_parameters())  # the student trained


def test_recover_with_labels_runs_and_needs_a_pruned_student():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="zero weights"):
        pk.recover(student, teacher, calib_ids(2, 8), steps=1, progress=False)
    pk.prune(student, pk.Magnitude("2:4"), calib_ids(2, 8), progress=False)
    batches = [{"input_ids": calib_ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    losses = pk.recover(student, teacher, batches, steps=2, lr=1e-3, alpha=0.5, progress=False)
    assert len(losses) == 2
    w = student.model.layers[0].mlp.up_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_recover_gives_back_each_submodules_mode_and_refuses_a_sparsified_student():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    pk.prune(student, pk.Magnitude("2:4"), calib_ids(2, 8), progress=False)
    packed = copy.deepcopy(student)
    teacher.train()
    teacher.model.layers[0].eval()
    student.model.layers[1].train()
    pk.recover(student, teacher, calib_ids(2, 8), steps=1, progress=False)
    assert teacher.training and not teacher.model.layers[0].training and teacher.model.layers[1].training
    assert not student.training and student.model.layers[1].training and not student.model.layers[0].training
    pk.sparsify(packed)
    with pytest.raises(ValueError, match="before prunekit.sparsify"):
        pk.recover(packed, teacher, calib_ids(2, 8), steps=1, progress=False)

"""structured_importance: each criterion's choice of kept groups against a plain reference computed
from the dense model (l2 over the group's weights, Taylor from the LM loss gradients, mean |activation|),
and the caller's gradients and training flags are left untouched."""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit as pk
from prunekit import calibrate

from pipeline_models import calib_ids
from structured_models import model_of, slices, top

tf = pytest.importorskip("transformers")


def l2_reference(block, spec, count):
    scores = []
    for g in range(count):
        total = 0.0
        for path, dim, size in spec:
            w = calibrate.layer_weight(block.get_submodule(path)).detach().double()
            part = w[g * size:(g + 1) * size] if dim == "out" else w[:, g * size:(g + 1) * size]
            total += float((part ** 2).sum())
        scores.append(total ** 0.5)
    return scores


def test_l2_selection_matches_plain_reference():
    dense = model_of("llama_mha", seed=5)
    report = pk.prune_structured(copy.deepcopy(dense), heads=0.25, mlp=0.5, importance="l2")
    spec = slices("llama_mha", dense)
    for block, kept in zip(dense.model.layers, report.kept):
        assert kept["heads"] == top(l2_reference(block, spec["heads"], 4), 3)
        assert kept["mlp"] == top(l2_reference(block, spec["mlp"], 96), 48)


def test_taylor_selection_matches_reference_gradients():
    dense = model_of("llama", seed=2)
    calib = calib_ids(4, 12)
    report = pk.prune_structured(copy.deepcopy(dense), heads=0.5, mlp=0.25, importance="taylor",
                                 calibration=calib, batch_size=2)
    ref = copy.deepcopy(dense)
    for ids in calib.split(2):
        ref(input_ids=ids, labels=ids).loss.backward()
    spec = slices("llama", dense)
    for block, kept in zip(ref.model.layers, report.kept):
        for name, count, keep in (("heads", 2, 1), ("mlp", 128, 96)):
            scores = []
            for g in range(count):
                total = 0.0
                for path, dim, size in spec[name]:
                    p = block.get_submodule(path).weight
                    wg = (p.detach() * p.grad).abs()
                    total += float(wg[g * size:(g + 1) * size].sum() if dim == "out"
                                   else wg[:, g * size:(g + 1) * size].sum())
                scores.append(total)
            assert kept[name] == top(scores, keep)
    assert all(p.grad is None for p in dense.parameters())


def test_activation_selection_matches_reference():
    dense = model_of("opt", seed=1)
    calib = calib_ids(3, 12)
    report = pk.prune_structured(copy.deepcopy(dense), mlp=0.5, importance="activation", calibration=calib)
    for block, kept in zip(dense.model.decoder.layers, report.kept):
        seen = []
        handle = block.fc2.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 128)))
        with torch.no_grad():
            dense(input_ids=calib)
        handle.remove()
        scores = torch.cat(seen).abs().mean(0).tolist()
        assert kept["mlp"] == top(scores, 64)


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_importance_keeps_the_callers_gradients_and_submodule_modes(importance):
    model = model_of("llama", seed=2).train()
    model.model.layers[1].eval()
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.25)
        grads[name] = p.grad
    pk.prune_structured(model, mlp=0.25, importance=importance, calibration=calib_ids(2, 12))
    assert model.training and model.model.layers[0].training
    assert not model.model.layers[1].training and not model.model.layers[1].mlp.training
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.shape == grads[name].shape:  # shrunk layers get new parameters
            assert p.grad is grads[name] and bool((p.grad == 0.25).all()), name
    assert model.model.embed_tokens.weight.grad is grads["model.embed_tokens.weight"]


def test_taylor_needs_an_lm_head():
    with pytest.raises(ValueError, match="no LM head"):
        pk.prune_structured(model_of("bert"), mlp=0.25, importance="taylor", calibration=calib_ids(2, 8))

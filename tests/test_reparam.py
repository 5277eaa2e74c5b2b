"""Models carrying torch.nn.utils.prune's reparametrization (weight_orig * weight_mask, rebuilt by a hook)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune as torch_prune

import prunekit as pk
from prunekit import eval as pk_eval

from pipeline_models import calib_ids, tiny_model


def torch_pruned_llama(amount=0.3):
    model = tiny_model("llama")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            torch_prune.l1_unstructured(module, "weight", amount=amount)
    return model


def zeros(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


def test_prune_folds_torch_masks_and_the_result_survives_a_forward():
    model = torch_pruned_llama()
    q = model.model.layers[0].self_attn.q_proj
    torch_zeros = q.weight == 0
    with pytest.warns(UserWarning, match="folded torch.nn.utils.prune"):
        report = pk.prune(model, pk.Magnitude(0.5), calib_ids(2, 8), progress=False)
    model(calib_ids(1, 8))  # the hook (if any were left) would rebuild .weight here
    assert not hasattr(q, "weight_orig") and isinstance(q.weight, nn.Parameter)
    assert zeros(q.weight) == pytest.approx(0.5) and report.sparsity == pytest.approx(0.5)
    assert (q.weight == 0)[torch_zeros].all()  # torch's zeros stay zero
    assert pk_eval.sparsity(model).total == pytest.approx(0.5)


def test_two_four_survives_the_next_forward():
    model = torch_pruned_llama()
    with pytest.warns(UserWarning, match="folded"):
        pk.prune(model, pk.Wanda("2:4"), calib_ids(2, 8), progress=False)
    model(calib_ids(1, 8))
    w = model.model.layers[1].mlp.up_proj.weight
    assert (w.ne(0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_prune_structured_on_a_torch_pruned_model():
    model = torch_pruned_llama()
    ids = calib_ids(1, 8)
    with pytest.warns(UserWarning, match="folded"):
        pk.prune_structured(model, mlp=0.25)
    assert model(ids).logits.isfinite().all()  # the stale weight_mask no longer breaks the forward
    assert model.model.layers[0].mlp.up_proj.weight.shape[0] == model.config.intermediate_size


def test_a_parametrized_weight_is_refused_before_any_change():
    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    model = tiny_model("llama")
    layer = model.model.layers[1].mlp.down_proj
    parametrize.register_parametrization(layer, "weight", Scale())
    first = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight is a torch\.nn\.utils\.parametrize"):
        pk.prune(model, pk.Magnitude(0.5), calib_ids(2, 8), progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, first)


def test_sparsify_packs_the_effective_weight_of_a_torch_pruned_layer():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    mask = torch.zeros(8, 16)
    mask.view(8, 4, 4)[:, :, :2] = 1  # 2:4 through torch's mask, the stored weight_orig is dense
    torch_prune.custom_from_mask(layer, "weight", mask)
    model = nn.Sequential(layer)
    x = torch.randn(3, 16)
    expected = model(x)
    report = pk.sparsify(model)
    assert report.swapped == ["0"]
    torch.testing.assert_close(model(x), expected)

    other = nn.Sequential(nn.Linear(16, 8))
    parametrize.register_parametrization(other[0], "weight", nn.Identity())
    assert "parametrize" in pk.sparsify(other).skipped["0"]

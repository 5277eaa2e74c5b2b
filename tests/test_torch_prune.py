"""prunekit.torch_prune: prunekit's criteria as torch.nn.utils.prune methods, prunekit's masks as torch's
reparametrization; the masks equal prunekit's API on small models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import prune

import prunekit as pk
from prunekit import torch_prune as tp

transformers = pytest.importorskip("transformers")


def tiny_llama(layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def calib():
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sparsity, scope", [(0.5, "layer"), (0.3, "row"), ("2:4", "row")])
def test_magnitude_per_layer_is_pk_magnitude(sparsity, scope):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    pk.prune(reference, pk.Magnitude(sparsity, scope=scope), None, progress=False)
    for name, layer in linears(model).items():
        tp.Magnitude.apply(layer, "weight", sparsity=sparsity, scope=scope)
        assert prune.is_pruned(layer) and hasattr(layer, "weight_orig")
        expected = reference.get_submodule(name).weight
        assert torch.equal(layer.weight_mask.bool(), expected != 0), name
        assert torch.equal(layer.weight, expected), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # the forward pre-hook reparametrization computes the same model
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_global_unstructured_is_pk_global_magnitude():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    pk.prune(reference, pk.Magnitude(0.6, scope="global"), None, progress=False)
    params = [(m, "weight") for m in linears(model).values()]
    prune.global_unstructured(params, pruning_method=tp.Magnitude, sparsity=0.6)
    for name, layer in linears(model).items():
        assert torch.equal(layer.weight, reference.get_submodule(name).weight), name
    with pytest.raises(TypeError, match="unstructured"):  # a per-row / N:M method is not global
        prune.global_unstructured(params, pruning_method=tp.NM, n=2, m=4)


def test_nm_on_gpt2_conv1d_layout_and_remove():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_head=4, n_layer=1, vocab_size=96,
                                                                 n_positions=32)).eval()
    reference = copy.deepcopy(model)
    pk.prune(reference, pk.Magnitude("2:4"), None, progress=False)
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [in, out]
    tp.NM.apply(layer, "weight", n=2, m=4)
    prune.remove(layer, "weight")
    assert not prune.is_pruned(layer)
    assert torch.equal(layer.weight, reference.transformer.h[0].mlp.c_fc.weight)


def test_pruning_again_keeps_what_was_pruned():
    layer = torch.nn.Linear(16, 8)
    tp.Magnitude.apply(layer, "weight", sparsity=0.25, scope="row")
    first = layer.weight_mask.clone()
    tp.Magnitude.apply(layer, "weight", sparsity=0.5, scope="row")  # a PruningContainer now
    assert bool((layer.weight_mask <= first).all()) and int(layer.weight_mask.sum()) == 8 * 8


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_wanda_and_sparsegpt_with_their_statistics_are_pk_prune(method):
    model = tiny_llama(layers=1)  # one block: one-shot statistics are prunekit.prune's
    reference = copy.deepcopy(model)
    pk_method = pk.Wanda("2:4") if method == "wanda" else pk.SparseGPT(0.5)
    pk.prune(reference, pk_method, calib(), progress=False)
    stats = tp.layer_stats(model, calib(), method)
    for name, layer in linears(model).items():
        if method == "wanda":
            tp.Wanda.apply(layer, "weight", sparsity="2:4", act_norm_sq=stats[name].act_norm_sq)
        else:
            original = layer.weight.detach().clone()
            tp.SparseGPT.apply(layer, "weight", sparsity=0.5, hessian=stats[name].hessian)
            pruned = layer.weight_mask == 0
            assert torch.equal(layer.weight_orig[pruned], original[pruned])  # torch keeps the pruned values
        expected = reference.get_submodule(name).weight
        assert torch.equal(layer.weight_mask.bool(), expected != 0), name
        assert torch.equal(layer.weight, expected), name  # SparseGPT: the reconstructed kept weights too
        prune.remove(layer, "weight")
        assert torch.equal(layer.weight, expected), name


def test_prunekit_result_as_torch_reparametrization():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    report = pk.prune(model, pk.Magnitude("2:4"), None, progress=False)
    names = tp.apply_masks(dense, pk.Masks.from_model(model, report=report))
    assert names == [layer.name for layer in report.layers]
    for name in names:
        layer = dense.get_submodule(name)
        assert prune.is_pruned(layer) and torch.equal(layer.weight, model.get_submodule(name).weight)
    assert tp.apply_masks(copy.deepcopy(model), report) == names  # a report gives the same layers
    with pytest.raises(TypeError, match="Wanda needs act_norm_sq"):
        tp.Wanda.apply(torch.nn.Linear(8, 4), "weight", sparsity=0.5)

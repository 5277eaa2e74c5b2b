"""Per-layer sparsity allocation: OWL against a plain re-computation of the reference, dict rules, errors."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

import prunekit as pk
from prunekit import calibrate
from prunekit.pruning.allocation import LayerSparsity, block_outlier_ratio, owl_sparsities

from pipeline_models import VOCAB, calib_ids, tiny_model

tf = pytest.importorskip("transformers")


@functools.lru_cache(maxsize=None)
def _llama(n_blocks: int):
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_blocks,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                            max_position_embeddings=64, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # blocks with different numbers of outlier weights
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, : 2 * i] *= 8.0
            layer.self_attn.q_proj.weight[: i + 1] *= 6.0
    return model


def llama(n_blocks: int = 4):
    """A fresh copy of one cached model (building a transformers model is the slow part)."""
    return copy.deepcopy(_llama(n_blocks))


def reference_owl(model, ids: torch.Tensor, batch_size: int, threshold: float, lam: float, target: float):
    """The OWL reference's arithmetic written out plainly: Wanda scaler_row from forwards of the dense
    model, per block the share of |W|·sqrt(scaler_row) above threshold × the block's mean (in percent,
    as the reference), then its numpy normalisation."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}

    def accumulate(name):
        def hook(module, args):
            sums[name].add_(args[0].double().pow(2).sum(dim=(0, 1)))
        return hook

    handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in layers.items()]
    with torch.no_grad():
        for chunk in ids.split(batch_size):
            model(input_ids=chunk)
    for h in handles:
        h.remove()
    ratios = []
    for i in range(len(model.model.layers)):
        metrics = [(m.weight.detach().double().abs() * (sums[n] / ids.shape[0]).sqrt()).flatten()
                   for n, m in layers.items() if n.startswith(f"model.layers.{i}.")]
        all_scores = torch.cat(metrics)
        ratios.append(float((all_scores > all_scores.mean() * threshold).sum()) / all_scores.numel() * 100)
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    density = r - np.mean(r) + (1 - target)
    return [x / 100 for x in ratios], list(1 - density), sum(m.weight.numel() for m in layers.values()) / len(ratios)


def test_owl_ratios_and_sparsities_match_the_reference_computation():
    model, ids = llama(), calib_ids(8, 16)
    ratios, sparsities, block_numel = reference_owl(model, ids, 4, 5.0, 0.08, 0.5)
    owl = pk.OWL()
    pk.prune(model, pk.Wanda(0.5), ids, progress=False, batch_size=4, allocation=owl)

    assert sorted(owl.outlier_ratios) == [0, 1, 2, 3]
    for i, expected in enumerate(ratios):
        assert owl.outlier_ratios[i] == pytest.approx(expected, abs=1.5 / block_numel)
    assert len(set(ratios)) == 4  # the check is not vacuous: the blocks differ
    for i, expected in enumerate(sparsities):
        assert owl.block_sparsity[i] == pytest.approx(expected, abs=1e-9)
    values = list(owl.block_sparsity.values())
    assert np.mean(values) == pytest.approx(0.5, abs=1e-12)
    assert max(values) - min(values) == pytest.approx(2 * 0.08)
    # more outliers, fewer pruned weights
    order = sorted(range(4), key=lambda i: owl.outlier_ratios[i])
    assert [owl.block_sparsity[i] for i in order] == sorted(values, reverse=True)


def test_each_layer_is_pruned_to_its_allocated_sparsity():
    model = llama()
    owl = pk.OWL(threshold=4.0, lam=0.1)
    report = pk.prune(model, pk.Wanda(0.6), calib_ids(8, 16), progress=False, batch_size=4, allocation=owl)
    assert len(report.layers) == 4 * 7 and set(owl.layer_sparsity) == {r.name for r in report.layers}
    for row in report.layers:
        s = owl.layer_sparsity[row.name]
        block = int(row.name.split(".")[2])
        assert s == owl.block_sparsity[block]
        weight = model.get_submodule(row.name).weight
        assert ((weight == 0).sum(1) == int(weight.shape[1] * s)).all()  # Wanda prunes per row
        assert row.pattern == f"{s:g}"
    assert np.mean(list(owl.block_sparsity.values())) == pytest.approx(0.6, abs=1e-12)
    assert report.sparsity == pytest.approx(0.6, abs=1 / 64)


def test_owl_with_sparsegpt_uses_the_allocated_fraction():
    model = llama(n_blocks=2)
    owl = pk.OWL()
    report = pk.prune(model, pk.SparseGPT(0.5), calib_ids(4, 16), progress=False, batch_size=2, allocation=owl)
    for row in report.layers:
        assert row.sparsity == pytest.approx(owl.layer_sparsity[row.name], abs=1 / 64)
    assert {round(s, 6) for s in owl.block_sparsity.values()} == {0.42, 0.58}


def test_owl_sparsities_formula():
    assert owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.08) == pytest.approx([0.58, 0.5, 0.42])
    assert owl_sparsities([0.2, 0.2], 0.7, 0.08) == [0.7, 0.7]       # equal ratios: no information
    s = owl_sparsities([0.0, 0.1, 0.7, 0.3], 0.4, 0.05)
    assert np.mean(s) == pytest.approx(0.4) and max(s) - min(s) == pytest.approx(0.1)
    assert owl_sparsities([0.0, 1.0], 0.05, 0.08)[1] == 0.0          # clamped into [0, 1)


def test_block_outlier_ratio_counts_against_the_block_mean():
    a = torch.tensor([1.0, 1.0, 1.0, 10.0])
    b = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # mean of both: 19 / 12
    assert block_outlier_ratio(lambda: iter([a, b]), 5.0) == pytest.approx(1 / 12)
    assert block_outlier_ratio(lambda: iter([a]), 5.0) == 0.0      # 10 is not above 5 × 13/4


def test_dict_allocation_by_glob_first_match_wins():
    model = tiny_model("llama")
    rules = {"*.layers.0.mlp.*": 0.75, "*.mlp.*": 0.25, "model.layers.1.self_attn.q_proj": 0.125}
    report = pk.prune(model, pk.Magnitude(0.5), calib_ids(4, 16), progress=False, allocation=rules)
    expected = {}
    for row in report.layers:
        if ".layers.0.mlp." in row.name:
            expected[row.name] = 0.75
        elif ".mlp." in row.name:
            expected[row.name] = 0.25
        elif row.name == "model.layers.1.self_attn.q_proj":
            expected[row.name] = 0.125
        else:
            expected[row.name] = 0.5
    for row in report.layers:
        weight = model.get_submodule(row.name).weight
        assert int((weight == 0).sum()) == int(weight.numel() * expected[row.name]), row.name
        assert row.pattern == f"{expected[row.name]:g}"


def test_regex_rules_and_percent_values():
    rules = LayerSparsity({r"re:model\.layers\.\d+\.mlp\.down_proj": "60%"})
    model = tiny_model("llama")
    pk.prune(model, pk.Wanda(0.5), calib_ids(4, 16), progress=False, allocation=rules)
    w = model.model.layers[1].mlp.down_proj.weight
    assert ((w == 0).sum(1) == int(w.shape[1] * 0.6)).all()
    assert rules.layer_sparsity["model.layers.0.mlp.down_proj"] == 0.6
    assert rules.layer_sparsity["model.layers.0.mlp.up_proj"] == 0.5


def test_with_pattern_copies_the_method():
    method = pk.Magnitude(0.5, scope="row")
    other = method.with_pattern("70%")
    assert other is not method and type(other) is pk.Magnitude
    assert method.pattern.sparsity == 0.5 and other.pattern.sparsity == 0.7 and other.scope == "row"


@pytest.mark.parametrize("method,allocation,error", [
    (pk.Wanda("2:4"), pk.OWL(), "N:M"),
    (pk.Wanda("2:4"), {"*": 0.5}, "N:M"),
    (pk.Magnitude(0.5, scope="global"), pk.OWL(), "global"),
    (pk.Wanda(0.5), {"*.nothing.*": 0.5}, "matches none"),
])
def test_invalid_combinations_fail_before_any_change(method, allocation, error):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=error):
        pk.prune(model, method, calib_ids(4, 16), progress=False, allocation=allocation)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "2:4", "abc"])
def test_rule_sparsities_outside_0_1_are_rejected(value):
    with pytest.raises((ValueError, TypeError)):
        LayerSparsity({"*": value})


def test_bad_arguments():
    with pytest.raises(ValueError):
        pk.OWL(lam=1.0)
    with pytest.raises(ValueError):
        pk.OWL(threshold=0)
    with pytest.raises(ValueError):
        LayerSparsity({})
    with pytest.raises(TypeError, match="allocation"):
        pk.prune(tiny_model("llama"), pk.Wanda(0.5), calib_ids(4, 16), progress=False, allocation=[0.5])


def test_model_without_blocks_gets_the_target():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    owl = pk.OWL()
    calib = [{"input": torch.randn(4, 8)} for _ in range(2)]
    pk.prune(model, pk.Wanda(0.5), calib, progress=False, allocation=owl)
    assert owl.layer_sparsity == {"0": 0.5, "2": 0.5}
    assert calibrate.layer_weight(model[0]).eq(0).sum(1).eq(4).all()


@functools.lru_cache(maxsize=None)
def _opt(n_blocks: int):
    torch.manual_seed(0)
    config = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=n_blocks, word_embed_proj_dim=64,
                          num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    model = tf.OPTForCausalLM(config).eval()
    with torch.no_grad():  # blocks with different numbers of outlier weights
        for i, layer in enumerate(model.model.decoder.layers):
            layer.fc2.weight[:, : 2 * i] *= 8.0
    return model


def test_owl_allocation_does_not_depend_on_the_batch_size():
    """OPT's fc1/fc2 see the batch flattened to [batch·seq, features]: they must count as many samples
    as the 3-D layers of the block, whatever the batch size."""
    ids = calib_ids(8, 16)
    results = []
    for batch_size in (1, 2, 8):
        owl = pk.OWL()
        pk.prune(copy.deepcopy(_opt(4)), pk.Wanda(0.5), ids, progress=False, batch_size=batch_size, allocation=owl)
        results.append(owl)
    for owl in results[1:]:
        for i in range(4):
            assert owl.outlier_ratios[i] == pytest.approx(results[0].outlier_ratios[i], rel=1e-9, abs=1e-12)
            assert owl.block_sparsity[i] == pytest.approx(results[0].block_sparsity[i], abs=1e-9)
    assert len(set(results[0].block_sparsity.values())) == 4


def test_owl_clamping_is_a_warning_the_api_user_sees():
    model = llama(n_blocks=2)
    with pytest.warns(UserWarning, match="clamped") as caught:
        report = pk.prune(model, pk.Wanda(0.9), calib_ids(4, 16), progress=False, allocation=pk.OWL(lam=0.3))
    assert any("below the target 0.9000" in str(w.message) for w in caught)
    assert any("below the target 0.9000" in w for w in report.warnings)
    assert report.sparsity < 0.89

"""prunekit.prune refuses, before changing anything, what it cannot prune correctly (prunekit/preflight.py)."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk

from pipeline_models import VOCAB, calib_ids, tiny_model

pytest.importorskip("transformers")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    after = model.state_dict()
    return all(torch.equal(after[k], v, ) if not v.is_floating_point() or not v.isnan().any()
               else torch.equal(after[k].isnan(), v.isnan()) for k, v in before.items())


def encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def encoder_batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [{"src": torch.randn(2, 8, 32, generator=g)} for _ in range(n)]


@pytest.mark.parametrize("method", [pk.SparseGPT(0.5), pk.Wanda(0.5)], ids=repr)
def test_multihead_attention_out_proj_is_refused_before_anything_changes(method):
    model = encoder()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"never called by their parent module \(MultiheadAttention\).*out_proj"):
        pk.prune(model, method, encoder_batches(), progress=False)
    assert unchanged(model, before)
    # without out_proj every other layer is called (the fused fast path is off while calibrating)
    report = pk.prune(model, method, encoder_batches(), exclude="*.out_proj", progress=False)
    assert [r.name for r in report.layers] == [f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    for row in report.layers:
        assert row.sparsity == pytest.approx(0.5, abs=0.02) and row.error > 0
    assert torch.equal(model.layers[0].self_attn.out_proj.weight, before["layers.0.self_attn.out_proj.weight"])


def test_magnitude_needs_no_input_and_prunes_out_proj():
    model = encoder()
    report = pk.prune(model, pk.Magnitude(0.5), encoder_batches(), progress=False)
    assert "layers.0.self_attn.out_proj" in [r.name for r in report.layers]
    assert float((model.layers[0].self_attn.out_proj.weight == 0).float().mean()) == 0.5


@pytest.mark.parametrize("method", [pk.SparseGPT(0.5), pk.Wanda("2:4")], ids=repr)
def test_a_nan_weight_in_the_last_block_is_reported_before_block_0_is_pruned(method):
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: contains 1 NaN"):
        pk.prune(model, method, calib_ids(4, 16), progress=False)
    assert unchanged(model, before)


def test_nan_activations_under_sparsegpt_name_the_calibration_activations():
    model = tiny_model("llama")
    model.model.layers[0].post_attention_layernorm.weight.data[0] = float("nan")  # not a pruned layer
    with pytest.raises(ValueError, match="NaN/Inf in the calibration activations"):
        pk.prune(model, pk.SparseGPT(0.5), calib_ids(4, 16), progress=False)


def llama(intermediate=96, tie=False):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, tie_word_embeddings=tie)
    return tf.LlamaForCausalLM(config).eval()


def test_joint_quantization_checks_the_group_size_on_every_layer_first():
    model = llama(intermediate=96)  # groupsize 64 divides the 64-wide layers but not down_proj's 96
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"down_proj\.weight: quantization groupsize 64 does not divide"):
        pk.prune(model, pk.SparseGPT(0.5, quant=pk.QuantSpec(4, 64)), calib_ids(2, 16), progress=False)
    assert unchanged(model, before)


def test_a_tied_lm_head_is_refused():
    model = llama(intermediate=64, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to model\.embed_tokens\.weight"):
        pk.prune(model, pk.Wanda(0.5), calib_ids(2, 16), include=["model.layers.*", "lm_head"], progress=False)
    assert unchanged(model, before)


class WithEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.out_empty = nn.Linear(16, 0)   # no output features
        self.in_empty = nn.Linear(0, 4)     # no input features

    def forward(self, x):
        return self.a(x).sum() + self.out_empty(x).sum() + self.in_empty(self.out_empty(x)).sum()


@pytest.mark.parametrize("method", [pk.Magnitude(0.5), pk.Wanda(0.5), pk.SparseGPT(0.5)], ids=repr)
def test_empty_layers_are_skipped_with_a_warning(method):
    torch.manual_seed(0)
    model = WithEmpty()
    batches = [{"x": torch.randn(2, 5, 16)} for _ in range(2)]
    with pytest.warns(UserWarning, match=r"skipped empty layer\(s\) out_empty \[0, 16\], in_empty \[4, 0\]"):
        report = pk.prune(model, method, batches, progress=False)
    assert [r.name for r in report.layers] == ["a"]
    assert report.sparsity == pytest.approx(0.5) and math.isfinite(report.sparsity)
    assert {s["name"] for s in report.skipped} == {"out_empty", "in_empty"}
    json.dumps(report.to_dict(), allow_nan=False)
    only_empty = WithEmpty()
    with pytest.raises(ValueError, match="every selected layer is empty"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune(only_empty, method, batches, include="*empty", progress=False)


def test_mixtral_fused_experts_are_listed_as_not_pruned():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=64)
    model = tf.MixtralForCausalLM(config).eval()
    fused = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert fused, "this transformers version stores Mixtral experts as nn.Linear; nothing to check"
    before = {n: p.detach().clone() for n, p in fused.items()}
    with pytest.warns(UserWarning, match=r"not linear layers and stay dense .*experts"):
        report = pk.prune(model, pk.Wanda(0.5), calib_ids(2, 16), progress=False)
    skipped = {s["name"]: s for s in report.skipped}
    for name in fused:
        assert name in skipped and "fused per-expert weights" in skipped[name]["reason"]
        assert torch.equal(dict(model.named_parameters())[name], before[name])
    assert "not pruned: model.layers.0.mlp.experts" in str(report)
    assert [s["name"] for s in pk.PruneReport.from_dict(report.to_dict()).skipped] == list(skipped)

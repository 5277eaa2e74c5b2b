"""structured_plan: rounding to whole groups (reported and warned), round_to, argument checks, head
counts the config rejects, and per-block fractions."""
from __future__ import annotations

import pytest
import torch

import prunekit as pk
from prunekit.pruning import structured_plan as plans

from pipeline_models import VOCAB, tiny_model
from structured_models import model_of

tf = pytest.importorskip("transformers")


def test_round_to_and_zero_ratios():
    model = model_of("llama")
    report = pk.prune_structured(model, mlp=0.4, round_to=32)  # 76.8 kept -> 64
    assert report.mlp == (128, 64) and report.heads is None
    same = model_of("llama")
    before = {k: v.clone() for k, v in same.state_dict().items()}
    report = pk.prune_structured(same, heads=0.0, mlp=0.0)
    assert report.kept == [] and all(torch.equal(v, same.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kwargs,match", [
    (dict(mlp=1.0), "mlp: expected a fraction"),
    (dict(heads=-0.1), "heads: expected a fraction"),
    (dict(heads=0.9), "remove every attention head"),
    (dict(mlp=0.5, importance="hessian"), "importance"),
    (dict(mlp=0.5, importance="taylor"), "needs calibration"),
    (dict(mlp=0.5, round_to=0), "round_to"),
    (dict(mlp=0.5, round_to=256), "round_to"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.prune_structured(model_of("llama"), **kwargs)


def test_config_rejected_head_counts_are_checked_before_any_change():
    mha64 = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"rejects 3 attention heads.*accepts: 0.5, 0.75$"):
        pk.prune_structured(mha64, heads=0.25)
    assert mha64.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_rounding_is_reported_and_warned():
    model = tiny_model("llama")  # 2 key/value groups: heads=0.25 can only remove one of them (0.5)
    with pytest.warns(UserWarning, match=r"heads=0.25 of 2 key/value head groups rounds to removing 1 \(0.5 instead of 0.25\)"):
        report = pk.prune_structured(model, heads=0.25, mlp=0.25)
    assert report.removed == {"heads": (0.25, 0.5), "mlp": (0.25, 0.25)}
    assert len(report.notes) == 1 and "note: heads=0.25" in str(report)
    assert model.config.num_key_value_heads == 1




def test_block_ratios_and_per_block_notes():
    assert plans.block_ratios(0.25, "mlp", 3) == [0.25] * 3
    assert plans.block_ratios([0.1, 0, "0.5"], "mlp", 3) == [0.1, 0.0, 0.5]
    with pytest.raises(ValueError, match=r"mlp: expected one fraction per block \(2\), got 3"):
        plans.block_ratios([0.1, 0.2, 0.3], "mlp", 2)
    with pytest.raises(ValueError, match=r"mlp\[1\]: expected a fraction"):
        plans.block_ratios([0.1, 1.5], "mlp", 2)
    model = model_of("gemma3n")
    with pytest.warns(UserWarning, match=r"block 1: mlp=0.3 of 96 MLP channels \(kept width a multiple of "
                                         r"round_to=16\) rounds to removing 32 \(0.333 instead of 0.3\); block 3: "
                                         r"mlp=0.1 of 64 .* rounds to removing 0 \(0 instead of 0.1\)$"):
        report = pk.prune_structured(model, mlp=[0.5, 0.3, 0.5, 0.1], round_to=16)
    assert len(report.notes) == 2 and report.mlp == ([128, 96, 128, 64], [64, 64, 64, 64])

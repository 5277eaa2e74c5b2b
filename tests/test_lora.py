"""prunekit.recover_lora: loss goes down, the merged model keeps the sparsity pattern exactly, the
dropped share of the delta equals a direct computation from the adapters, reload after merge."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import prunekit as pk
from prunekit import calibrate
from prunekit.train import lora as lora_mod

from pipeline_models import MAX_POS, VOCAB, calib_ids, expected_layers, tiny_model

tf = pytest.importorskip("transformers")
pytest.importorskip("peft")


def zeros_of(model, kind):
    names = expected_layers(kind) if kind in ("llama", "gpt2", "opt", "bert") else list(calibrate.select_layers(
        model, block_path="model.layers"))
    return {n: calibrate.layer_weight(model.get_submodule(n)) == 0 for n in names}


def model_of(kind: str, seed: int):
    if kind not in ("mistral", "qwen2"):
        return tiny_model(kind, seed)
    torch.manual_seed(seed)
    cls, conf = (tf.MistralForCausalLM, tf.MistralConfig) if kind == "mistral" else (tf.Qwen2ForCausalLM, tf.Qwen2Config)
    return cls(conf(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=MAX_POS, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2", "opt"])
def test_loss_goes_down_and_masks_stay_exact(kind):
    dense = model_of(kind, seed=1)
    for m in dense.modules():  # tiny GPT-2 and OPT train with dropout 0.1: too noisy over 8 steps
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = copy.deepcopy(dense)
    pk.prune(model, pk.Magnitude(0.5), calib_ids(2, 8), progress=False)
    before = zeros_of(model, kind)
    report = pk.recover_lora(model, dense, calib_ids(2, 16), steps=8, lr=3e-3, r=4, batch_size=2,
                             progress=False)  # one batch, so the loss is comparable across steps
    assert report.model is model and report.merged and report.trainable > 0
    assert max(report.losses[-3:]) < 0.8 * report.losses[0]
    after = zeros_of(model, kind)
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert 0 < report.delta_dropped < 1 and all(p.requires_grad for p in model.parameters())


def test_delta_dropped_and_merge_match_direct_computation():
    dense = tiny_model("llama", seed=2)
    model = copy.deepcopy(dense)
    pk.prune(model, pk.Magnitude(0.5), calib_ids(2, 8), progress=False)
    report = pk.recover_lora(model, None, calib_ids(4, 16), steps=4, lr=1e-2, r=4, merge=False, progress=False)
    peft_model = report.model
    lost = total = 0.0
    expected = {}
    for name, layer in lora_mod.lora_layers(peft_model).items():
        a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
        delta = layer.scaling["default"] * b @ a
        w = layer.base_layer.weight.double()
        lost += float((delta * (w == 0)).square().sum())
        total += float(delta.square().sum())
        expected[name.removeprefix("base_model.model.")] = (w + delta) * (w != 0)
    assert report.delta_dropped == pytest.approx(math.sqrt(lost / total), rel=1e-6)
    merged = lora_mod.merge_masked(peft_model)
    for name, want in expected.items():
        got = merged.get_submodule(name).weight
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got == 0, want == 0), name


def test_structured_then_lora_merges_whole_and_reloads(tmp_path):
    dense = tiny_model("llama", seed=3)
    model = copy.deepcopy(dense)
    pk.prune_structured(model, heads=0.5, mlp=0.5)
    ids = calib_ids(4, 16)
    report = pk.recover_lora(model, dense, ids[:2], steps=8, lr=3e-3, r=4, batch_size=2, alpha=0.5,
                             progress=False)
    assert report.delta_dropped == 0.0 and max(report.losses[-3:]) < report.losses[0]
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_encoder_embedding_distillation():
    dense = tiny_model("bert", seed=4)
    model = copy.deepcopy(dense)
    pk.prune(model, pk.Magnitude(0.5), calib_ids(2, 8), progress=False)
    before = zeros_of(model, "bert")
    ids = calib_ids(4, 12)
    model.config.hidden_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    report = pk.recover_lora(model, dense, ids[:2], steps=8, lr=3e-3, r=4, batch_size=2, progress=False)
    assert max(report.losses[-3:]) < 0.8 * report.losses[0]
    assert all(torch.equal(zeros_of(model, "bert")[n], before[n]) for n in before)
    with pytest.raises(ValueError, match="needs a teacher"):
        pk.recover_lora(copy.deepcopy(dense), None, ids, steps=1, progress=False)


def test_errors():
    with pytest.raises(ValueError, match="steps"):
        pk.recover_lora(tiny_model("llama"), None, calib_ids(2, 8), steps=0)
    with pytest.raises(ValueError, match="no linear layer matched"):
        pk.recover_lora(tiny_model("llama"), None, calib_ids(2, 8), steps=1, include="nothing.*", progress=False)


def test_prune_refuses_a_peft_model_and_changes_nothing():
    import peft

    model = tiny_model("llama", seed=5)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    for method, calib in ((pk.Wanda(0.5), calib_ids(2, 8)), (pk.Magnitude(0.5), None)):
        with pytest.raises(ValueError, match=r"q_proj\.base_layer .*peft LoRA adapters.*merge_and_unload"):
            pk.prune(peft_model, method, calib, progress=False)
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in before.items())
    # layers without adapters can still be chosen explicitly
    pk.prune(peft_model, pk.Magnitude(0.5), None, include="*.mlp.*", progress=False)
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    merged = peft_model.merge_and_unload()
    pk.prune(merged, pk.Magnitude(0.5), None, progress=False)
    assert (merged.model.layers[0].self_attn.q_proj.weight == 0).float().mean() == 0.5


@pytest.mark.parametrize("merge", [True, False])
def test_submodules_get_their_training_flags_back(merge):
    dense = tiny_model("llama", seed=6)
    model = copy.deepcopy(dense).train()
    model.model.layers[1].eval()
    dense.train()
    dense.model.layers[0].eval()
    report = pk.recover_lora(model, dense, calib_ids(2, 8), steps=2, r=2, merge=merge, progress=False)
    assert model.training and model.model.layers[0].training
    assert not model.model.layers[1].training and not model.model.layers[1].mlp.training
    assert dense.training and not dense.model.layers[0].training and dense.model.layers[1].training
    assert report.model is (model if merge else report.model)

"""Block inputs captured for calibration (prunekit/calibrate.py): no live KV cache however the model is
wrapped, and per-block arguments for models that mix layer types."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import calibrate

from pipeline_models import VOCAB, calib_ids, tiny_model

tf = pytest.importorskip("transformers")


class PeftStyleWrapper(nn.Module):
    """The PEFT pattern: forward(input_ids, attention_mask=None, **kwargs), no use_cache in the signature."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def weights(model, prefix=""):
    return {k.removeprefix(prefix): v.detach().clone() for k, v in model.state_dict().items()}


def test_no_cache_is_captured_through_a_wrapper():
    model = PeftStyleWrapper(tiny_model("llama"))
    inputs = calibrate.capture_block_inputs(model, model.model.model.layers, [{"input_ids": calib_ids(2, 8)}],
                                            torch.device("cpu"))
    for value in inputs[0].kwargs.values():
        assert not type(value).__name__.endswith("Cache")
    assert model.model.config.use_cache  # the config is given back as it was


@pytest.mark.parametrize("method", [pk.Wanda(0.5), pk.SparseGPT(0.5)], ids=repr)
def test_pruning_through_a_wrapper_equals_pruning_the_model(method):
    direct = tiny_model("llama")
    wrapped = PeftStyleWrapper(copy.deepcopy(direct))
    calib = calib_ids(4, 16)
    pk.prune(direct, method, calib, progress=False, batch_size=2)
    pk.prune(wrapped, method, calib, progress=False, batch_size=2)
    want, got = weights(direct), weights(wrapped, "model.")
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_pruning_a_peft_lora_model_equals_pruning_the_model():
    peft = pytest.importorskip("peft")
    direct = tiny_model("llama")
    lora = peft.get_peft_model(copy.deepcopy(direct), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.eval()
    calib = calib_ids(4, 16)
    # every layer but the adapted ones (the adapters' zero-initialised B keeps the LoRA model equal to the base)
    include = ["*.mlp.*_proj", "*.self_attn.k_proj", "*.self_attn.o_proj"]
    pk.prune(direct, pk.SparseGPT(0.5), calib, include=include, progress=False, batch_size=2)
    pk.prune(lora, pk.SparseGPT(0.5), calib, include=include, progress=False, batch_size=2)
    got = weights(lora.base_model.model)
    for key, value in weights(direct).items():
        if ".mlp." in key or "k_proj" in key or "o_proj" in key:
            assert torch.equal(got[key], value), key


def gemma3(layers=4):
    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=64, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    return tf.Gemma3ForCausalLM(config).eval()


def test_block_driven_forward_equals_the_models_own_forward_for_gemma3():
    model = gemma3()
    ids = calib_ids(2, 16)
    real = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: real.__setitem__(i, out if isinstance(out, torch.Tensor)
                                                                            else out[0]))
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    assert calibrate.layer_types(model) == ["full_attention", "sliding_attention"]
    with torch.no_grad():
        [inp] = calibrate.capture_block_inputs(model, model.model.layers, [{"input_ids": ids}], torch.device("cpu"))
        for i, block in enumerate(model.model.layers):
            inp.hidden = inp.call(block, i)
            torch.testing.assert_close(inp.hidden, real[i], rtol=1e-5, atol=1e-5, msg=f"block {i}")


def test_gemma3_full_attention_block_is_calibrated_on_its_own_mask():
    """Block 1 (full attention) pruned by the pipeline, from dense inputs, equals Wanda on statistics
    hooked from the model's own forward."""
    model = gemma3(layers=2)
    reference = copy.deepcopy(model)
    calib = calib_ids(2, 16)
    pk.prune(model, pk.Wanda(0.5), calib, include="model.layers.1.*", progress=False)
    layers = {n: m for n, m in reference.named_modules() if n.startswith("model.layers.1.") and isinstance(m, nn.Linear)}
    stats = {n: pk.LayerStats(m.in_features, act_norm=True, name=n) for n, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: stats[n].add_batch(a[0])) for n, m in layers.items()]
    with torch.no_grad():
        for row in calib:
            reference(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    got = dict(model.named_modules())
    for name, module in layers.items():
        want = pk.Wanda(0.5).prune_layer(module.weight.detach().clone(), stats[name], name).weight
        assert torch.equal(got[name].weight, want), name


def test_layer_types_read_a_multimodal_models_text_config():
    config = tf.Gemma3Config(text_config=dict(layer_types=["sliding_attention", "full_attention"],
                                              num_hidden_layers=2))
    holder = nn.Module()
    holder.config = config
    assert calibrate.layer_types(holder) == ["full_attention", "sliding_attention"]

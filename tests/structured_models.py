"""Tiny random-weight Hugging Face models and the reference masking shared by the structured-pruning tests."""
from __future__ import annotations

import copy

import torch

from prunekit import calibrate

from pipeline_models import MAX_POS, VOCAB, tiny_model


def model_of(kind: str, seed: int = 0, **gemma3n):
    """pipeline_models' tiny models, plus a multi-head Llama (hidden 48: 3 heads still divide it), a
    Qwen2 (GQA with q/k/v biases), a Mistral and a Gemma3n (per-layer MLP widths; keyword arguments
    override its config)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "mistral":
        config = tf.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                  tie_word_embeddings=False)
        return tf.MistralForCausalLM(config).eval()
    if kind == "gemma3n":
        fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=[128, 96, 128, 64], num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size_per_layer_input=VOCAB,
                      hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4, altup_num_inputs=2,
                      activation_sparsity_pattern=[0.0] * 4, max_position_embeddings=MAX_POS,
                      layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8)
        fields.update(gemma3n)
        return tf.Gemma3nForCausalLM(tf.Gemma3nTextConfig(**fields)).eval()
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
    if kind in ("llama", "llama_mha", "qwen2", "mistral", "gemma3n"):
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


def top(scores, keep: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])

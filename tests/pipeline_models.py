"""Tiny random-weight Hugging Face models (no download) shared by the pipeline, eval and CLI tests."""
from __future__ import annotations

import torch

VOCAB = 128
MAX_POS = 64


def tiny_model(kind: str, seed: int = 0):
    """A 2-block model with hidden size 64 built from a transformers config, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_attention_heads=4)
    if kind == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                tie_word_embeddings=False, **common)
        model = tf.LlamaForCausalLM(config)
    elif kind == "opt":
        config = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64,
                              max_position_embeddings=MAX_POS, **common)
        model = tf.OPTForCausalLM(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=MAX_POS,
                               bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(config)
    elif kind == "bert":
        config = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               max_position_embeddings=MAX_POS, **common)
        model = tf.BertModel(config)
    else:
        raise ValueError(kind)
    return model.eval()


def calib_ids(n: int = 8, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


BLOCK_LAYERS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"],
}
BLOCK_PATH = {"llama": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h",
              "bert": "encoder.layer"}


def expected_layers(kind: str) -> list[str]:
    return [f"{BLOCK_PATH[kind]}.{i}.{name}" for i in range(2) for name in BLOCK_LAYERS[kind]]

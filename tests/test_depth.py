"""prunekit.prune_depth: block importance against direct computations, removal equals skipping the
blocks in the dense model, config fields cut, bit-exact reload and generate (Llama, Mistral, Qwen2 with
layer_types, OPT, GPT-2; BERT without generation)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import prunekit as pk

from pipeline_models import MAX_POS, VOCAB, calib_ids

tf = pytest.importorskip("transformers")


def model_of(kind: str, seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                          num_attention_heads=4, max_position_embeddings=MAX_POS)).eval()
    if kind in ("llama", "qwen2", "mistral"):
        cls, conf = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
                     "mistral": (tf.MistralForCausalLM, tf.MistralConfig)}[kind]
        extra = {} if kind != "qwen2" else dict(layer_types=["full_attention", "sliding_attention"] * (layers // 2),
                                                  use_sliding_window=True, sliding_window=8, max_window_layers=0)
        config = conf(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                      tie_word_embeddings=False, **extra)
        return cls(config).eval()
    if kind == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                                              num_attention_heads=4, word_embed_proj_dim=32,
                                              max_position_embeddings=MAX_POS)).eval()
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB,
                                            n_positions=MAX_POS, bos_token_id=0, eos_token_id=0)).eval()


def blocks_of(model):
    if hasattr(model, "encoder"):
        return model.encoder.layer
    return model.transformer.h if hasattr(model, "transformer") else (
        model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers)


def out(model, ids):
    result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def skipping(dense, removed):
    """The dense model with the removed blocks' outputs replaced by their inputs."""
    def skip(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        return x if isinstance(output, torch.Tensor) else (x,) + tuple(output[1:])
    return [blocks_of(dense)[i].register_forward_hook(skip, with_kwargs=True) for i in removed]


def test_angular_scores_match_hidden_states():
    model = model_of("llama")
    calib = calib_ids(3, 10)
    report = pk.prune_depth(copy.deepcopy(model), calib, n_blocks=1, importance="angular")
    hs = []
    with torch.no_grad():
        for ids in calib.split(1):
            hs.append(model(input_ids=ids, output_hidden_states=True).hidden_states)
    for i in range(3):  # the last hidden state has the final norm applied; blocks 0..2 are direct
        angles = torch.cat([(torch.arccos(torch.nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1)
                                          .clamp(-1, 1)) / math.pi).flatten() for h in hs])
        assert report.scores[i] == pytest.approx(float(angles.mean()), rel=1e-5)
    assert report.removed == [min(range(4), key=lambda i: (report.scores[i], -i))]


def test_loss_scores_match_skipping():
    model = model_of("opt", seed=1)
    calib = calib_ids(2, 10)
    report = pk.prune_depth(copy.deepcopy(model), calib, n_blocks=2, importance="loss")
    with torch.no_grad():
        base = sum(float(model(input_ids=ids, labels=ids).loss) for ids in calib.split(1))
        for i in range(4):
            handles = skipping(model, [i])
            loss = sum(float(model(input_ids=ids, labels=ids).loss) for ids in calib.split(1))
            for h in handles:
                h.remove()
            assert report.scores[i] == pytest.approx(loss - base, rel=1e-5, abs=1e-6)
    assert report.removed == sorted(sorted(range(4), key=lambda i: (report.scores[i], -i))[:2])


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "opt", "gpt2", "bert"])
def test_removed_blocks_equal_skipping_reload_and_generate(tmp_path, kind):
    dense = model_of(kind)
    model = copy.deepcopy(dense)
    report = pk.prune_depth(model, calib_ids(2, 10), ratio=0.5, importance="angular")
    assert report.n_blocks == (4, 2) and len(report.removed) == 2 and model.config.num_hidden_layers == 2
    assert len(blocks_of(model)) == 2 and report.params[1] < report.params[0]
    if kind == "qwen2":
        kept = [i for i in range(4) if i not in report.removed]
        assert model.config.layer_types == [dense.config.layer_types[i] for i in kept]
    ids = calib_ids(2, 12, seed=5)
    handles = skipping(dense, report.removed)
    with torch.no_grad():
        torch.testing.assert_close(out(model, ids), out(dense, ids))
    for h in handles:
        h.remove()
    model.save_pretrained(tmp_path)
    reloaded = (tf.AutoModel if kind == "bert" else tf.AutoModelForCausalLM).from_pretrained(tmp_path).eval()
    want, got = model.state_dict(), reloaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(out(reloaded, ids), out(model, ids))
    if kind == "bert":
        return
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 16)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), gen)
    # the KV cache path agrees with a full forward over the generated sequence
    with torch.no_grad():
        assert torch.equal(model(input_ids=gen[:, :-1]).logits[:, -1].argmax(-1), gen[:, -1])


def test_explicit_removal_and_errors():
    model = model_of("llama")
    report = pk.prune_depth(model, remove=[3, 1])
    assert report.removed == [1, 3] and [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    with pytest.raises(ValueError, match="exactly one"):
        pk.prune_depth(model_of("llama"), calib_ids(2, 8), n_blocks=1, ratio=0.5)
    with pytest.raises(ValueError, match="needs calibration"):
        pk.prune_depth(model_of("llama"), n_blocks=1)
    with pytest.raises(ValueError, match="leave none"):
        pk.prune_depth(model_of("llama"), remove=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"remove: block indices"):
        pk.prune_depth(model_of("llama"), remove=[4])
    with pytest.raises(ValueError, match="importance"):
        pk.prune_depth(model_of("llama"), calib_ids(2, 8), n_blocks=1, importance="l2")
    gpt2 = model_of("gpt2")
    gpt2.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="layer_idx"):
        pk.prune_depth(gpt2, remove=[1])


@pytest.mark.parametrize("importance", ["angular", "loss"])
def test_submodules_get_their_training_flags_back(importance):
    model = model_of("llama").train()
    blocks = list(model.model.layers)
    blocks[2].eval()
    pk.prune_depth(model, calib_ids(2, 8), n_blocks=1, importance=importance)
    assert model.training and model.lm_head.training
    assert not any(m.training for m in blocks[2].modules())
    assert all(m.training for i in (0, 1, 3) for m in blocks[i].modules())

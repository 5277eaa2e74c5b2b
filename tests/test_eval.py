"""prunekit.eval: perplexity as the references compute it, sparsity, embedding fidelity."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import eval as pk_eval

from pipeline_models import VOCAB, calib_ids, tiny_model

pytest.importorskip("transformers")


def reference_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """Wanda/SparseGPT's eval_ppl, written out: mean loss per window times seqlen, summed."""
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[i * seqlen:(i + 1) * seqlen][None]
            logits = model(batch).logits
            loss = nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def test_perplexity_matches_the_reference_loop():
    model = tiny_model("llama")
    ids = calib_ids(1, 200, seed=4).reshape(-1)  # 200 tokens: 6 windows of 32, the tail dropped
    got = pk_eval.perplexity(model, ids, seq_len=32, batch_size=4)
    assert got == pytest.approx(reference_perplexity(model, ids, 32), rel=1e-5)


class Uniform(nn.Module):
    """A language model that predicts every token with probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Linear(1, 1)

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        return type("Out", (), {"logits": logits})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    assert pk_eval.perplexity(Uniform(37), torch.arange(100) % 37, seq_len=10) == pytest.approx(37, rel=1e-6)


def test_perplexity_errors():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="no window"):
        pk_eval.perplexity(model, torch.arange(10), seq_len=32)
    with pytest.raises(ValueError, match="longer than the model supports"):
        pk_eval.perplexity(model, torch.arange(1000) % VOCAB, seq_len=128)
    with pytest.raises(TypeError, match="integer token ids"):
        pk_eval.perplexity(model, torch.randn(100), seq_len=10)


def test_perplexity_of_a_pruned_model_is_finite_and_different():
    model = tiny_model("opt")
    ids = calib_ids(1, 256, seed=9).reshape(-1)
    dense = pk_eval.perplexity(model, ids, seq_len=32)
    pk.prune(model, pk.Wanda(0.5), calib_ids(), progress=False)
    pruned = pk_eval.perplexity(model, ids, seq_len=32)
    assert math.isfinite(pruned) and pruned != dense


def test_sparsity_per_layer_and_total():
    model = tiny_model("llama")
    before = pk_eval.sparsity(model)
    assert before.total == 0 and "lm_head" not in before.layers and len(before.layers) == 14
    pk.prune(model, pk.Magnitude("2:4"), calib_ids(), include="model.layers.0.*", progress=False)
    after = pk_eval.sparsity(model)
    assert all(after.layers[n] == 0.5 for n in after.layers if n.startswith("model.layers.0."))
    assert all(after.layers[n] == 0.0 for n in after.layers if n.startswith("model.layers.1."))
    assert after.total == pytest.approx(0.25)
    assert "total" in str(after)
    assert pk_eval.sparsity(model, include="model.layers.0.*").total == pytest.approx(0.5)


def sentence_batches(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n // 4):
        ids = torch.randint(0, VOCAB, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[1, 6:] = 0  # padding must not count in the mean pooling
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_embedding_fidelity():
    dense = tiny_model("bert")
    same = pk_eval.embedding_fidelity(dense, copy.deepcopy(dense), sentence_batches())
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6) and same["nn_agreement"] == 1.0
    assert same["sentences"] == 12
    pruned = copy.deepcopy(dense)
    pk.prune(pruned, pk.Magnitude(0.9), calib_ids(), progress=False)
    worse = pk_eval.embedding_fidelity(dense, pruned, sentence_batches())
    assert worse["cosine"] < same["cosine"] - 1e-4
    other = pk_eval.embedding_fidelity(dense, tiny_model("bert", seed=1), sentence_batches())
    assert other["cosine"] < worse["cosine"] and other["nn_agreement"] < 1.0


def test_mean_pooling_ignores_padding():
    model = tiny_model("bert")
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    short = pk_eval.embed(model, [{"input_ids": ids, "attention_mask": torch.ones(1, 6, dtype=torch.long)}])
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    padded = pk_eval.embed(model, [{"input_ids": padded_ids, "attention_mask": mask}])
    assert torch.allclose(short, padded, atol=1e-5)


def test_compare_embeddings_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        pk_eval.compare_embeddings(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        pk_eval.compare_embeddings(torch.ones(1, 4), torch.ones(1, 4))


def test_sparsity_counts_sparse_linear_and_skips_the_pooler():
    model = tiny_model("llama")
    pk.prune(model, pk.Magnitude("2:4"), calib_ids(), progress=False)
    assert pk_eval.sparsity(model).total == pytest.approx(0.5)
    report = pk.sparsify(model)
    assert report.swapped
    after = pk_eval.sparsity(model)
    assert len(after.layers) == 14 and after.total == pytest.approx(0.5)
    assert after.layers[report.swapped[0]] == pytest.approx(0.5)
    assert pk_eval.sparsity(model, include="model.layers.1.*").total == pytest.approx(0.5)

    bert = tiny_model("bert")
    pk.prune(bert, pk.Magnitude(0.5), calib_ids(), progress=False)
    measured = pk_eval.sparsity(bert)
    assert not any("pooler" in name for name in measured.layers)
    assert measured.total == pytest.approx(0.5)


def test_sparsity_counts_unstructured_sparse_linear():
    model = tiny_model("llama")
    pk.prune(model, pk.Magnitude(0.75), calib_ids(), progress=False)
    report = pk.sparsify(model, unstructured=True, min_sparsity=0.6)
    assert report.swapped
    assert pk_eval.sparsity(model).total == pytest.approx(0.75)


def test_perplexity_gives_back_each_submodules_mode():
    model = tiny_model("llama").train()
    model.model.layers[0].eval()
    pk.eval.perplexity(model, calib_ids(2, 16).reshape(-1), seq_len=16)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training

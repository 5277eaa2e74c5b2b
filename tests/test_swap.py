"""pk.sparsify on transformers models: GPT-2's Conv1D layers, and save_pretrained / from_pretrained."""
from __future__ import annotations

import pytest
import torch

import prunekit as pk
from prunekit import io as pio
from prunekit.nn.sparse_linear import SparseLinear

from pipeline_models import calib_ids, tiny_model

transformers = pytest.importorskip("transformers")


def sparse_model(kind):
    model = tiny_model(kind)
    pk.prune(model, pk.Magnitude("2:4"), calib_ids(2, 8), progress=False)
    expected = model(calib_ids(1, 8)).logits
    report = pk.sparsify(model)
    return model, report, expected


def test_gpt2_conv1d_layers_are_swapped():
    model, report, expected = sparse_model("gpt2")
    assert "transformer.h.0.attn.c_attn" in report.swapped and "transformer.h.1.mlp.c_proj" in report.swapped
    assert len(report.swapped) == 8 and isinstance(model.transformer.h[0].mlp.c_fc, SparseLinear)
    assert "tied" in report.skipped["lm_head"]
    torch.testing.assert_close(model(calib_ids(1, 8)).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_pretrained_after_sparsify_reloads_the_same_model(kind, tmp_path):
    model, _, expected = sparse_model(kind)
    with pytest.warns(UserWarning, match="written as dense"):
        model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(calib_ids(1, 8)).logits, expected, rtol=1e-5, atol=1e-5)
    assert pk.sparsify(again).swapped  # still exactly 2:4


def test_gpt2_round_trip_through_prunekit_save(tmp_path):
    model, _, expected = sparse_model("gpt2")
    pio.save(model, tmp_path)
    fresh = pio.load(tiny_model("gpt2", seed=1), tmp_path)
    torch.testing.assert_close(fresh(calib_ids(1, 8)).logits, expected, rtol=1e-5, atol=1e-5)

"""`prunekit prune --format prunekit|hf|sparse24|compressed-tensors`: what each output folder holds and
what loads it."""
from __future__ import annotations

import json
import os

import pytest
import torch

import prunekit as pk
from prunekit import cli
from prunekit.nn.sparse_linear import SparseLinear

transformers = pytest.importorskip("transformers")
from test_cli import prune_args, save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


def logits(model, ids=torch.tensor([[5, 17, 3, 99, 42, 7]])):
    with torch.no_grad():
        return model(ids).logits


def test_default_format_loads_dense_with_from_pretrained_and_packed_with_pk_load(checkpoint, tmp_path):
    out = tmp_path / "pruned"
    assert cli.main(prune_args(checkpoint, out)) == 0
    assert {"config.json", "model.safetensors", "report.json", "README.md", "sparse24"} <= set(os.listdir(out))
    dense = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = dense.model.layers[0].mlp.gate_proj.weight
    assert (w.ne(0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()

    packed = pk.load(out)
    assert isinstance(packed.model.layers[0].mlp.gate_proj, SparseLinear)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out)
    pk.sparsify(reference)
    torch.testing.assert_close(logits(packed), logits(reference), rtol=0, atol=0)
    torch.testing.assert_close(logits(packed), logits(dense), rtol=1e-5, atol=1e-5)

    card = (out / "README.md").read_text()
    assert "| Calibration | 4 windows x 32 tokens of english.txt (seed 0) |" in card
    assert "reconstruction error" in card and "`SparseGPT(2:4" in card


def test_hf_format_has_no_packed_copy_and_pk_load_packs_it(checkpoint, tmp_path):
    out = tmp_path / "pruned"
    assert cli.main(prune_args(checkpoint, out, "--format", "hf")) == 0
    assert "sparse24" not in os.listdir(out)
    assert isinstance(pk.load(out).model.layers[1].self_attn.o_proj, SparseLinear)


def test_compressed_tensors_format(checkpoint, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "pruned"
    assert cli.main(prune_args(checkpoint, out, "--format", "compressed-tensors", "--quant-bits", "4",
                               "--quant-groupsize", "32")) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert {"tokenizer.json", "report.json", "README.md"} <= set(os.listdir(out))
    card = (out / "README.md").read_text()
    assert "- compressed-tensors" in card and "dequantize=True" in card  # asymmetric: the known transformers gap

    assert cli.main(prune_args(checkpoint, tmp_path / "x", "--format", "compressed-tensors", "--quant-bits", "4",
                               "--recover-steps", "1")) == 1
    assert "trains them off that grid" in capsys.readouterr().err

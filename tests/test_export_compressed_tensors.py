"""prunekit.export.compressed_tensors: pruned and quantized models in the compressed-tensors format,
read back by the package's own decompressor and by transformers."""
from __future__ import annotations

import json

import pytest
import torch

import prunekit as pk
from prunekit.export.compressed_tensors import export_compressed_tensors
from prunekit.quant.rtn import quantize_layers_rtn

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.config import SparsityCompressionConfig  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

transformers.utils.logging.set_verbosity_error()


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def calib():
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def decompressed(folder, dtype):
    """The folder's weights through compressed-tensors' own model-free decompressor."""
    tensors = load_file(str(folder / "model.safetensors"))
    return CompressedTensorsDequantizer(folder, dtype=dtype).validate(tensors)


def logits(model, ids=torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])):
    with torch.no_grad():
        return model(ids).logits


def recorded_sparsity(folder):
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "compressed-tensors"
    sparsity = block["sparsity_config"]
    return SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)


@pytest.mark.parametrize("sparsity, structure", [("2:4", "2:4"), (0.5, "unstructured")])
def test_pruned_model_is_dense_with_zeros_and_records_its_structure(tmp_path, sparsity, structure):
    model = tiny_llama()
    report = pk.prune(model, pk.Magnitude(sparsity), None, progress=False)
    export_compressed_tensors(model, tmp_path, report)
    recorded = recorded_sparsity(tmp_path)
    assert recorded.format == "dense" and recorded.sparsity_structure == structure
    assert recorded.targets == sorted(layer.name for layer in report.layers)
    assert recorded.global_sparsity == pytest.approx(36864 / 86336)  # pruned zeros over all weights
    assert {"README.md", "report.json", "config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, w in linear_weights(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, w), name
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("bits, groupsize", [(4, 32), (8, -1)])
def test_symmetric_quantized_model_loads_exactly_with_from_pretrained(tmp_path, bits, groupsize):
    model = tiny_llama()
    report = pk.prune(model, pk.SparseGPT("2:4", quant=pk.QuantSpec(bits, groupsize, sym=True)), calib(),
                      progress=False)
    export_compressed_tensors(model, tmp_path, report)
    block = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert block["format"] == "pack-quantized" and block["sparsity_config"]["sparsity_structure"] == "2:4"
    (group,) = block["config_groups"].values()
    assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"]
    assert group["weights"]["strategy"] == ("channel" if groupsize == -1 else "group")
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    assert "model.layers.0.mlp.up_proj.weight" not in stored and "model.layers.0.mlp.up_proj.weight_zero_point" not in stored

    weights = linear_weights(model)
    dense = decompressed(tmp_path, torch.float32)
    for name in report.quant:
        assert torch.equal(dense[f"{name}.weight"], weights[name]), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)  # decompresses on first forward
    for name in report.quant:
        assert torch.equal(loaded.get_submodule(name).weight, weights[name]), name


def test_asymmetric_group_quantized_model_round_trips_exactly(tmp_path):
    model = tiny_llama()
    report = pk.prune(model, pk.SparseGPT("2:4", quant=pk.QuantSpec(4, 32)), calib(), progress=False)
    export_compressed_tensors(model, tmp_path, report)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.weight_zero_point"].dtype == torch.int32  # packed
    weights = linear_weights(model)
    dense = decompressed(tmp_path, torch.float32)
    for name in report.quant:
        assert torch.equal(dense[f"{name}.weight"], weights[name]), name
    # transformers' default route cannot load asymmetric pack-quantized weights (README); dequantize=True can
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_bfloat16_int8_weights_come_back_bit_exact(tmp_path):
    # bfloat16 rounds scale * (q - z) after quantization; the codes are recovered exactly anyway
    model = tiny_llama(torch.bfloat16)
    report = pk.prune(model, pk.SparseGPT("2:4", quant=pk.QuantSpec(8, 32)), calib(), progress=False)
    export_compressed_tensors(model, tmp_path, report)
    weights = linear_weights(model)
    dense = decompressed(tmp_path, torch.bfloat16)
    for name in report.quant:
        assert torch.equal(dense[f"{name}.weight"], weights[name]), name


def test_rtn_after_wanda_and_a_sparsified_model(tmp_path):
    model = tiny_llama()
    report = pk.prune(model, pk.Wanda(0.5), calib(), progress=False)
    pruned = linear_weights(model)
    params = quantize_layers_rtn(model, pk.QuantSpec(4, 16), report=report)
    quantized = linear_weights(model)
    for name in params:
        expected = pk.quantize_rtn(pruned[name], 4, 16)
        assert torch.equal(quantized[name], expected) and torch.equal(quantized[name] == 0, pruned[name] == 0)
    pk.sparsify(model, unstructured=True, min_sparsity=0.4)  # exported as its dense weights
    export_compressed_tensors(model, tmp_path, quant=params)
    assert recorded_sparsity(tmp_path).sparsity_structure == "unstructured"
    dense = decompressed(tmp_path, torch.float32)
    for name in params:
        assert torch.equal(dense[f"{name}.weight"], quantized[name]), name


def test_refusals(tmp_path):
    model = tiny_llama()
    report = pk.prune(model, pk.SparseGPT("2:4", quant=pk.QuantSpec(4, 32)), calib(), progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # off the grid, as after training
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: 1 weight\(s\) are not on the quantization grid"):
        export_compressed_tensors(model, tmp_path / "a", report)

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_head=4, n_layer=1, vocab_size=96,
                                                                n_positions=32)).eval()
    params = quantize_layers_rtn(gpt2, pk.QuantSpec(4, 32))
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn: a transformers Conv1D"):
        export_compressed_tensors(gpt2, tmp_path / "b", quant=params)
    with pytest.raises(TypeError, match="expected a transformers model"):
        export_compressed_tensors(torch.nn.Linear(4, 4), tmp_path / "c")


def test_pk_load_reads_an_exported_folder_as_sparse_linear(tmp_path):
    import warnings

    model = tiny_llama()
    report = pk.prune(model, pk.SparseGPT("2:4", quant=pk.QuantSpec(4, 32)), calib(), progress=False)
    export_compressed_tensors(model, tmp_path, report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: the folder's quantization_config is used, dequantize from ours
        loaded = pk.load(tmp_path)
    layer = loaded.model.layers[0].mlp.up_proj
    assert isinstance(layer, pk.SparseLinear)
    assert torch.equal(layer.weight, model.model.layers[0].mlp.up_proj.weight)

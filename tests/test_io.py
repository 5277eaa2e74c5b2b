import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import prunekit.io as pio
from prunekit.nn.sparse_linear import SparseLinear
from prunekit.nn.swap import sparsify
from prunekit.ref import selection


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.up = nn.Linear(16, 32, dtype=dtype)
        self.down = nn.Linear(32, 16, bias=False, dtype=dtype)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, stays dense

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h.to(self.up.weight.dtype)))).float()
        return self.head(self.norm(h))


def pruned_sparse_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Tiny(dtype)
    with torch.no_grad():
        for lin in (model.up, model.down):
            lin.weight.mul_(selection.nm_keep_mask(lin.weight.abs().float(), 2, 4))
    report = sparsify(model)
    assert report.swapped == ["up", "down"]
    return model.requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_into_dense_architecture(tmp_path, dtype):
    model = pruned_sparse_model(dtype)
    ids = torch.tensor([[1, 2, 3, 9]])
    expected = model(ids)
    path = pio.save(model, tmp_path / "out")
    assert path.name == "model.safetensors" and [p.name for p in path.parent.iterdir()] == ["model.safetensors"]

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["prunekit"])
        keys = set(f.keys())
    assert header["version"] == 1 and set(header["sparse_linear"]) == {"up", "down"}
    assert {"up.values", "up.meta", "up.bias", "down.values", "down.meta"} <= keys
    assert "up.weight" not in keys and header["aliases"] == {"head.weight": "embed.weight"}
    assert header["tensors"]["up.values"]["shape"] == [32, 8] and header["tensors"]["up.meta"]["dtype"] == "uint8"

    fresh = Tiny(dtype)  # dense, different random weights
    loaded = pio.load(fresh, tmp_path / "out")
    assert isinstance(loaded.up, SparseLinear) and isinstance(loaded.down, SparseLinear)
    assert loaded.up.values.dtype == dtype and loaded.head.weight is loaded.embed.weight
    torch.testing.assert_close(loaded(ids), expected, rtol=0, atol=0)


def test_load_into_already_sparse_model_and_overwrite(tmp_path):
    a, b = pruned_sparse_model(seed=0), pruned_sparse_model(seed=1)
    pio.save(b, tmp_path)
    pio.save(a, tmp_path)  # overwriting replaces the file atomically
    pio.load(b, tmp_path)
    assert torch.equal(b.up.values, a.up.values) and torch.equal(b.up.meta, a.up.meta)


def test_truncated_file_is_rejected(tmp_path):
    path = pio.save(pruned_sparse_model(), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        pio.load(Tiny(), tmp_path)


def test_flipped_tensor_bytes_are_rejected(tmp_path):
    path = pio.save(pruned_sparse_model(), tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch for tensor"):
        pio.load(Tiny(), tmp_path)


def test_mismatched_architecture_is_named(tmp_path):
    pio.save(pruned_sparse_model(), tmp_path)
    other = Tiny()
    other.up = nn.Linear(16, 24)
    with pytest.raises(ValueError, match=r"'up' is 32x16 in the file but 24x16 in the model"):
        pio.load(other, tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        pio.load(Tiny(), tmp_path)


def test_invalid_metadata_with_valid_checksum_is_rejected(tmp_path):
    model = pruned_sparse_model()
    model.up.meta[2, 1] = 0xA4  # undefined nibble 0xA written by someone else's tool; checksums still match
    pio.save(model, tmp_path)
    with pytest.raises(ValueError, match=r"up\.meta: invalid 2:4 metadata nibble 0xA at row 2, group 3"):
        pio.load(Tiny(), tmp_path)


def test_a_bfloat16_file_loads_into_a_float32_model_as_float32(tmp_path):
    model = pruned_sparse_model(torch.bfloat16)
    pio.save(model, tmp_path)
    fresh = pio.load(Tiny(torch.float32), tmp_path)
    dtypes = {t.dtype for t in fresh.state_dict().values() if t.is_floating_point()}
    assert dtypes == {torch.float32}  # not float32 with bfloat16 SparseLinear layers
    torch.testing.assert_close(fresh.up.weight, model.up.weight.float(), rtol=0, atol=0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh.up(x), nn.functional.linear(x, model.up.weight.float(), model.up.bias.float()))


def test_a_model_built_on_meta_is_materialized_from_the_file(tmp_path):
    model = pruned_sparse_model()
    ids = torch.tensor([[1, 2, 3, 9]])
    pio.save(model, tmp_path)
    with torch.device("meta"):
        empty = Tiny()
    loaded = pio.load(empty, tmp_path)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_meta_tensors_the_file_does_not_hold_are_refused(tmp_path):
    pio.save(pruned_sparse_model(), tmp_path)
    with torch.device("meta"):
        empty = Tiny()
        empty.register_buffer("table", torch.zeros(4), persistent=False)  # e.g. rotary inv_freq
    with pytest.raises(ValueError, match=r"meta device.*table"):
        pio.load(empty, tmp_path)
    assert isinstance(empty.up, nn.Linear)  # refused before anything changed
    partly = Tiny()
    partly.norm.to_empty(device="meta")
    with pytest.raises(ValueError, match="meta device"):
        pio.load(partly, tmp_path)


# ------------------------------------------------------------------ load(directory) alone
transformers = pytest.importorskip("transformers")


def tiny_hf(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=96, num_hidden_layers=2)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=True, **common)
        return transformers.LlamaForCausalLM(config)
    if kind == "gpt2":  # Conv1D layers, [in, out] weights
        config = transformers.GPT2Config(n_embd=64, n_head=4, n_positions=64, vocab_size=96, n_layer=2)
        return transformers.GPT2LMHeadModel(config)
    if kind == "opt":
        config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                                        max_position_embeddings=64, **common)
        return transformers.OPTForCausalLM(config)
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     max_position_embeddings=64, **common)
    return transformers.BertModel(config)


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_load_directory_alone_restores_outputs_bit_exactly(tmp_path, kind):
    import prunekit as pk

    model = tiny_hf(kind).eval()
    pk.prune(model, pk.Magnitude("2:4"), None, progress=False)
    report = pk.sparsify(model)
    assert report.swapped
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = outputs(model, ids)
    pk.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no config.json: see io.py

    loaded = pk.load(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)) == sorted(report.swapped)
    torch.testing.assert_close(outputs(loaded, ids), expected, rtol=0, atol=0)


def test_load_directory_keeps_the_file_dtype_and_tied_weights(tmp_path):
    import prunekit as pk

    model = tiny_hf("llama").to(torch.bfloat16).eval()
    pk.prune(model, pk.Magnitude("2:4"), None, progress=False)
    pk.sparsify(model)
    pk.save(model, tmp_path)
    loaded = pk.load(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(outputs(loaded, ids), outputs(model, ids), rtol=0, atol=0)


def test_load_directory_of_a_plain_module_or_nothing(tmp_path):
    pio.save(pruned_sparse_model(), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"not a transformers model.*prunekit.load\(model"):
        pio.load(tmp_path / "plain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a prunekit file"):
        pio.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        pio.load(tmp_path / "missing")
    with pytest.raises(TypeError, match=r"load\(directory\) or load\(model, directory\)"):
        pio.load(Tiny())


def test_load_directory_of_a_dense_checkpoint_with_or_without_the_packed_copy(tmp_path):
    import copy

    import prunekit as pk

    model = tiny_hf("llama").eval()
    pk.prune(model, pk.Magnitude("2:4"), None, progress=False)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    model.save_pretrained(tmp_path)  # what `prunekit prune --format hf` writes: dense, with the zeros
    reference = copy.deepcopy(model)
    pk.sparsify(reference)
    dense_loaded = pk.load(tmp_path)  # from_pretrained, then sparsify
    assert isinstance(dense_loaded.model.layers[1].self_attn.q_proj, SparseLinear)
    torch.testing.assert_close(outputs(dense_loaded, ids), outputs(reference, ids), rtol=0, atol=0)

    packed = copy.deepcopy(model)
    pk.sparsify(packed)
    with torch.no_grad():
        packed.model.layers[0].mlp.up_proj.values.mul_(2)  # tell the two copies apart
    pk.save(packed, tmp_path / "sparse24")  # `--format prunekit` adds this copy for 2:4
    loaded = pk.load(tmp_path)
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, packed.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(outputs(loaded, ids), outputs(packed, ids), rtol=0, atol=0)
    into = pk.load(tiny_hf("llama").eval(), tmp_path)  # the two-argument form finds sparse24/ too
    assert torch.equal(into.model.layers[0].mlp.up_proj.weight, packed.model.layers[0].mlp.up_proj.weight)


def test_save_with_the_report_writes_it_and_a_model_card(tmp_path):
    import prunekit as pk

    model = tiny_hf("llama").eval()
    report = pk.prune(model, pk.Magnitude("2:4"), None, progress=False)
    pk.sparsify(model)
    pk.save(model, tmp_path, report=report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "model.safetensors", "report.json"]
    assert pk.PruneReport.from_json(tmp_path / "report.json").pattern == "2:4"
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- sparsity-2:4" in card
    assert f"| prunekit | {pk.__version__} |" in card and "| Pattern | 2:4 |" in card
    assert "14 layers, 50.00% of their weights are zero" in card
    assert "| Calibration | none (weights only) |" in card and "| Measured quality | not measured" in card
    assert "| Whole model | 45.97% of all weights are zero" in card  # the 2:4 layers' zeros over all weights (embeddings included)
    assert "pk.load(" in card and "from_pretrained" not in card  # a packed file: prunekit loads it

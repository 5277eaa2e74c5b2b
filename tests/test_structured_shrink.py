"""structured_shrink: removing groups from nn.Linear and Conv1D layers equals indexing the weights and
biases directly, and the config (one width, or Gemma3n's per-layer list) records the new widths."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.pruning import structured_groups as groups
from prunekit.pruning import structured_shrink as shrinking

from structured_models import model_of

tf = pytest.importorskip("transformers")


class Block(nn.Module):
    def __init__(self, conv1d: bool):
        super().__init__()
        torch.manual_seed(0)
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.up, self.down = Conv1D(12, 5), Conv1D(5, 12)  # Conv1D(nf, nx): weight [nx, nf]
        else:
            self.up, self.down = nn.Linear(5, 12), nn.Linear(12, 5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_shrink_equals_indexing(conv1d):
    block = Block(conv1d)
    kind = groups.GroupKind("mlp", 4, (groups.Slice("up", "out", 3), groups.Slice("down", "in", 3)),
                            groups.Slice("down", "in", 3))
    up_w = block.up.weight.detach().clone()
    up_b, down_w, down_b = block.up.bias.detach().clone(), block.down.weight.detach().clone(), block.down.bias.detach().clone()
    kept = torch.tensor([0, 2])
    rows = torch.tensor([0, 1, 2, 6, 7, 8])
    shrinking.shrink(block, kind, kept)
    if conv1d:  # Conv1D stores [in, out]
        assert torch.equal(block.up.weight, up_w[:, rows]) and torch.equal(block.down.weight, down_w[rows])
        assert (block.up.nf, block.down.nx) == (6, 6)
    else:
        assert torch.equal(block.up.weight, up_w[rows]) and torch.equal(block.down.weight, down_w[:, rows])
        assert (block.up.out_features, block.down.in_features) == (6, 6)
    assert torch.equal(block.up.bias, up_b[rows]) and torch.equal(block.down.bias, down_b)  # output bias stays
    x = torch.randn(3, 5)
    assert block.down(block.up(x)).shape == (3, 5)


def test_update_config_one_width_and_per_layer_list():
    llama = model_of("llama")
    blocks = llama.model.layers
    fam = groups.detect_family(blocks[0])
    kinds = [groups.group_kinds(fam, llama.config, True, True, b) for b in blocks]
    changes = shrinking.update_config(blocks, fam, llama.config, kinds, {"heads": [1, 1], "mlp": [96, 96]})
    assert changes == {"heads": (4, 2), "kv_heads": (2, 1), "mlp": (128, 96)}
    c = llama.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 16, 96)
    gemma = model_of("gemma3n")
    blocks = gemma.model.layers
    kinds = [groups.group_kinds(fam, gemma.config, False, True, b) for b in blocks]
    changes = shrinking.update_config(blocks, fam, gemma.config, kinds, {"mlp": [64, 96, 32, 64]})
    assert changes == {"mlp": ([128, 96, 128, 64], [64, 96, 32, 64])}
    assert gemma.config.intermediate_size == [64, 96, 32, 64]
    assert [b.mlp.intermediate_size for b in blocks] == [64, 96, 32, 64]

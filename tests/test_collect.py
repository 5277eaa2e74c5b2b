"""Calibration statistics gathered with hooks while blocks run (prunekit/collect.py), through prunekit.prune."""
from __future__ import annotations

import torch
from torch import nn

import prunekit as pk
from prunekit.pruning.base import LayerResult, PruningMethod


class TwiceBlock(nn.Module):
    """Calls `shared` twice per forward (weight sharing inside a block)."""

    def __init__(self, width=8):
        super().__init__()
        self.shared = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        return x + self.out(torch.relu(self.shared(torch.tanh(self.shared(x)))))


class Stack(nn.Module):
    def __init__(self, n=2, width=8):
        super().__init__()
        self.blocks = nn.ModuleList(TwiceBlock(width) for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Recording(PruningMethod):
    """Keeps every layer dense and records the statistics it is given."""

    needs_act_norm = True
    needs_hessian = True

    def __init__(self):
        super().__init__(0.0)
        self.seen = {}

    def prune_layer(self, weight, stats, name="layer"):
        self.seen[name] = stats
        return LayerResult(weight.clone(), torch.ones_like(weight, dtype=torch.bool), self.pattern)


def test_a_layer_called_twice_per_forward_counts_every_call():
    torch.manual_seed(0)
    model = Stack()
    batches = [{"x": torch.randn(1, 5, 8)} for _ in range(3)]
    method = Recording()
    pk.prune(model, method, batches, progress=False)
    stats = method.seen["blocks.0.shared"]
    inputs = []
    hook = model.blocks[0].shared.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model.blocks[0](b["x"])
    hook.remove()
    assert stats.nsamples == 6 == len(inputs)
    x = torch.cat([i.reshape(-1, 8) for i in inputs]).double()
    torch.testing.assert_close(stats.act_norm_sq.double(), x.pow(2).sum(0) / 6, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.hessian.double(), 2 * x.t() @ x / 6, rtol=1e-5, atol=1e-6)
    assert method.seen["blocks.0.out"].nsamples == 3


def test_flattened_inputs_count_the_same_samples_as_3d_inputs():
    stats_3d = pk.LayerStats(4, act_norm=True)
    stats_2d = pk.LayerStats(4, act_norm=True)
    x = torch.randn(3, 5, 4)
    stats_3d.add_batch(x)
    stats_2d.add_batch(x.reshape(15, 4), tokens_per_sample=5)
    assert stats_2d.nsamples == stats_3d.nsamples == 3
    torch.testing.assert_close(stats_2d.act_norm_sq, stats_3d.act_norm_sq)
    one = pk.LayerStats(4, act_norm=True)
    one.add_batch(x[:, 0], tokens_per_sample=5)  # 3 rows, not whole sequences: one sample, as the references
    assert one.nsamples == 1

"""The three methods on one layer: with correlated, unevenly scaled inputs, the reconstruction error
||(W - W')Xᵀ||² orders SparseGPT < Wanda < magnitude (the foundation issue's quality check)."""
import pytest
import torch

import prunekit as pk


def _correlated_inputs(tokens, width, factors, gen):
    """Inputs driven by a few latent factors (correlated features) with per-feature scales spanning
    two orders of magnitude, shuffled so an N:M group mixes scales."""
    latent = torch.randn(tokens, factors, generator=gen)
    mixing = torch.randn(factors, width, generator=gen)
    scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=gen)]
    return (latent @ mixing + 0.1 * torch.randn(tokens, width, generator=gen)) * scales


def _error(W, W_pruned, X):
    return float(((W - W_pruned) @ X.t()).pow(2).sum())


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8"])
def test_sparsegpt_beats_wanda_beats_magnitude(pattern):
    gen = torch.Generator().manual_seed(0)
    out_features, in_features = 48, 128
    W = torch.randn(out_features, in_features, generator=gen)
    X = _correlated_inputs(512, in_features, 16, gen)
    errors = {}
    for method in (pk.Magnitude(pattern), pk.Wanda(pattern), pk.SparseGPT(pattern)):
        stats = method.new_stats(in_features, name="layer")
        if stats is not None:
            for batch in X.reshape(8, 64, in_features):
                stats.add_batch(batch.unsqueeze(0))
        result = method.prune_layer(W, stats, name="layer")
        assert result.mask.sum().item() == out_features * in_features // 2
        errors[method.name] = _error(W, result.weight, X)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors

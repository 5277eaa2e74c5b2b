"""Wanda: masks equal the loop transcription of locuslab/wanda's pruning step (prunekit/ref/wanda.py)."""
import pytest
import torch

import prunekit as pk
from prunekit.pruning.stats import LayerStats
from prunekit.ref import selection
from prunekit.ref.wanda import wanda_prune, wanda_prune_mask


def layer(gen, rows, width, dtype=torch.float32):
    W = torch.randn(rows, width, generator=gen).to(dtype)
    norms = torch.rand(width, generator=gen) * torch.logspace(-3, 3, width)
    return W, norms


@pytest.mark.parametrize("width", [37, 257, 512])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8])
def test_unstructured_matches_reference(gen, width, sparsity):
    W, norms = layer(gen, 45, width)
    keep = pk.wanda_mask(W, norms, sparsity)
    assert torch.equal(keep, ~wanda_prune_mask(W, norms, sparsity))
    assert torch.all((~keep).sum(1) == int(width * sparsity))


@pytest.mark.parametrize("n,m,width", [(2, 4, 256), (2, 4, 36), (4, 8, 64), (1, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nm_matches_reference(gen, n, m, width, dtype):
    W, norms = layer(gen, 33, width, dtype)
    keep = pk.wanda_mask(W, norms, f"{n}:{m}")
    assert torch.equal(keep, ~wanda_prune_mask(W, norms, 0.0, prune_n=m - n, prune_m=m))
    assert torch.all(keep.reshape(33, -1, m).sum(-1) == n)


def test_ties_prune_the_lower_index_first(gen):
    W = torch.randint(-2, 3, (8, 40), generator=gen).float()
    norms = torch.ones(40)
    assert torch.equal(pk.wanda_mask(W, norms, 0.5), selection.row_keep_mask(W.abs(), 0.5))
    assert torch.equal(pk.wanda_mask(W, norms, "2:4"), selection.nm_keep_mask(W.abs(), 2, 4))
    # the unstructured transcription sorts stably, so it agrees even with ties
    assert torch.equal(pk.wanda_mask(W, norms, 0.5), ~wanda_prune_mask(W, norms, 0.5))


def test_prune_layer_from_stats(gen):
    W, _ = layer(gen, 24, 64, torch.bfloat16)
    method = pk.Wanda(0.5)
    stats = method.new_stats(64, name="fc")
    for _ in range(3):
        stats.add_batch(torch.randn(2, 5, 64, generator=gen) * torch.linspace(0.1, 10, 64))
    result = method.prune_layer(W, stats, name="fc")
    assert result.weight.dtype == torch.bfloat16 and result.mask.dtype == torch.bool
    assert torch.equal(result.weight, wanda_prune(W, stats.act_norm_sq, 0.5))
    assert result.sparsity == pytest.approx(0.5)
    assert method.needs_act_norm and not method.needs_hessian


def test_prune_layer_needs_stats(gen):
    W, _ = layer(gen, 4, 8)
    with pytest.raises(ValueError, match="activation norms"):
        pk.Wanda(0.5).prune_layer(W, None, name="fc")
    with pytest.raises(ValueError, match="no calibration samples"):
        pk.Wanda(0.5).prune_layer(W, LayerStats(8, act_norm=True), name="fc")


def test_errors(gen):
    W, norms = layer(gen, 4, 12)
    with pytest.raises(TypeError, match="floating-point"):
        pk.wanda_mask(W.to(torch.int32), norms, 0.5)
    bad = W.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        pk.wanda_mask(bad, norms, 0.5)
    bad_norms = norms.clone()
    bad_norms[3] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        pk.wanda_mask(W, bad_norms, 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        pk.wanda_mask(W, norms - 10, 0.5)
    with pytest.raises(ValueError, match=r"expected shape \(12,\)"):
        pk.wanda_mask(W, norms[:-1], 0.5)
    with pytest.raises(ValueError, match="1-D"):
        pk.wanda_mask(W, norms[None], 0.5)
    with pytest.raises(ValueError, match="meta"):
        pk.wanda_mask(W, torch.empty(12, device="meta"), 0.5)
    with pytest.raises(ValueError, match="meta"):
        pk.wanda_mask(torch.empty(4, 12, device="meta"), norms, 0.5)
    with pytest.raises(ValueError, match="divisible by M=8"):
        pk.wanda_mask(W, norms, "2:8")
    with pytest.raises(ValueError, match="1 <= N < M"):
        pk.wanda_mask(W, norms, "4:4")
    for sparsity in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            pk.wanda_mask(W, norms, sparsity)


def test_wanda_beats_magnitude_when_feature_scales_differ(gen):
    # Inputs whose features span four orders of magnitude: |W| alone prunes the wrong weights.
    width = 128
    scales = torch.logspace(-2, 2, width)[torch.randperm(width, generator=gen)]  # mixed within N:M groups
    X = torch.randn(512, width, generator=gen) * scales
    W = torch.randn(64, width, generator=gen)
    stats = LayerStats(width, act_norm=True)
    stats.add_batch(X)

    def error(keep):
        return ((W - W * keep) @ X.T).pow(2).sum().item()

    for sparsity in (0.5, "2:4"):
        wanda_error = error(pk.wanda_mask(W, stats.act_norm_sq, sparsity))
        magnitude_error = error(pk.magnitude_mask(W, sparsity))
        assert wanda_error < 0.5 * magnitude_error


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.5, "2:4", "4:8"])
def test_cuda_matches_reference(gen, sparsity):
    W, norms = layer(gen, 256, 4096, torch.float16)
    pattern = pk.parse_pattern(sparsity)
    expected = ~wanda_prune_mask(W, norms, pattern.sparsity, pattern.m - pattern.n if pattern.m else 0, pattern.m)
    assert torch.equal(pk.wanda_mask(W.cuda(), norms.cuda(), sparsity).cpu(), expected)

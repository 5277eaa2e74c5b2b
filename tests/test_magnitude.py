"""Magnitude pruning: element, N:M, row/column structured and global scopes, exact counts and ties."""
import pytest
import torch

import prunekit as pk
from prunekit.pruning.magnitude import global_magnitude_masks
from prunekit.ref import magnitude as ref
from prunekit.ref import selection


def weights(gen, rows=24, width=40, dtype=torch.float32):
    return torch.randn(rows, width, generator=gen).to(dtype)


def nm_topk_loop(W, n, m):
    """locuslab/wanda `prune_magnitude` N:M branch (prune_n = m - n pruned per group), as a keep mask."""
    metric = W.abs()
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for ii in range(0, W.shape[1], m):
        tmp = metric[:, ii:ii + m].float()
        pruned.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return ~pruned


@pytest.mark.parametrize("score", ["l1", "l2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_element_layer_and_row_scopes(gen, score, sparsity):
    W = weights(gen, 17, 37)
    scores = ref.element_scores(W, score)
    layer_keep = pk.magnitude_mask(W, sparsity, score=score, scope="layer")
    assert torch.equal(layer_keep, selection.tensor_keep_mask(scores, sparsity))
    assert int((~layer_keep).sum()) == int(W.numel() * sparsity)
    row_keep = pk.magnitude_mask(W, sparsity, score=score, scope="row")
    assert torch.equal(row_keep, selection.row_keep_mask(scores, sparsity))
    assert torch.all((~row_keep).sum(1) == int(37 * sparsity))


@pytest.mark.parametrize("n,m,width", [(2, 4, 40), (1, 4, 64), (4, 8, 64)])
def test_nm_matches_the_reference_loop(gen, n, m, width):
    W = weights(gen, 19, width)  # float32: no ties, where topk's order is unspecified
    keep = pk.magnitude_mask(W, f"{n}:{m}")
    assert torch.equal(keep, nm_topk_loop(W, n, m))
    assert torch.all(keep.reshape(19, -1, m).sum(-1) == n)
    W16 = W.to(torch.bfloat16)  # ties within groups are common: the stable oracle decides
    assert torch.equal(pk.magnitude_mask(W16, f"{n}:{m}"), selection.nm_keep_mask(W16.abs().float(), n, m))


def test_ties_prune_the_lower_index_first(gen):
    W = torch.randint(-3, 4, (9, 48), generator=gen).float()
    scores = W.abs()
    assert torch.equal(pk.magnitude_mask(W, 0.5), selection.tensor_keep_mask(scores, 0.5))
    assert torch.equal(pk.magnitude_mask(W, 0.5, scope="row"), selection.row_keep_mask(scores, 0.5))
    assert torch.equal(pk.magnitude_mask(W, "2:4"), selection.nm_keep_mask(scores, 2, 4))


@pytest.mark.parametrize("granularity", ["row", "column"])
@pytest.mark.parametrize("group_score", ["l1", "l2", "mean_abs", "variance"])
def test_structured_rows_and_columns(gen, granularity, group_score):
    W = weights(gen, 20, 30) * torch.linspace(0.1, 3, 30)
    keep = pk.magnitude_mask(W, 0.4, granularity=granularity, group_score=group_score)
    group = ref.group_scores(W, granularity, group_score)
    kept_groups = selection.tensor_keep_mask(group, 0.4)
    if granularity == "row":
        assert torch.equal(keep, kept_groups[:, None].expand_as(W))
        assert int((~keep.all(1)).sum()) == int(20 * 0.4)
    else:
        assert torch.equal(keep, kept_groups[None, :].expand_as(W))
        assert int((~keep.all(0)).sum()) == int(30 * 0.4)


def test_group_score_values():
    W = torch.tensor([[1.0, -2.0, 2.0], [0.0, 3.0, -4.0]])
    assert torch.allclose(ref.group_scores(W, "row", "l1"), torch.tensor([5.0, 7.0]))
    assert torch.allclose(ref.group_scores(W, "row", "l2"), torch.tensor([3.0, 5.0]))
    assert torch.allclose(ref.group_scores(W, "column", "mean_abs"), torch.tensor([0.5, 2.5, 3.0]))
    assert torch.allclose(ref.group_scores(W, "column", "variance"), torch.tensor([0.25, 6.25, 9.0]))
    assert torch.allclose(ref.element_scores(W, "l2"), W * W)
    blocks = ref.block_scores(torch.arange(8.0).reshape(1, 8) - 3, 4, "l1")
    assert torch.allclose(blocks, torch.tensor([[3.0 + 2 + 1 + 0, 1.0 + 2 + 3 + 4]]))
    with pytest.raises(ValueError, match="divide"):
        ref.block_scores(W, 2)


def test_global_masks_rank_all_layers_together(gen):
    layers = {
        "a": torch.randint(-5, 6, (7, 13), generator=gen).float(),   # ties across layers
        "b": torch.randint(-5, 6, (4, 9), generator=gen).to(torch.float16),
        "c": torch.randn(3, 5, generator=gen),
        "d": torch.randn(6, 8, generator=gen) * 1e-30,                # tiny, all pruned first
    }
    for score in ("l1", "l2"):
        flat = torch.cat([ref.element_scores(w, score).float().reshape(-1) for w in layers.values()])
        for sparsity in (0.0, 0.1, 0.5, 0.77):
            masks = global_magnitude_masks(layers, sparsity, score=score)
            got = torch.cat([masks[k].reshape(-1) for k in layers])
            assert torch.equal(got, selection.tensor_keep_mask(flat, sparsity))
            assert all(masks[k].shape == w.shape and masks[k].dtype == torch.bool for k, w in layers.items())
    assert not global_magnitude_masks(layers, 0.5)["d"].any()


def test_prune_layer(gen):
    W = weights(gen, 8, 16, torch.float16)
    result = pk.Magnitude("2:4").prune_layer(W, None, name="fc")
    assert result.weight.dtype == torch.float16
    assert torch.equal(result.weight, W * result.mask)
    assert result.sparsity == pytest.approx(0.5)
    assert pk.Magnitude(0.5).new_stats(16) is None


def test_errors(gen):
    W = weights(gen, 4, 12)
    with pytest.raises(TypeError, match="floating-point"):
        pk.magnitude_mask(W.to(torch.int64), 0.5)
    bad = W.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        pk.magnitude_mask(bad, 0.5)
    with pytest.raises(ValueError, match="divisible by M=8"):
        pk.magnitude_mask(W, "2:8")
    with pytest.raises(ValueError, match="1 <= N < M"):
        pk.magnitude_mask(W, "5:4")
    for sparsity in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            pk.magnitude_mask(W, sparsity)
    with pytest.raises(ValueError, match="granularity"):
        pk.magnitude_mask(W, 0.5, granularity="block")
    with pytest.raises(ValueError, match="group_score"):
        pk.magnitude_mask(W, 0.5, granularity="row", group_score="max")
    with pytest.raises(ValueError, match="score"):
        pk.magnitude_mask(W, 0.5, score="l3")
    with pytest.raises(ValueError, match="N:M"):
        pk.magnitude_mask(W, "2:4", granularity="row")
    with pytest.raises(ValueError, match="global_magnitude_masks"):
        pk.Magnitude(0.5, scope="global").prune_layer(W, None)
    with pytest.raises(ValueError, match="granularity='element'"):
        pk.Magnitude("2:4", granularity="column")
    with pytest.raises(ValueError, match="N:M"):
        global_magnitude_masks({"w": W}, "2:4")


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_cuda_matches_cpu(gen, scope):
    W = torch.randint(-8, 9, (256, 1024), generator=gen).to(torch.bfloat16)
    for sparsity in (0.5, "2:4"):
        cpu = pk.magnitude_mask(W, sparsity, scope=scope)
        assert torch.equal(pk.magnitude_mask(W.cuda(), sparsity, scope=scope).cpu(), cpu)

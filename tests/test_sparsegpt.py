"""SparseGPT: the fast path against the transcription of the reference's fasterprune, the inverse-Hessian
factor against the reference route, recovery from bad Hessians, and input validation."""
import pytest
import torch

import prunekit as pk
from prunekit.pruning.sparsegpt import damped_hinv_factor, hinv_factor, sparsegpt_prune
from prunekit.pruning.stats import LayerStats
from prunekit.ref.selection import tensor_keep_mask
from prunekit.ref.sparsegpt import reference_fasterprune, reference_hinv


from layers import calib_inputs, hessian, layer  # tests/layers.py


def reference(W, H, spec, **kw):
    """reference_fasterprune with prunekit's pattern spec (N kept of M -> the reference's prunen pruned)."""
    if isinstance(spec, str) and ":" in spec:
        n, m = map(int, spec.split(":"))
        return reference_fasterprune(W, H, 0, prunen=m - n, prunem=m, **kw)
    return reference_fasterprune(W, H, spec, **kw)


def assert_matches_reference(result, ref):
    W_ref, keep_ref, losses_ref = ref
    assert torch.equal(result.mask, keep_ref)
    scale = W_ref.abs().max()
    torch.testing.assert_close(result.weight.float(), W_ref, rtol=1e-5, atol=1e-5 * scale)
    assert result.loss_estimate == pytest.approx(float(losses_ref.sum()), rel=1e-4)


CASES = [(64, 200, 0.5), (33, 257, 0.6), (7, 128, 0.25), (48, 256, "2:4"), (40, 264, "4:8"),
         (1, 300, "2:4")]


@pytest.mark.parametrize("rows,cols,spec", CASES)
def test_matches_reference_fasterprune(rows, cols, spec):
    W, H = layer(rows, cols, seed=rows)
    result = sparsegpt_prune(W, H, spec)
    assert_matches_reference(result, reference(W, H, spec))
    assert result.notes == [] and result.damping == 0.01


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_other_blocksize_and_damping(seed):
    W, H = layer(24, 100, seed=seed)
    result = sparsegpt_prune(W, H, 0.7, blocksize=32, percdamp=0.1)
    assert_matches_reference(result, reference(W, H, 0.7, blocksize=32, percdamp=0.1))


def test_sparsity_counts_are_exact_per_block():
    W, H = layer(33, 257)
    keep = sparsegpt_prune(W, H, 0.6).mask
    for i1 in range(0, 257, 128):
        block = keep[:, i1:i1 + 128]
        assert int((~block).sum()) == int(block.numel() * 0.6)


@pytest.mark.parametrize("spec,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_pattern_is_exact(spec, n, m):
    W, H = layer(16, 8 * 40)
    result = sparsegpt_prune(W, H, spec)
    groups = result.mask.reshape(16, -1, m)
    assert torch.equal(groups.sum(-1), torch.full(groups.shape[:2], n))
    assert torch.equal(result.weight[~result.mask], torch.zeros(int((~result.mask).sum())))
    assert result.sparsity == pytest.approx(1 - n / m)
    assert_matches_reference(sparsegpt_prune(W, H, 0, n=n, m=m), reference(W, H, spec))


def test_nm_block_is_a_multiple_of_m():
    # 128 is not a multiple of 6: we use 126-wide blocks, so groups never straddle a block; the
    # reference run with blocksize 126 is the same computation.
    W, H = layer(10, 6 * 45)
    result = sparsegpt_prune(W, H, "2:6")
    assert torch.equal(result.mask.reshape(10, 45, 6).sum(-1), torch.full((10, 45), 2))
    assert_matches_reference(result, reference(W, H, "2:6", blocksize=126))


def test_hinv_factor_equals_reference_route_float64():
    H = hessian(calib_inputs(300, seed=3)).double()
    H.diagonal().add_(0.01 * H.diagonal().mean())
    U = hinv_factor(H)
    torch.testing.assert_close(U, reference_hinv(H), rtol=1e-9, atol=1e-12)
    assert torch.equal(U, U.triu())
    # X.T @ X in float32 is symmetric only up to round-off; both routes read the lower triangle.
    H_lower = H.tril() + H.tril(-1).T
    assert float((U.T @ U @ H_lower - torch.eye(300, dtype=H.dtype)).abs().max()) < 1e-12


def test_dead_inputs_match_reference():
    X = calib_inputs(200, seed=1)
    X[:, [0, 17, 130, 199]] = 0
    W = torch.randn(40, 200, generator=torch.Generator().manual_seed(5))
    H = hessian(X)
    result = sparsegpt_prune(W, H, 0.5)
    assert_matches_reference(result, reference(W, H, 0.5))
    assert torch.equal(result.weight[:, [0, 17, 130, 199]], torch.zeros(40, 4))
    assert not result.mask[:, [0, 17, 130, 199]].any()  # zero weights score lowest
    assert any("4 dead input feature" in note for note in result.notes)


def test_all_inputs_dead_does_not_crash():
    W = torch.randn(5, 16)
    result = sparsegpt_prune(W, torch.zeros(16, 16), "2:4")
    assert torch.equal(result.weight, torch.zeros(5, 16))


def test_singular_hessian_recovers_with_escalated_damping():
    X = calib_inputs(64, seed=2)
    X[:, 10] = X[:, 3]  # duplicate features: H is exactly singular without damping
    X[:, 40] = X[:, 3]
    W, H = torch.randn(12, 64), hessian(X)
    result = sparsegpt_prune(W, H, 0.5, percdamp=0.0, name="mlp.up")
    assert result.damping > 0
    assert len(result.notes) == 1 and "mlp.up" in result.notes[0]
    assert bool(torch.isfinite(result.weight).all())
    assert int((~result.mask).sum()) == 12 * 64 // 2


def test_indefinite_hessian_recovers_with_escalated_damping():
    A = hessian(calib_inputs(96, samples=40, seed=4))  # rank 40 < 96
    H = A - 0.05 * A.diagonal().mean() * torch.eye(96)  # negative eigenvalues: not PSD
    W = torch.randn(8, 96)
    U, used, notes = damped_hinv_factor(H, 0.01, "attn.q")
    assert used >= 0.1 and notes and "attn.q" in notes[0]
    result = sparsegpt_prune(W, H, "2:4", name="attn.q")
    assert result.damping == used and bool(torch.isfinite(result.weight).all())


def test_hopeless_hessian_raises_naming_layer():
    with pytest.raises(RuntimeError, match="blocks.3.fc1"):
        sparsegpt_prune(torch.randn(4, 8), -torch.eye(8), 0.5, name="blocks.3.fc1")


@pytest.mark.parametrize("bad", ["W", "H"])
def test_nan_raises(bad):
    W, H = layer(4, 16)
    (W if bad == "W" else H)[1, 2] = float("nan")
    with pytest.raises(ValueError, match="fc.*NaN"):
        sparsegpt_prune(W, H, 0.5, name="fc")


def test_bad_inputs_raise():
    W, H = layer(4, 16)
    with pytest.raises(ValueError, match="fc Hessian: expected shape"):
        sparsegpt_prune(W, H[:15, :15], 0.5, name="fc")
    with pytest.raises(ValueError, match="on meta"):
        sparsegpt_prune(W, H.to("meta"), 0.5, name="fc")
    with pytest.raises(ValueError, match="divisible by M=4"):
        sparsegpt_prune(W[:, :14], H[:14, :14], "2:4", name="fc")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsegpt_prune(W, H, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        sparsegpt_prune(W[0], H, 0.5)


def test_beats_magnitude_on_correlated_inputs():
    # 128 features driven by 16 factors plus a little noise: what a pruned weight contributed can be
    # recovered through the features correlated with it, which magnitude pruning ignores.
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g)
    X += 0.1 * torch.randn(512, 128, generator=g)
    W = torch.randn(64, 128, generator=g)
    result = sparsegpt_prune(W, hessian(X), 0.5)
    magnitude = W * tensor_keep_mask(W.abs(), 0.5)

    def recon_error(W_pruned):
        return float(((W - W_pruned) @ X.T).pow(2).sum())

    assert recon_error(result.weight) < 0.2 * recon_error(magnitude)
    assert result.sparsity == pytest.approx(0.5)


def test_method_prunes_layer_in_its_dtype():
    X = calib_inputs(64, seed=9)
    stats = LayerStats(64, hessian=True, name="proj")
    stats.add_batch(X.reshape(4, -1, 64))
    W = torch.randn(16, 64).bfloat16()
    method = pk.SparseGPT("2:4")
    result = method.prune_layer(W, stats, "proj")
    assert result.weight.dtype == torch.bfloat16 and result.weight.shape == W.shape
    assert torch.equal(result.mask.reshape(16, 16, 4).sum(-1), torch.full((16, 16), 2))
    assert not result.weight[~result.mask].any()
    assert method.needs_hessian and "2:4" in repr(method)
    with pytest.raises(ValueError, match="proj: SparseGPT needs the layer's Hessian"):
        method.prune_layer(W, None, "proj")


def test_zero_sparsity_keeps_the_layer():
    W, H = layer(8, 40)
    result = sparsegpt_prune(W, H, 0.0)
    assert result.mask.all() and torch.equal(result.weight, W) and result.loss_estimate == 0.0


# ---- GPU: the whole layer on CUDA against the reference on the same device ----

@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols,spec", CASES + [(512, 1024, "2:4"), (256, 1000, 0.5)])
def test_gpu_matches_reference_fasterprune(rows, cols, spec):
    W, H = layer(rows, cols, seed=rows)
    W, H = W.cuda(), H.cuda()
    result = sparsegpt_prune(W, H, spec)
    assert result.weight.is_cuda and result.mask.is_cuda
    W_ref, keep_ref, losses_ref = reference(W, H, spec)
    # Rows are independent given H: a near-tie decided differently by GPU round-off changes only its
    # own row (and, for unstructured, perhaps a threshold-adjacent entry of a later block).
    same_rows = (result.mask == keep_ref).all(1)
    assert float(same_rows.float().mean()) >= 0.99
    torch.testing.assert_close(result.weight[same_rows], W_ref[same_rows], rtol=1e-4,
                               atol=1e-4 * float(W_ref.abs().max()))
    assert result.loss_estimate == pytest.approx(float(losses_ref.sum()), rel=1e-3)


def test_layers_reading_one_input_share_one_factorization(monkeypatch):
    """q/k/v share H and its factor, gate/up too: 4 factorizations per Llama block, not 7."""
    import prunekit as pk
    from prunekit.pruning import sparsegpt as sg
    from pipeline_models import calib_ids, tiny_model

    calls = []
    real = sg.factor_hessian
    monkeypatch.setattr(sg, "factor_hessian", lambda H, *a, **k: calls.append(H.shape) or real(H, *a, **k))
    model = tiny_model("llama")
    report = pk.prune(model, pk.SparseGPT("2:4"), calib_ids(), progress=False)
    assert len(report.layers) == 14 and len(calls) == 8

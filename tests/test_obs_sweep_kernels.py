"""The fast in-block OBS sweeps (Triton kernel, CUDA kernel) against a plain transcription of
IST-DASLab/sparsegpt's fasterprune inner loop. Masks must match exactly, values to fp32 rounding."""
import pytest
import torch

from prunekit import _native

RTOL, ATOL = 1e-5, 1e-5


def sweep_transcription(W1, Hinv1, keep, n, m):
    """fasterprune's column loop, one column at a time (n = KEPT of every m; m = 0: keep is the mask)."""
    W1 = W1.clone()
    rows, B = W1.shape
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    losses = torch.zeros(rows, dtype=W1.dtype, device=W1.device)
    keep = keep.clone()
    diag = torch.diag(Hinv1)
    for i in range(B):
        if m > 0 and i % m == 0:
            scores = W1[:, i:i + m] ** 2 / diag[i:i + m].reshape(1, -1) ** 2
            pruned = torch.sort(scores, dim=1, stable=True).indices[:, :m - n]
            group = torch.ones_like(scores, dtype=torch.bool)
            group.scatter_(1, pruned, False)
            keep[:, i:i + m] = group
        d = Hinv1[i, i]
        w = W1[:, i]
        q = torch.where(keep[:, i], w, torch.zeros_like(w))
        Q1[:, i] = q
        losses += (w - q) ** 2 / d ** 2 / 2
        err = (w - q) / d
        W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err
    return Q1, Err1, losses, keep


def make_block(rows, B, gen, device="cpu"):
    """A realistic block: W random, Hinv1 the upper Cholesky factor of an SPD matrix's inverse."""
    W = torch.randn(rows, B, generator=gen)
    X = torch.randn(4 * B, B, generator=gen)
    H = X.t() @ X / (4 * B) + 0.01 * torch.eye(B)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).float()
    keep = torch.rand(rows, B, generator=gen) > 0.5
    return W.to(device), Hinv.contiguous().to(device), keep.to(device)


def assert_same_sweep(got, expected):
    q, err, losses, keep = got
    q_ref, err_ref, losses_ref, keep_ref = expected
    assert torch.equal(keep.cpu(), keep_ref.cpu()), "kept masks differ"
    torch.testing.assert_close(q.cpu(), q_ref.cpu(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(err.cpu(), err_ref.cpu(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(losses.cpu(), losses_ref.cpu(), rtol=RTOL, atol=ATOL)


PATTERNS = [(0, 0), (2, 4), (4, 8)]
SHAPES = [(1, 8), (5, 16), (37, 24), (37, 128)]  # 37x128: three row tiles, the last partial


def test_transcription_nm_keeps_n_per_group(gen):
    W, Hinv, keep = make_block(9, 16, gen)
    _, _, _, kept = sweep_transcription(W, Hinv, keep, 2, 4)
    assert torch.equal(kept.reshape(9, 4, 4).sum(-1), torch.full((9, 4), 2))


def test_transcription_kept_weights_absorb_the_error(gen):
    # Unstructured: a kept column's q equals the updated weight, a pruned one is zero.
    W, Hinv, keep = make_block(6, 8, gen)
    q, _, losses, _ = sweep_transcription(W, Hinv, keep, 0, 0)
    assert torch.all(q[~keep] == 0)
    assert torch.all(losses >= 0)
    assert not torch.allclose(q[keep], W[keep])  # the OBS updates moved the kept weights


# ---- Triton (interpreter on CPU) -------------------------------------------------------------

@pytest.mark.parametrize("rows,B", SHAPES)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_triton_matches_transcription(rows, B, n, m, gen):
    from prunekit.kernels.obs_sweep import obs_sweep_triton
    if B % max(m, 1):
        pytest.skip("block width not divisible by M")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W, Hinv, keep = make_block(rows, B, gen, device)
    got = obs_sweep_triton(W, Hinv, keep, n, m)
    assert_same_sweep(got, sweep_transcription(W, Hinv, keep, n, m))


@pytest.mark.parametrize("n,m", PATTERNS)
def test_triton_matches_the_package_reference(n, m, gen):
    from prunekit.kernels.obs_sweep import obs_sweep_triton
    ref = pytest.importorskip("prunekit.ref.obs_sweep")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W, Hinv, keep = make_block(19, 40, gen, device)
    assert_same_sweep(obs_sweep_triton(W, Hinv, keep, n, m), ref.obs_sweep(W, Hinv, keep, n, m))


def test_triton_nm_ties_prune_lower_index_first():
    from prunekit.kernels.obs_sweep import obs_sweep_triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W = torch.ones(3, 8, device=device)
    Hinv = torch.eye(8, device=device)
    keep = torch.zeros(3, 8, dtype=torch.bool, device=device)
    got = obs_sweep_triton(W, Hinv, keep, 2, 4)
    expected = torch.tensor([False, False, True, True] * 2, device=device).expand(3, 8)
    assert torch.equal(got[3], expected)


def test_triton_rejects_bad_inputs(gen):
    from prunekit.kernels.obs_sweep import obs_sweep_triton
    W, Hinv, keep = make_block(4, 12, gen)
    with pytest.raises(ValueError, match="divisible by M"):
        obs_sweep_triton(W, Hinv, keep, 2, 8)
    with pytest.raises(ValueError, match="block width"):
        obs_sweep_triton(torch.zeros(2, 130), torch.eye(130), torch.zeros(2, 130, dtype=torch.bool), 0, 0)
    with pytest.raises(ValueError, match="Hinv1"):
        obs_sweep_triton(W, Hinv[:4, :4].contiguous(), keep, 0, 0)


# ---- CUDA kernel (GPU machine) ---------------------------------------------------------------

def cuda_obs_sweep(W, Hinv, keep, n, m):
    """Calls the raw binding the way ops/obs_sweep.py does: contiguous fp32 in, preallocated outputs."""
    mod = _native.require_cuda_module()
    rows, B = W.shape
    W, Hinv, keep = W.contiguous(), Hinv.contiguous(), keep.contiguous()
    q, err = torch.empty_like(W), torch.empty_like(W)
    losses = torch.empty(rows, device=W.device)
    keep_out = torch.empty_like(keep)
    mod.obs_sweep(W.data_ptr(), Hinv.data_ptr(), keep.data_ptr(), q.data_ptr(), err.data_ptr(),
                  losses.data_ptr(), keep_out.data_ptr(), rows, B, n, m, _native.stream_of(W))
    return q, err, losses, keep_out


@pytest.mark.gpu
# 20000 rows: more than the capped grid holds, so warps loop over rows.
@pytest.mark.parametrize("rows,B", SHAPES + [(1000, 128), (33, 96), (70, 120), (20000, 16)])
@pytest.mark.parametrize("n,m", PATTERNS + [(1, 3), (16, 32)])
def test_cuda_matches_transcription(rows, B, n, m, gen):
    if B % max(m, 1):
        pytest.skip("block width not divisible by M")
    W, Hinv, keep = make_block(rows, B, gen, "cuda")
    got = cuda_obs_sweep(W, Hinv, keep, n, m)
    torch.cuda.synchronize()
    assert_same_sweep(got, sweep_transcription(W, Hinv, keep, n, m))


@pytest.mark.gpu
def test_cuda_triton_agree_on_large_block(gen):
    from prunekit.kernels.obs_sweep import obs_sweep_triton
    W, Hinv, keep = make_block(4096, 128, gen, "cuda")
    for n, m in PATTERNS:
        assert_same_sweep(cuda_obs_sweep(W, Hinv, keep, n, m), obs_sweep_triton(W, Hinv, keep, n, m))


@pytest.mark.parametrize("rows,B,n,m", [(4, 130, 0, 0), (4, 0, 0, 0), (4, 12, 2, 8), (4, 8, 5, 4), (4, 8, 1, -4)])
def test_cuda_binding_rejects_bad_sizes_before_touching_the_device(rows, B, n, m):
    # Argument checks run before any CUDA call, so they are testable on a machine without a GPU.
    mod = _native.cuda_module()
    if mod is None:
        pytest.skip("prunekit._C_cuda not built here")
    with pytest.raises(ValueError, match="obs_sweep: invalid argument"):
        mod.obs_sweep(16, 16, 16, 16, 16, 16, 16, rows, B, n, m, 0)

"""prunekit::obs_sweep: every backend against the PyTorch reference (prunekit.ref.obs_sweep)."""
import pytest
import torch

import prunekit.ops.obs_sweep  # noqa: F401  (registers the op)
from prunekit import _native
from prunekit.ref.obs_sweep import obs_sweep as ref_sweep
from prunekit.ref.selection import nm_keep_mask, tensor_keep_mask
from prunekit.ref.sparsegpt import reference_hinv

SHAPES = [(1, 1), (1, 7), (37, 7), (37, 128), (130, 1), (130, 128), (130, 8)]
PATTERNS = [(0, 0), (2, 4), (4, 8)]


def make_block(rows, B, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * B + 5, B, generator=g)
    if correlated:
        X = X @ (torch.eye(B) + 0.5 * torch.randn(B, B, generator=g) / B ** 0.5)
    H = 2 / X.shape[0] * X.T @ X
    H.diagonal().add_(0.01 * H.diagonal().mean())
    W = torch.randn(rows, B, generator=g)
    return W, reference_hinv(H).contiguous()


def block_keep(W, U, sparsity=0.5):
    return tensor_keep_mask(W ** 2 / torch.diag(U).reshape(1, -1) ** 2, sparsity)


def cases():
    for rows, B in SHAPES:
        for n, m in PATTERNS:
            if m == 0 or B % m == 0:
                yield rows, B, n, m


def inputs(rows, B, n, m, seed=0):
    W, U = make_block(rows, B, seed)
    keep = block_keep(W, U) if m == 0 else torch.zeros(rows, B, dtype=torch.bool)
    return W, U, keep


def assert_same(got, want):
    q, err, loss, keep = got
    q_ref, err_ref, loss_ref, keep_ref = want
    assert torch.equal(keep.cpu(), keep_ref)
    torch.testing.assert_close(q.cpu(), q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(err.cpu(), err_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.cpu(), loss_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,B,n,m", list(cases()))
def test_cpu_kernel_matches_reference(rows, B, n, m):
    W, U, keep = inputs(rows, B, n, m)
    got = torch.ops.prunekit.obs_sweep(W, U, keep, n, m)
    assert_same(got, ref_sweep(W, U, keep, n, m))


@pytest.mark.parametrize("seed", range(4))
def test_nm_masks_follow_updated_weights(seed):
    # The pattern holds per group, and it is chosen from the weights after the earlier columns'
    # updates: a selection on the original block would differ.
    W, U, keep = inputs(64, 32, 2, 4, seed)
    q, _, _, keep_out = torch.ops.prunekit.obs_sweep(W, U, keep, 2, 4)
    assert torch.equal(keep_out.reshape(64, 8, 4).sum(-1), torch.full((64, 8), 2))
    assert torch.equal(q != 0, keep_out)
    assert not torch.equal(keep_out, nm_keep_mask(W ** 2 / torch.diag(U) ** 2, 2, 4))


def test_unstructured_uses_given_mask_and_loss_is_obs_sum():
    W, U, keep = inputs(37, 16, 0, 0)
    q, err, loss, keep_out = torch.ops.prunekit.obs_sweep(W, U, keep, 0, 0)
    assert torch.equal(keep_out, keep)
    assert torch.equal(q[~keep], torch.zeros(int((~keep).sum())))
    torch.testing.assert_close(loss, (err ** 2).sum(1) / 2)  # (w-q)^2/d^2 == err^2


def test_ties_prune_lower_index_first():
    # Identity factor: no updates, scores are w^2, every group is a four-way tie.
    W = torch.ones(3, 8)
    U = torch.eye(8)
    _, _, _, keep = torch.ops.prunekit.obs_sweep(W, U, torch.zeros(3, 8, dtype=torch.bool), 2, 4)
    assert torch.equal(keep, torch.tensor([[False, False, True, True] * 2] * 3))


def test_opcheck_cpu():
    for rows, B, n, m in [(5, 8, 0, 0), (6, 8, 2, 4)]:
        W, U, keep = inputs(rows, B, n, m)
        torch.library.opcheck(torch.ops.prunekit.obs_sweep.default, (W, U, keep, n, m))


@pytest.mark.parametrize("n,m,B", [(2, 4, 6), (4, 4, 8), (0, 4, 8), (2, -1, 8)])
def test_bad_pattern_raises(n, m, B):
    W, U = make_block(3, B)
    keep = torch.zeros(3, B, dtype=torch.bool)
    with pytest.raises(ValueError, match="obs_sweep"):
        torch.ops.prunekit.obs_sweep(W, U, keep, n, m)


def test_bad_shapes_and_dtypes_raise():
    W, U = make_block(3, 8)
    keep = torch.zeros(3, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="Hinv1"):
        torch.ops.prunekit.obs_sweep(W, U[:7, :7], keep, 0, 0)
    with pytest.raises(ValueError, match="keep"):
        torch.ops.prunekit.obs_sweep(W, U, keep[:, :7], 0, 0)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.prunekit.obs_sweep(W.double(), U, keep, 0, 0)
    with pytest.raises(ValueError, match="width 0"):
        torch.ops.prunekit.obs_sweep(W[:, :0], U[:0, :0], keep[:, :0], 0, 0)


def test_non_positive_pivot_raises():
    W, U = make_block(3, 8)
    U[3, 3] = 0
    keep = torch.zeros(3, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="numerical"):
        torch.ops.prunekit.obs_sweep(W, U, keep, 0, 0)
    with pytest.raises(ValueError, match="non-positive"):
        ref_sweep(W, U, keep, 0, 0)


def native_call(W, U, keep, rows, B, n, m):
    outs = (torch.empty_like(W), torch.empty_like(W), torch.empty(rows),
            torch.empty(rows, B, dtype=torch.bool))
    _native.require_cpu_module().obs_sweep(W.data_ptr(), U.data_ptr(), keep.data_ptr(),
                                           *(t.data_ptr() for t in outs), rows, B, n, m)
    return outs


@pytest.mark.parametrize("n,m,B", [(2, 4, 6), (4, 4, 8), (0, 4, 8), (1, 128, 128), (2, -1, 8)])
def test_cpu_binding_rejects_bad_sizes(n, m, B):
    # The C++ kernel checks on its own too (status kInvalidArgument -> ValueError).
    W, U = make_block(3, B)
    keep = torch.zeros(3, B, dtype=torch.bool)
    with pytest.raises(ValueError, match="invalid argument"):
        native_call(W, U, keep, 3, B, n, m)
    with pytest.raises(ValueError, match="invalid argument"):
        native_call(W, U, keep, 3, 0, 0, 0)


def test_cpu_binding_matches_reference_bitwise():
    W, U, keep = inputs(37, 128, 2, 4)
    q, err, loss, keep_out = native_call(W, U, keep, 37, 128, 2, 4)
    q_ref, err_ref, loss_ref, keep_ref = ref_sweep(W, U, keep, 2, 4)
    assert torch.equal(keep_out, keep_ref)
    assert torch.equal(q, q_ref) and torch.equal(err, err_ref)


# ---- GPU: the CUDA kernel and the Triton kernel against the same reference ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("rows,B,n,m", list(cases()) + [(4096, 128, 2, 4), (1000, 128, 0, 0)])
def test_gpu_matches_reference(backend, rows, B, n, m, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_SWEEP_BACKEND", backend)
    W, U, keep = inputs(rows, B, n, m)
    got = torch.ops.prunekit.obs_sweep(W.cuda(), U.cuda(), keep.cuda(), n, m)
    assert all(t.is_cuda for t in got)
    assert_same(got, ref_sweep(W, U, keep, n, m))


@pytest.mark.gpu
def test_gpu_default_backend_is_native_cuda():
    assert _native.cuda_module() is not None and hasattr(_native.cuda_module(), "obs_sweep")
    W, U, keep = inputs(130, 128, 2, 4)
    got = torch.ops.prunekit.obs_sweep(W.cuda(), U.cuda(), keep.cuda(), 2, 4)
    assert_same(got, ref_sweep(W, U, keep, 2, 4))


# ---- CUDA dispatch decisions, exercised on CPU tensors with the backends stubbed ----

def stub_backends(monkeypatch, cuda_module=None, triton=None):
    from prunekit.ops import obs_sweep as op
    monkeypatch.setattr(op._native, "cuda_module", lambda: cuda_module)
    monkeypatch.setattr(op, "_triton_launcher", lambda: (triton, "" if triton else "ImportError: stub"))
    return op._cuda_kernel


def test_cuda_dispatch_uses_triton_when_native_kernel_missing(monkeypatch):
    calls = []

    def fake_triton(*args):
        calls.append(args)
        return ref_sweep(*args)

    kernel = stub_backends(monkeypatch, cuda_module=object(), triton=fake_triton)
    W, U, keep = inputs(5, 8, 2, 4)
    assert_same(kernel(W, U, keep, 2, 4), ref_sweep(W, U, keep, 2, 4))
    assert len(calls) == 2  # the first-use self-check on a probe (ops/selfcheck.py), then the call
    monkeypatch.setenv("PRUNEKIT_SWEEP_BACKEND", "triton")
    kernel(W, U, keep, 2, 4)
    assert len(calls) == 3


def test_cuda_dispatch_without_any_backend_explains(monkeypatch):
    kernel = stub_backends(monkeypatch, cuda_module=None, triton=None)
    W, U, keep = inputs(5, 8, 0, 0)
    with pytest.raises(RuntimeError, match="_C_cuda is not available"):
        kernel(W, U, keep, 0, 0)
    kernel = stub_backends(monkeypatch, cuda_module=object(), triton=None)
    with pytest.raises(RuntimeError, match="no obs_sweep kernel.*ImportError: stub"):
        kernel(W, U, keep, 0, 0)
    monkeypatch.setenv("PRUNEKIT_SWEEP_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="Triton sweep.*did not load"):
        kernel(W, U, keep, 0, 0)
    monkeypatch.setenv("PRUNEKIT_SWEEP_BACKEND", "sideways")
    with pytest.raises(ValueError, match="PRUNEKIT_SWEEP_BACKEND"):
        kernel(W, U, keep, 0, 0)
    monkeypatch.setenv("PRUNEKIT_SWEEP_BACKEND", "")
    monkeypatch.setenv("PRUNEKIT_ALLOW_REFERENCE", "1")
    assert_same(kernel(W, U, keep, 0, 0), ref_sweep(W, U, keep, 0, 0))


@pytest.mark.parametrize("rows,B,n,m", [(37, 16, 2, 4), (5, 7, 0, 0)])
def test_triton_sweep_matches_reference_interpreted(rows, B, n, m):
    # Runs once the Triton kernel (kernels/obs_sweep.py, written separately) is in the tree.
    pytest.importorskip("prunekit.kernels.obs_sweep")
    from prunekit.ops.obs_sweep import _triton_sweep
    W, U, keep = inputs(rows, B, n, m)
    assert_same(_triton_sweep(W, U, keep, n, m), ref_sweep(W, U, keep, n, m))


def test_op_accepts_non_contiguous_inputs():
    W, U, keep = inputs(9, 16, 2, 4)
    Wt, Ut = W.T.contiguous().T, U.T.contiguous().T
    assert not Wt.is_contiguous() and not Ut.is_contiguous()
    assert_same(torch.ops.prunekit.obs_sweep(Wt, Ut, keep, 2, 4), ref_sweep(W, U, keep, 2, 4))


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_zero_rows_give_empty_outputs(n, m):
    U = torch.eye(8)
    q, err, loss, keep = torch.ops.prunekit.obs_sweep(torch.empty(0, 8), U, torch.empty(0, 8, dtype=torch.bool), n, m)
    assert q.shape == err.shape == keep.shape == (0, 8) and loss.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_gpu_zero_rows_give_empty_outputs(backend, n, m, monkeypatch):
    # an empty CUDA tensor has data_ptr() == 0: the kernel must not take it for a missing pointer
    monkeypatch.setenv("PRUNEKIT_SWEEP_BACKEND", backend)
    keep = torch.empty(0, 8, dtype=torch.bool, device="cuda")
    q, err, loss, keep = torch.ops.prunekit.obs_sweep(torch.empty(0, 8, device="cuda"), torch.eye(8, device="cuda"),
                                                      keep, n, m)
    assert q.shape == err.shape == keep.shape == (0, 8) and loss.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_ties_prune_lower_index_first(backend, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_SWEEP_BACKEND", backend)
    W, U = torch.ones(37, 64), torch.eye(64)  # every group of every row is a four-way tie
    _, _, _, keep = torch.ops.prunekit.obs_sweep(W.cuda(), U.cuda(), torch.zeros(37, 64, dtype=torch.bool).cuda(), 2, 4)
    assert torch.equal(keep.cpu(), torch.tensor([[False, False, True, True] * 16] * 37))

"""Calibration statistics: the custom ops equal the references' running-mean formulas, over several
batches; the Triton sum of squares matches under the interpreter; CUDA paths on the GPU machine."""
import pytest
import torch

from prunekit.ops import calib_stats as ops
from prunekit.pruning.stats import LayerStats


def plain_running_stats(batches):
    """WrappedGPT.add_batch / SparseGPT.add_batch written out: in-place rescale, then add."""
    k = batches[0].shape[-1]
    norm_sq, H, n = torch.zeros(k), torch.zeros(k, k), 0
    for x in batches:
        b = x.shape[0] if x.dim() == 3 else 1
        rows = x.reshape(-1, k).float()
        norm_sq *= n / (n + b)
        H *= n / (n + b)
        n += b
        norm_sq += rows.pow(2).sum(0) / n
        scaled = (2 / n) ** 0.5 * rows
        H += scaled.t() @ scaled
    return norm_sq, H, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_stats_follow_the_reference_over_several_batches(dtype, gen):
    batches = [torch.randn(b, 7, 13, generator=gen).to(dtype) for b in (2, 1, 3)]
    stats = LayerStats(13, hessian=True, act_norm=True)
    for x in batches:
        stats.add_batch(x)
    norm_sq, H, n = plain_running_stats(batches)
    assert stats.nsamples == n == 6
    torch.testing.assert_close(stats.act_norm_sq, norm_sq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.hessian, H, rtol=1e-6, atol=1e-6)


def test_cpu_ops_are_bitwise_the_reference_formula(gen):
    x = torch.randn(21, 9, generator=gen).bfloat16()
    norm_sq, H = torch.rand(9, generator=gen), torch.rand(9, 9, generator=gen)
    rows = x.float()
    expected_norm = norm_sq.clone().mul_(4 / 7).add_(rows.pow(2).sum(0) / 7)
    expected_H = H.clone().mul_(4 / 7)
    scaled = rows * (2 / 7) ** 0.5
    expected_H.addmm_(scaled.t(), scaled)
    assert torch.equal(ops.act_norm_sq_update(x, norm_sq, 4, 3), expected_norm)
    assert torch.equal(ops.hessian_update(x, H, 4, 3), expected_H)


def test_opcheck(gen):
    x = torch.randn(10, 6, generator=gen)
    torch.library.opcheck(ops.act_norm_sq_update, (x, torch.rand(6, generator=gen), 3, 2))
    torch.library.opcheck(ops.hessian_update, (x, torch.rand(6, 6, generator=gen), 3, 2))


def test_ops_reject_mismatched_statistics(gen):
    x = torch.randn(4, 6, generator=gen)
    with pytest.raises(ValueError, match="does not match 6 input features"):
        ops.act_norm_sq_update(x, torch.zeros(5), 0, 1)
    with pytest.raises(TypeError, match="must be float32"):
        ops.hessian_update(x, torch.zeros(6, 6, dtype=torch.float64), 0, 1)
    with pytest.raises(ValueError, match="batch >= 1"):
        ops.hessian_update(x, torch.zeros(6, 6), 0, 0)


@pytest.mark.parametrize("rows,cols", [(1, 5), (37, 70), (300, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sum_sq_matches_plain_sum(rows, cols, dtype, gen):
    from prunekit.kernels.calib_stats import sum_sq_triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(rows, cols, generator=gen).to(dtype).to(device)
    torch.testing.assert_close(sum_sq_triton(x), x.float().pow(2).sum(0), rtol=1e-5, atol=1e-5)


def test_triton_sum_sq_reads_strided_rows(gen):
    from prunekit.kernels.calib_stats import sum_sq_triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(40, 96, generator=gen, device="cpu").to(device)[:, 10:77]  # row stride 96, width 67
    torch.testing.assert_close(sum_sq_triton(x), x.pow(2).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_ops_match_the_fp32_reference(dtype, gen):
    x = (torch.randn(2 * 2048, 1000, generator=gen) * 3).to(dtype)
    norm_sq, H = torch.rand(1000, generator=gen), torch.rand(1000, 1000, generator=gen)
    H = H @ H.t()
    got_norm = ops.act_norm_sq_update(x.cuda(), norm_sq.cuda(), 5, 2)
    got_H = ops.hessian_update(x.cuda(), H.cuda(), 5, 2)
    torch.testing.assert_close(got_norm.cpu(), ops.act_norm_sq_update(x, norm_sq, 5, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_H.cpu(), ops.hessian_update(x, H, 5, 2), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_tensor_core_hessian_is_used_and_gives_the_same_sparsegpt_masks(gen):
    # DESIGN.md §4 saving 3: verify the masks of the bf16 tensor-core route against the fp32 route.
    assert ops.tensor_core_hessian_available(), f"torch {torch.__version__} lacks addmm out_dtype"
    x = torch.randn(4096, 256, generator=gen).bfloat16().cuda()
    H_fast = ops.hessian_update(x, torch.zeros(256, 256, device="cuda"), 0, 2)
    H_ref = ops.hessian_update(x.cpu(), torch.zeros(256, 256), 0, 2)
    torch.testing.assert_close(H_fast.cpu(), H_ref, rtol=1e-5, atol=1e-4)
    W = torch.randn(64, 256, generator=gen)
    try:
        from prunekit.ref.sparsegpt import reference_fasterprune
    except ImportError:
        pytest.skip("prunekit.ref.sparsegpt (branch sparsegpt) not merged yet")
    for prunen, prunem in ((0, 0), (2, 4)):
        _, keep_fast, _ = reference_fasterprune(W, H_fast.cpu(), 0.5, prunen, prunem)
        _, keep_ref, _ = reference_fasterprune(W, H_ref, 0.5, prunen, prunem)
        differ = (keep_fast != keep_ref).float().mean().item()
        assert differ < 1e-3, f"prunen={prunen}:{prunem} masks differ in {differ:.2%} of weights"
